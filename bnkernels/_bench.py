"""``python -m bnkernels bench``: bnkernels against the NumPy reference, PyTorch and a roofline.

Implementations, per case (a shape, a dtype and a memory layout):

backward
    ``graph``      reference.backward_graph, the staged gate-by-gate backward (the baseline)
    ``alt``        reference.backward_alt, the simplified closed form
    ``bnkernels``  bnkernels.backward
    ``torch``      torch.ops.aten.native_batch_norm_backward (train, all three gradients)
    ``roofline``   _kernels.stream_add(x, dy, out): read two arrays, write one, which is the
                   memory traffic of an ideal fused backward
forward (train mode)
    ``reference``  reference.forward
    ``bnkernels``  bnkernels.forward
    ``torch``      torch.ops.aten.native_batch_norm (train, running statistics updated)
    ``roofline``   _kernels.stream_add(x, x, out): read one array, write one.  A copy-like
                   pass is the traffic of an ideal fused forward.  np.copyto would be the
                   obvious copy, but it runs on one thread and so would understate the
                   bound with several; stream_add runs the same OpenMP loop with the
                   requested threads, and its second load of x hits L1, so it moves
                   exactly one read and one write of the array through memory.

Every implementation runs with the same thread count: bnkernels.backward and stream_add
take it as an argument, bnkernels.forward gets it from threadpoolctl (OpenMP limit), torch
from torch.set_num_threads.  The NumPy reference is single-threaded whatever the count,
as NumPy's element-wise operations and reductions are.

The rooflines allocate their output, as every implementation must (each returns new
arrays): above glibc's mmap threshold (32 MiB at most) a fresh allocation comes back as
untouched pages whose first write faults them in, a cost of the ideal kernel too.

Timing: one warm-up call each, then the implementations of a case take turns, one timed
call (time.perf_counter, garbage collector off) each per round, the first place rotating
from round to round, until each has reached
both a minimum count and a time budget, or a maximum count; the median and the
interquartile range are reported.  Taking turns matters on a shared machine, whose memory
bandwidth drifts by tens of per cent over seconds: implementations timed one after the
other would each see a different machine, and their ratios would carry the drift.
"""

import argparse
import contextlib
import datetime
import fnmatch
import gc
import json
import os
import platform
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from math import prod

import numpy as np

import bnkernels
from bnkernels import _kernels, reference

__all__ = [
    "Case",
    "CaseData",
    "CASES",
    "QUICK_CASES",
    "BACKWARD_IMPLS",
    "FORWARD_IMPLS",
    "select_cases",
    "openmp_limit",
    "measure",
    "measure_turns",
    "main",
]

BACKWARD_IMPLS = ("graph", "alt", "bnkernels", "torch", "roofline")
FORWARD_IMPLS = ("reference", "bnkernels", "torch", "roofline")
# the implementation each pass's speedups are taken over
BASELINE = {"backward": "graph", "forward": "reference"}
EPS = 1e-5


# ---------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One benchmark case.  layout: '2d' (N, D), 'nchw' or 'nhwc' (channels last, axis=-1)."""

    name: str
    layout: str
    shape: tuple
    dtype: str

    @property
    def axis(self):
        return -1 if self.layout == "nhwc" else 1

    @property
    def channels(self):
        return self.shape[self.axis]

    @property
    def size(self):
        return prod(self.shape)

    @property
    def nbytes(self):
        return self.size * np.dtype(self.dtype).itemsize


_2D = [
    ("small", (256, 512)),
    ("medium", (4096, 1024)),
    ("large", (8192, 2048)),
    ("tall", (262144, 32)),
    ("wide", (64, 65536)),
    ("50x100", (50, 100)),  # a CS231n assignment's layer: the cost of a call
    ("16384x512", (16384, 512)),  # power-of-two channel counts, as networks have them
]
_NCHW = [(32, 64, 56, 56), (64, 256, 14, 14), (128, 512, 7, 7), (8, 32, 112, 112)]
# channels-last versions of the first two NCHW shapes, and wide channel counts of deep layers
_NHWC = [(32, 56, 56, 64), (64, 14, 14, 256), (32, 28, 28, 512), (64, 7, 7, 2048)]
_SUFFIX = {"float16": "f16", "float32": "f32", "float64": "f64"}
# float16 (half the traffic of float32) on the shapes of conv layers and a large 2D one
_F16_STEMS = ("2d-large", "nchw-32x64x56x56", "nchw-64x256x14x14", "nhwc-32x56x56x64")


def _build_cases():
    cases = []
    shapes = (
        [("2d", "2d-" + label, s) for label, s in _2D]
        + [("nchw", "nchw-" + "x".join(map(str, s)), s) for s in _NCHW]
        + [("nhwc", "nhwc-" + "x".join(map(str, s)), s) for s in _NHWC]
    )
    for layout, stem, shape in shapes:
        for dtype in ("float32", "float64") + (("float16",) if stem in _F16_STEMS else ()):
            cases.append(Case("%s-%s" % (stem, _SUFFIX[dtype]), layout, shape, dtype))
    return tuple(cases)


CASES = _build_cases()
QUICK_CASES = (
    "2d-small-f32",
    "2d-medium-f32",
    "2d-medium-f64",
    "nchw-64x256x14x14-f32",
    "nhwc-64x14x14x256-f32",
)
# thread scaling is shown for these when they are selected (else for the biggest case)
SCALING_CASES = ("2d-large-f32", "nchw-32x64x56x56-f32", "nhwc-32x56x56x64-f32")


def select_cases(pattern, cases=CASES):
    """Cases whose name matches any comma-separated pattern: fnmatch when the pattern has
    a wildcard, substring otherwise."""
    pats = [p.strip() for p in pattern.split(",") if p.strip()]

    def hit(name, p):
        return fnmatch.fnmatchcase(name, p) if any(ch in p for ch in "*?[") else p in name

    return [c for c in cases if any(hit(c.name, p) for p in pats)]


# ---------------------------------------------------------------------------
# threads
# ---------------------------------------------------------------------------


def have_threadpoolctl():
    try:
        import threadpoolctl  # noqa: F401
    except ImportError:
        return False
    return True


def openmp_limit(threads):
    """Context that sets the OpenMP thread count (what bnkernels.forward runs with).

    Entered around a whole timing loop, never inside a timed call: threadpoolctl scans the
    loaded libraries, which costs more than a small forward call.  Without threadpoolctl it
    does nothing and the OpenMP default applies.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=threads, user_api="openmp")


def import_torch():
    """torch, or None when it is not installed (it is optional)."""
    try:
        import torch
    except ImportError:
        return None
    return torch


# ---------------------------------------------------------------------------
# data and the timed callables
# ---------------------------------------------------------------------------


def _normal(rng, shape, dt):
    """Standard normal samples of dtype dt (float16: drawn in float32 and rounded)."""
    if dt == np.float16:
        return rng.standard_normal(shape, dtype=np.float32).astype(dt)
    return rng.standard_normal(shape, dtype=dt)


class CaseData:
    """Seeded arrays of one case, and per implementation a callable that runs it once.

    The seed is derived from the case name, so every run times the same data.  Caches
    (each implementation's own forward cache, torch tensors) are built on first use.
    """

    def __init__(self, case):
        self.case = case
        dt = np.dtype(case.dtype)
        rng = np.random.default_rng(zlib.crc32(case.name.encode()))
        # an offset and a scale, as activations have: x - mean is not x
        self.x = _normal(rng, case.shape, dt)
        self.x *= 3
        self.x += 2
        self.dy = _normal(rng, case.shape, dt)
        self.gamma = _normal(rng, case.channels, dt)
        self.beta = _normal(rng, case.channels, dt)
        self._bk_cache = self._ref_cache = self._torch = None

    def _param(self):
        return {"mode": "train", "eps": EPS}

    @property
    def bk_cache(self):
        if self._bk_cache is None:
            self._bk_cache = bnkernels.forward(
                self.x, self.gamma, self.beta, self._param(), axis=self.case.axis
            )[1]
        return self._bk_cache

    @property
    def ref_cache(self):
        if self._ref_cache is None:
            self._ref_cache = reference.forward(
                self.x, self.gamma, self.beta, self._param(), axis=self.case.axis
            )[1]
        return self._ref_cache

    def torch_tensors(self, torch):
        """(x, dy, weight, bias, running_mean, running_var, save_mean, save_invstd) as torch
        tensors sharing the NumPy data; NHWC arrays become channels-last (N, C, H, W) views."""
        if self._torch is None:

            def t(a):
                ta = torch.from_numpy(a)
                return ta.permute(0, 3, 1, 2) if self.case.layout == "nhwc" else ta

            tx, tdy = t(self.x), t(self.dy)
            w, b = torch.from_numpy(self.gamma), torch.from_numpy(self.beta)
            rm = torch.zeros(self.case.channels, dtype=tx.dtype)
            rv = torch.ones(self.case.channels, dtype=tx.dtype)
            _, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
                tx, w, b, None, None, True, 0.1, EPS
            )
            self._torch = (tx, tdy, w, b, rm, rv, save_mean, save_invstd)
        return self._torch

    def backward_fns(self, threads, torch=None):
        """{impl: callable} for the backward pass; 'torch' only when torch is given."""
        dy, x = self.dy, self.x
        ref_cache, bk_cache = self.ref_cache, self.bk_cache
        fns = {
            "graph": lambda: reference.backward_graph(dy, ref_cache),
            "alt": lambda: reference.backward_alt(dy, ref_cache),
            "bnkernels": lambda: bnkernels.backward(dy, bk_cache, num_threads=threads),
        }
        if torch is not None:
            tx, tdy, w, _, _, _, sm, si = self.torch_tensors(torch)
            bwd = torch.ops.aten.native_batch_norm_backward
            fns["torch"] = lambda: bwd(
                tdy, tx, w, None, None, sm, si, True, EPS, [True, True, True]
            )
        fns["roofline"] = lambda: _kernels.stream_add(x, dy, np.empty_like(x), threads)
        return fns

    def forward_fns(self, threads, torch=None):
        """{impl: callable} for the forward pass (train mode).  bnkernels.forward takes its
        thread count from OpenMP: run these inside openmp_limit(threads)."""
        x, g, b, ax = self.x, self.gamma, self.beta, self.case.axis
        param = self._param
        fns = {
            "reference": lambda: reference.forward(x, g, b, param(), axis=ax),
            "bnkernels": lambda: bnkernels.forward(x, g, b, param(), axis=ax),
        }
        if torch is not None:
            tx, _, w, tb, rm, rv, _, _ = self.torch_tensors(torch)
            fwd = torch.ops.aten.native_batch_norm
            fns["torch"] = lambda: fwd(tx, w, tb, rm, rv, True, 0.1, EPS)
        fns["roofline"] = lambda: _kernels.stream_add(x, x, np.empty_like(x), threads)
        return fns


# ---------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    median: float
    iqr: float
    repeats: int


@dataclass(frozen=True)
class Budget:
    seconds: float  # per implementation and case, after the warm-up
    min_repeats: int
    max_repeats: int


FULL = Budget(0.5, 7, 2000)
QUICK = Budget(0.08, 3, 200)


def measure(fn, budget):
    """Warm up once, then time fn() until budget allows; median and IQR in seconds."""
    return measure_turns({"fn": fn}, budget)["fn"]


@contextlib.contextmanager
def _no_gc():
    """The garbage collector off: a collection inside a timed call is noise, not the kernel."""
    gc_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if gc_on:
            gc.enable()


def measure_turns(fns, budget):
    """Time the functions of ``fns`` (name -> callable) taking turns, one call each per
    round, until each has met the budget; {name: Timing}, median and IQR in seconds."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    spent = dict.fromkeys(fns, 0.0)
    active = list(fns)
    with _no_gc():
        rounds = 0
        while active:
            # rotate who goes first: a call right after a NumPy baseline (which frees large
            # temporaries) gets fresh pages to fault in, and that should not always be one
            k = rounds % len(active)
            rounds += 1
            for name in active[k:] + active[:k]:
                t0 = time.perf_counter()
                fns[name]()
                t = time.perf_counter() - t0
                times[name].append(t)
                spent[name] += t
                n = len(times[name])
                if n >= budget.max_repeats or (
                    n >= budget.min_repeats and spent[name] >= budget.seconds
                ):
                    active.remove(name)
    result = {}
    for name, ts in times.items():
        q1, med, q3 = np.percentile(ts, [25, 50, 75])
        result[name] = Timing(float(med), float(q3 - q1), len(ts))
    return result


# ---------------------------------------------------------------------------
# machine
# ---------------------------------------------------------------------------


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        res = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10)
        for line in res.stdout.splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def usable_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_average():
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def machine_info(torch, omp_default):
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": None if torch is None else torch.__version__,
        "bnkernels": bnkernels.__version__,
        "openmp": bool(_kernels.openmp_enabled()),
        "openmp_default_threads": omp_default,
        "build_flags": _kernels.build_flags(),
        "threadpoolctl": have_threadpoolctl(),
    }


# ---------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------


def _record(case, pass_, impl, threads, t):
    return {
        "case": case.name,
        "shape": list(case.shape),
        "dtype": case.dtype,
        "layout": case.layout,
        "axis": case.axis,
        "threads": threads,
        "pass": pass_,
        "impl": impl,
        "median_s": t.median,
        "iqr_s": t.iqr,
        "repeats": t.repeats,
    }


def _progress(msg):
    print(msg, file=sys.stderr, flush=True)


def _set_torch_threads(torch, threads):
    if torch is not None:
        torch.set_num_threads(threads)


def run_case(data, threads, torch, budget):
    """Records for both passes of one case."""
    case, recs = data.case, []
    for name, t in measure_turns(data.backward_fns(threads, torch), budget).items():
        recs.append(_record(case, "backward", name, threads, t))
    with openmp_limit(threads):
        # what bnkernels.forward really gets: the limit, or the default without threadpoolctl
        fwd_threads = _kernels.max_threads()
        for name, t in measure_turns(data.forward_fns(threads, torch), budget).items():
            n = fwd_threads if name == "bnkernels" else threads
            recs.append(_record(case, "forward", name, n, t))
    return recs


def run_scaling(data, counts, budget):
    """bnkernels (both passes) and the backward roofline at each thread count."""
    recs = []
    for n in counts:
        bwd = data.backward_fns(n)
        both = measure_turns({impl: bwd[impl] for impl in ("bnkernels", "roofline")}, budget)
        for impl, t in both.items():
            recs.append(_record(data.case, "backward", impl, n, t))
        with openmp_limit(n):
            if _kernels.max_threads() == n:  # else the limit did not take (no threadpoolctl)
                fwd = data.forward_fns(n)
                recs.append(
                    _record(data.case, "forward", "bnkernels", n, measure(fwd["bnkernels"], budget))
                )
    return recs


def _scaling_cases(cases, quick):
    if quick:
        return cases[-1:] if cases else []
    chosen = [c for c in cases if c.name in SCALING_CASES]
    return chosen or sorted(cases, key=lambda c: c.nbytes)[-1:]


# ---------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------


def _ms(seconds):
    v = seconds * 1e3
    if v >= 100:
        return "%.0f" % v
    if v >= 10:
        return "%.1f" % v
    if v >= 1:
        return "%.2f" % v
    return "%.3f" % v


def _index(records):
    return {(r["case"], r["pass"], r["impl"]): r for r in records}


def _ratio_columns(impls):
    """(a, b) pairs shown as a/b: every other implementation over bnkernels, then bnkernels
    over the roofline."""
    others = [i for i in impls if i not in ("bnkernels", "roofline")]
    return [(o, "bnkernels") for o in others] + [("bnkernels", "roofline")]


def format_tables(records, cases, torch_on):
    idx = _index(records)
    lines = []
    width = max([len(c.name) for c in cases] + [4])
    for pass_, impls in (("backward", BACKWARD_IMPLS), ("forward", FORWARD_IMPLS)):
        impls = [i for i in impls if torch_on or i != "torch"]
        base = BASELINE[pass_]
        ratios = _ratio_columns(impls)
        head = ["%-*s" % (width, "case")]
        head += ["%9s" % i for i in impls] + ["%6s" % "iqr%"]
        head += ["%*s" % (max(9, len(a) + len(b) + 1), "%s/%s" % (a, b)) for a, b in ratios]
        lines.append(
            "%s: median ms over %s; x/bnkernels > 1: bnkernels is faster; "
            "bnkernels/roofline 1.0 = at the memory roofline" % (pass_, base)
        )
        lines.append(" ".join(head))
        for c in cases:
            row = ["%-*s" % (width, c.name)]
            for i in impls:
                r = idx.get((c.name, pass_, i))
                row.append("%9s" % (_ms(r["median_s"]) if r else "-"))
            bk = idx.get((c.name, pass_, "bnkernels"))
            row.append("%6s" % ("%.0f" % (100 * bk["iqr_s"] / bk["median_s"]) if bk else "-"))
            for a, b in ratios:
                ra, rb = idx.get((c.name, pass_, a)), idx.get((c.name, pass_, b))
                w = max(9, len(a) + len(b) + 1)
                row.append(
                    "%*s" % (w, "%.2f" % (ra["median_s"] / rb["median_s"]) if ra and rb else "-")
                )
            lines.append(" ".join(row))
        lines.append("")
    return "\n".join(lines)


def format_scaling(records):
    if not records:
        return ""
    idx = {}
    for r in records:
        idx.setdefault((r["case"], r["pass"], r["impl"]), {})[r["threads"]] = r["median_s"]
    lines = ["thread scaling (median ms, 1 thread -> all cores, speedup):"]
    for case in dict.fromkeys(r["case"] for r in records):
        parts = []
        for pass_, impl, label in (
            ("backward", "bnkernels", "backward"),
            ("forward", "bnkernels", "forward"),
            ("backward", "roofline", "roofline"),
        ):
            t = idx.get((case, pass_, impl), {})
            if len(t) >= 2:
                lo, hi = min(t), max(t)
                parts.append("%s %s -> %s (%.2fx)" % (label, _ms(t[lo]), _ms(t[hi]), t[lo] / t[hi]))
        lines.append("  %s: %s" % (case, "   ".join(parts)))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Markdown of a recorded run
# ---------------------------------------------------------------------------

SHORT = {"bnkernels": "bnk", "roofline": "roof", "reference": "ref"}


def _fmt_ratio(a, v):
    return "%.2f" % v if a in ("torch", "bnkernels") else "%.1f" % v


def format_markdown(doc):
    """Markdown tables of a recorded run (``--json`` output): per pass and case the median
    times and the ratios, then the median of each ratio over the cases."""
    results = doc["results"]
    torch_on = any(r["impl"] == "torch" for r in results)
    cases = list(dict.fromkeys(r["case"] for r in results))
    idx = _index(results)
    out = []
    for pass_, impls, title in (
        ("backward", BACKWARD_IMPLS, "Backward (median ms):"),
        ("forward", FORWARD_IMPLS, "Forward, train mode (median ms):"),
    ):
        impls = [i for i in impls if torch_on or i != "torch"]
        cols = _ratio_columns(impls)
        out += [title, ""]
        out.append(
            "| case | "
            + " | ".join(impls)
            + " | "
            + " | ".join("%s/%s" % (SHORT.get(a, a), SHORT.get(b, b)) for a, b in cols)
            + " |"
        )
        out.append("|---|" + "---:|" * (len(impls) + len(cols)))
        ratios = {col: [] for col in cols}
        for c in cases:
            row = [c]
            for i in impls:
                r = idx.get((c, pass_, i))
                row.append(_ms(r["median_s"]) if r else "-")
            for a, b in cols:
                ra, rb = idx.get((c, pass_, a)), idx.get((c, pass_, b))
                if ra and rb:
                    ratios[a, b].append(ra["median_s"] / rb["median_s"])
                    row.append(_fmt_ratio(a, ratios[a, b][-1]))
                else:
                    row.append("-")
            out.append("| " + " | ".join(row) + " |")
        meds = [
            "**%s**" % _fmt_ratio(a, float(np.median(v))) if v else ""
            for (a, _), v in ratios.items()
        ]
        out.append("| **median** |" + " |" * len(impls) + " " + " | ".join(meds) + " |")
        out.append("")
    return "\n".join(out)


def format_run(doc):
    """The tables of a run recorded with ``--json``, whichever kind: the grid's
    (format_markdown), a --load run's (format_load) or a --fused run's (format_fused)."""
    if isinstance(doc, dict):
        if "results" in doc:
            return format_markdown(doc)
        if "load" in doc:
            return format_load(doc["load"])
        if "fused" in doc:
            return format_fused(doc["fused"])
    raise ValueError("not a run recorded by python -m bnkernels bench --json")


_COLORS = {
    "alt": "#999999",
    "bnkernels": "#d62728",
    "torch": "#1f77b4",
    "graph": "#555555",
    "reference": "#555555",
}


def plot(records, cases, torch_on, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = _index(records)
    names = [c.name for c in cases]
    panels = [
        (
            "backward",
            "speedup over graph (reference.backward_graph)",
            ["alt", "bnkernels", "torch"],
            "graph",
            False,
        ),
        (
            "backward",
            "time / roofline (read 2 arrays, write 1)",
            ["bnkernels", "torch"],
            "roofline",
            True,
        ),
        (
            "forward",
            "forward speedup over reference.forward",
            ["bnkernels", "torch"],
            "reference",
            False,
        ),
        (
            "forward",
            "forward time / roofline (read 1 array, write 1)",
            ["bnkernels", "torch"],
            "roofline",
            True,
        ),
    ]
    n = len(names)
    fig, axes = plt.subplots(
        2, 2, figsize=(15, 2.2 + 0.42 * n * 2), squeeze=False, layout="constrained"
    )
    for ax, (pass_, label, impls, ref, over) in zip(axes.ravel(), panels):
        impls = [i for i in impls if torch_on or i != "torch"]
        h = 0.8 / len(impls)
        ypos = np.arange(n)
        for k, impl in enumerate(impls):
            vals = []
            for name in names:
                a, b = idx.get((name, pass_, impl)), idx.get((name, pass_, ref))
                if a is None or b is None:
                    vals.append(np.nan)
                else:
                    # speedup: ref/impl; distance to the roofline: impl/roofline
                    vals.append(
                        a["median_s"] / b["median_s"] if over else b["median_s"] / a["median_s"]
                    )
            y = ypos - 0.4 + h * (k + 0.5)
            bars = ax.barh(y, vals, height=h * 0.92, color=_COLORS[impl], label=impl)
            for bar, v in zip(bars, vals):
                if np.isfinite(v) and impl == "bnkernels":
                    ax.text(
                        bar.get_width() * 1.04,
                        bar.get_y() + bar.get_height() / 2,
                        "%.2gx" % v if v < 10 else "%.0fx" % v,
                        va="center",
                        fontsize=8,
                        bbox=dict(facecolor="white", edgecolor="none", pad=0.5, alpha=0.8),
                    )
        ax.set_xscale("log")
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set_yticks(ypos, names, fontsize=9)
        ax.invert_yaxis()
        ax.set_title(label, fontsize=11)
        ax.set_xlabel(
            "time / roofline (1 = at the roofline; lower is better)"
            if over
            else "speedup (higher is better)"
        )
        ax.grid(axis="x", which="both", alpha=0.3)
        lo, hi = ax.get_xlim()
        ax.set_xlim(min(lo, 0.5), hi * 1.6)  # room for the value labels
    # one legend for all panels, below them, where it hides no bar
    handles = {}
    for ax in axes.ravel():
        for hnd, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, hnd)
    fig.suptitle(title, fontsize=12)
    try:
        fig.legend(
            handles.values(),
            handles.keys(),
            loc="outside lower center",
            ncol=len(handles),
            fontsize=10,
        )
    except ValueError:  # matplotlib < 3.7 has no 'outside' placement
        axes[0, 0].legend(handles.values(), handles.keys(), loc="best", fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------


def _positive_int(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError("expected a positive integer, got %r" % s) from None
    if v < 1:
        raise argparse.ArgumentTypeError("expected a positive integer, got %d" % v)
    return v


def _unwritable(path):
    """Why a file cannot be written at ``path`` (without creating it), or None."""
    if os.path.isdir(path):
        return "it is a directory"
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return "no directory %s" % folder
    if os.path.exists(path):
        return None if os.access(path, os.W_OK) else "the file is not writable"
    return None if os.access(folder, os.W_OK | os.X_OK) else "%s is not writable" % folder


# --load: calls from the smallest (a CS231n layer) to the grid's medium cases
LOAD_CASES = (
    Case("2d-50x100-f64", "2d", (50, 100), "float64"),
    Case("2d-1000x100-f64", "2d", (1000, 100), "float64"),
    Case("nchw-32x64x28x28-f32", "nchw", (32, 64, 28, 28), "float32"),
    Case("nhwc-32x28x28x64-f32", "nhwc", (32, 28, 28, 64), "float32"),
    Case("2d-4096x512-f32", "2d", (4096, 512), "float32"),
)
LOAD_SECONDS = 2.0  # per case, pass and thread setting: enough calls for a 99th percentile
LOAD_MIN_CALLS = 100


def _percentiles(fn, seconds, min_calls):
    """Warm up, then call fn() for `seconds` (at least min_calls times): (p50, p99, calls)."""
    fn()
    times = []
    end = time.perf_counter() + seconds
    with _no_gc():
        while len(times) < min_calls or time.perf_counter() < end:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    p50, p99 = np.percentile(times, [50, 99])
    return float(p50), float(p99), len(times)


def _busy_processes(n):
    """n processes that each keep a core busy (stopped by the caller)."""
    return [
        subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL)
        for _ in range(n)
    ]


def _spin(seconds):
    """Keep this thread busy for `seconds` of wall time: the time a call of that length takes
    when nothing but the scheduler stands in its way."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _load_calls(case):
    """{pass: make(nt) -> a call of that pass on nt threads (None: the default)} for case;
    forward has no num_threads, so its only settings are 1 (set through OpenMP) and None.
    'roofline' is a control: the backward's memory traffic on one thread, with no team
    and no barrier.  The other control, 'spin' (added by run_load), keeps one thread busy
    for as long as the quiet single-thread backward takes: what any computation of that
    length sees on the busy machine."""
    data = CaseData(case)
    x, dy, g, b, axis = data.x, data.dy, data.gamma, data.beta, case.axis
    param = {"mode": "train", "eps": EPS}
    cache = bnkernels.forward(x, g, b, param, axis=axis)[1]

    def backward(nt):
        return lambda: bnkernels.backward(dy, cache, num_threads=nt)

    def forward(nt):
        return lambda: bnkernels.forward(x, g, b, param, axis=axis)

    def roofline(nt):
        return lambda: _kernels.stream_add(x, dy, np.empty_like(x), 1)

    return {"backward": backward, "forward": forward, "roofline": roofline}


def run_load(n_busy, cases, seconds):
    """Per case and pass: the single-thread median on the quiet machine, then p50 and p99
    with n_busy busy processes for one thread, every usable core (backward), and the
    default, which leaves out the CPUs busy with other tasks; the controls (roofline, and a
    spin as long as the quiet backward) on one thread only."""
    cores = usable_cores()
    records = []
    for case in cases:
        calls = _load_calls(case)
        spin_for = []  # the quiet single-thread backward's median, once measured
        calls["spin"] = lambda nt, quiet=spin_for: lambda: _spin(quiet[0])
        for pass_, make in calls.items():
            settings = [("1", 1)]
            if pass_ == "backward":
                settings.append((str(cores), cores))
            if pass_ not in ("roofline", "spin"):
                settings.append(("default", None))
            with openmp_limit(1):
                quiet = _percentiles(make(1), seconds / 2, LOAD_MIN_CALLS // 2)[0]
            if pass_ == "backward":
                spin_for.append(quiet)
            busy = _busy_processes(n_busy)
            try:
                time.sleep(0.2)  # let them start
                for label, nt in settings:
                    with (
                        openmp_limit(nt) if pass_ == "forward" and nt else contextlib.nullcontext()
                    ):
                        p50, p99, calls = _percentiles(make(nt), seconds, LOAD_MIN_CALLS)
                    records.append(
                        {
                            "case": case.name,
                            "shape": list(case.shape),
                            "dtype": case.dtype,
                            "pass": pass_,
                            "threads": label,
                            "busy": n_busy,
                            "quiet_1_thread_median_s": quiet,
                            "p50_s": p50,
                            "p99_s": p99,
                            "calls": calls,
                        }
                    )
                    _progress(
                        "%-22s %-8s threads %-7s p50 %8.3f ms  p99 %8.3f ms  (quiet, 1 thread"
                        " %.3f ms)" % (case.name, pass_, label, p50 * 1e3, p99 * 1e3, quiet * 1e3)
                    )
            finally:
                for proc in busy:
                    proc.kill()
                for proc in busy:
                    proc.wait()
    return records


def format_load(records):
    """The --load table: per case, pass and thread setting, p50 and p99 against the quiet
    single-thread median."""
    lines = [
        "under load (%d busy processes), ms:" % records[0]["busy"],
        "%-22s %-8s %-8s %9s %9s %9s %9s"
        % ("case", "pass", "threads", "quiet 1t", "p50", "p99", "p99/q1t"),
    ]
    for r in records:
        q = r["quiet_1_thread_median_s"]
        lines.append(
            "%-22s %-8s %-8s %9.3f %9.3f %9.3f %9.1f"
            % (
                r["case"],
                r["pass"],
                r["threads"],
                q * 1e3,
                r["p50_s"] * 1e3,
                r["p99_s"] * 1e3,
                r["p99_s"] / q,
            )
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# --fused: the fused epilogue against the unfused sequence
# ---------------------------------------------------------------------------

FUSED_CASES = (
    "2d-large-f32",
    "nchw-32x64x56x56-f32",
    "nhwc-32x56x56x64-f32",
    "nchw-64x256x14x14-f64",
    "nchw-32x64x56x56-f16",
)


def fused_fns(data, threads):
    """{(pass, impl): callable}: a residual block's batch norm, add and ReLU, fused in one
    bnkernels call or as bnkernels then NumPy (in place: the least traffic NumPy allows).
    Ideal traffic in arrays of the input's size: forward fused 3 (x, residual in; out),
    unfused 5 (x in, out; out and residual in, out); backward fused 5 (dout, out, x in;
    dx, dresidual), unfused 6 (dout, out in, masked dout; it and x in, dx)."""
    x, g, b, ax = data.x, data.gamma, data.beta, data.case.axis
    dout = data.dy
    rng = np.random.default_rng(zlib.crc32(b"residual" + data.case.name.encode()))
    residual = _normal(rng, data.case.shape, x.dtype)
    param = data._param

    def fwd_fused():
        return bnkernels.forward(x, g, b, param(), axis=ax, activation="relu", residual=residual)

    def fwd_unfused():
        out, cache = bnkernels.forward(x, g, b, param(), axis=ax)
        out += residual
        np.maximum(out, 0, out=out)
        return out, cache

    out_f, cache_f = fwd_fused()
    out_u, cache_u = fwd_unfused()

    def bwd_unfused():
        dy = np.multiply(dout, out_u > 0)  # the ReLU's gradient, which is the residual's
        dx, dgamma, dbeta = bnkernels.backward(dy, cache_u, num_threads=threads)
        return dx, dgamma, dbeta, dy

    return {
        ("forward", "unfused"): fwd_unfused,
        ("forward", "fused"): fwd_fused,
        ("backward", "unfused"): bwd_unfused,
        ("backward", "fused"): lambda: bnkernels.backward(dout, cache_f, num_threads=threads),
    }


def run_fused(cases, threads, budget):
    """Records of the fused and unfused sequences per case and pass, taking turns."""
    records = []
    for case in cases:
        _progress("fused %s ..." % case.name)
        fns = fused_fns(CaseData(case), threads)
        with openmp_limit(threads):
            for pass_ in ("forward", "backward"):
                timings = measure_turns(
                    {impl: fn for (p, impl), fn in fns.items() if p == pass_}, budget
                )
                for impl, t in timings.items():
                    records.append(_record(case, pass_, impl, threads, t))
    return records


def format_fused(records):
    rows = [
        "fused epilogue (batch norm + residual add + ReLU): median ms, unfused/fused > 1: "
        "fusing is faster"
    ]
    rows.append("%-24s %-8s %9s %9s %14s" % ("case", "pass", "unfused", "fused", "unfused/fused"))
    by = {(r["case"], r["pass"], r["impl"]): r["median_s"] for r in records}
    for case, pass_ in dict.fromkeys((r["case"], r["pass"]) for r in records):
        u, f = by[(case, pass_, "unfused")], by[(case, pass_, "fused")]
        rows.append("%-24s %-8s %9.3g %9.3g %14.2f" % (case, pass_, u * 1e3, f * 1e3, u / f))
    return "\n".join(rows) + "\n"


def _write_json(path, doc):
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    _progress("wrote %s" % path)


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m bnkernels bench",
        description="Time bnkernels' batch-norm backward and forward against the NumPy "
        "reference, PyTorch (when installed) and a memory roofline.",
        epilog="cases: " + ", ".join(c.name for c in CASES),
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a few small cases and fewer repeats (well under a minute); with "
        "--cases, the matching cases with fewer repeats",
    )
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        metavar="N",
        help="threads for every implementation (default: the OpenMP default, %d)"
        % _kernels.max_threads(),
    )
    p.add_argument(
        "--cases",
        metavar="PATTERN",
        help="comma-separated fnmatch patterns or substrings of case names, "
        "e.g. '2d-*-f32' or nhwc",
    )
    p.add_argument(
        "--load",
        type=_positive_int,
        metavar="N",
        help="start N busy processes for the run (stopped after it) and report p50 and p99 "
        "call times per case and thread setting, and of the roofline on one thread as the "
        "control (cases: %s)" % ", ".join(c.name for c in LOAD_CASES),
    )
    p.add_argument(
        "--fused",
        action="store_true",
        help="time the fused epilogue (activation='relu', residual=...) against bnkernels "
        "followed by NumPy's add and ReLU, both passes (cases: %s)" % ", ".join(FUSED_CASES),
    )
    p.add_argument("--json", metavar="PATH", help="write every measurement and the machine as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of speedups and roofline distances")
    p.add_argument(
        "--markdown",
        metavar="JSON",
        help="print the tables of a run recorded with --json, run nothing: the grid's in "
        "Markdown, those of --load and --fused runs as the runs printed them",
    )
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.markdown:
        try:
            with open(args.markdown) as f:
                text = format_run(json.load(f))
        except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
            parser.error("--markdown %s: %s" % (args.markdown, e))
        print(text, end="")
        return 0
    # the output paths are checked now, not after a run of many minutes
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        problem = path and _unwritable(path)
        if problem:
            parser.error("%s %s cannot be written: %s" % (option, path, problem))
    omp_default = _kernels.max_threads()  # read before torch can change the OpenMP default
    if args.load:
        cases = select_cases(args.cases, LOAD_CASES) if args.cases else list(LOAD_CASES)
        if not cases:
            parser.error("no --load case matches %r" % (args.cases,))
        seconds = LOAD_SECONDS / 4 if args.quick else LOAD_SECONDS
        date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        records = run_load(args.load, cases, seconds)
        print(format_load(records), end="")
        if args.json:
            doc = {"date": date, "machine": machine_info(None, omp_default), "load": records}
            _write_json(args.json, doc)
        return 0
    threads = args.threads or omp_default
    if args.fused:
        names = [c.name for c in select_cases(args.cases)] if args.cases else FUSED_CASES
        cases = [c for c in CASES if c.name in names]
        if not cases:
            parser.error("no case matches %r" % (args.cases,))
        date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        records = run_fused(cases, threads, QUICK if args.quick else FULL)
        print(format_fused(records), end="")
        if args.json:
            doc = {
                "date": date,
                "machine": machine_info(None, omp_default),
                "threads": threads,
                "fused": records,
            }
            _write_json(args.json, doc)
        return 0
    if args.cases:
        cases = select_cases(args.cases)
        if not cases:
            parser.error(
                "no case matches %r (cases: %s)" % (args.cases, ", ".join(c.name for c in CASES))
            )
    else:
        cases = [c for c in CASES if not args.quick or c.name in QUICK_CASES]
    budget = QUICK if args.quick else FULL
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib (pip install matplotlib)")

    torch = import_torch()
    notes = []
    if torch is None:
        notes.append("torch not installed: its columns are left out")
    if not have_threadpoolctl():
        notes.append(
            "threadpoolctl not installed: bnkernels.forward runs with the OpenMP "
            "default (%d threads), not --threads" % omp_default
        )
    if not _kernels.openmp_enabled():
        notes.append("bnkernels was built without OpenMP: it runs on one thread")
    load_start = load_average()
    if load_start is not None and load_start > 0.5 * usable_cores():
        # other work competing for the cores stalls OpenMP threads at every barrier
        notes.append(
            "the machine was busy (load average %.1f on %d cores): timings are noisy, "
            "multi-threaded ones most" % (load_start, usable_cores())
        )
    for n in notes:
        _progress("note: " + n)

    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    started = time.perf_counter()
    records, scaling = [], []
    _set_torch_threads(torch, threads)
    for k, case in enumerate(cases, 1):
        t0 = time.perf_counter()
        _progress(
            "[%2d/%d] %-24s %7.1f MiB per array ..."
            % (k, len(cases), case.name, case.nbytes / 2**20)
        )
        data = CaseData(case)
        records += run_case(data, threads, torch, budget)
        del data
        _progress("        done in %.1f s" % (time.perf_counter() - t0))

    cores = usable_cores()
    if cores > 1:
        for case in _scaling_cases(cases, args.quick):
            _progress("scaling %s: 1 and %d threads ..." % (case.name, cores))
            scaling += run_scaling(CaseData(case), (1, cores), budget)
    elapsed = time.perf_counter() - started

    info = machine_info(torch, omp_default)
    info["load_average_start"], info["load_average_end"] = load_start, load_average()
    print(
        "bnkernels %s, numpy %s, torch %s; %s, %d cores; threads=%d%s"
        % (
            info["bnkernels"],
            info["numpy"],
            info["torch"] or "not installed",
            info["cpu"],
            info["usable_cores"],
            threads,
            "" if info["openmp"] else " (bnkernels without OpenMP)",
        )
    )
    print()
    print(format_tables(records, cases, torch is not None), end="")
    if scaling:
        print(format_scaling(scaling), end="")
    elif cores <= 1:
        print("thread scaling: skipped, one usable core")
    for n in notes:
        print("note: " + n)
    print("(%d case%s in %.0f s)" % (len(cases), "" if len(cases) == 1 else "s", elapsed))

    if args.json:
        doc = {
            "date": date,
            "elapsed_s": round(elapsed, 1),
            "machine": info,
            "settings": {
                "threads": threads,
                "quick": args.quick,
                "cases": args.cases,
                "budget_s": budget.seconds,
                "min_repeats": budget.min_repeats,
                "max_repeats": budget.max_repeats,
            },
            "notes": notes
            + ["graph, alt and reference are NumPy code: single-threaded whatever 'threads' says"],
            "results": records,
            "scaling": scaling,
        }
        _write_json(args.json, doc)
    if args.plot:
        plot(
            records,
            cases,
            torch is not None,
            args.plot,
            "bnkernels %s: %s, threads=%d, %s"
            % (info["bnkernels"], info["cpu"], threads, date[:10]),
        )
        _progress("wrote %s" % args.plot)
    return 0
