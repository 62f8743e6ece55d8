"""Reports of a recorded benchmark run: README's summary, docs/bench.md, the targets.

    python bench/report.py --write           # README's bench block and docs/bench.md
    python bench/report.py                   # print both
    python bench/report.py --targets [--before OLD.json]   # the performance targets

The run is docs/bench.json unless another JSON is given, as written by
``python -m bnkernels bench --json docs/bench.json``.  tests/test_readme_bench.py fails
when README's block or docs/bench.md differs from what docs/bench.json produces, so every
number in them comes from a recorded run.
"""

import argparse
import json
import os
import sys
from math import prod

import numpy as np

from bnkernels import _bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "docs", "bench.json")
README = os.path.join(ROOT, "README.md")
BENCH_MD = os.path.join(ROOT, "docs", "bench.md")
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
GENERATED = "<!-- generated from docs/bench.json by `python bench/report.py --write` -->"

BIG_BYTES = 8 << 20  # the roofline ratios are taken over cases whose arrays take this or more
# (pass, numerator, denominator, statistic, cases, target, sense): the performance targets
# the physical limit and no peer faster, on every machine: both passes at most 1.3x the
# roofline in median (1.6 at worst) over the 8 MiB+ cases, never slower than PyTorch and 1.5x
# faster in median, backward 8x the NumPy alt in median
TARGETS = (
    ("backward", "alt", "bnkernels", "median", "all", 8.0, ">="),
    ("backward", "torch", "bnkernels", "median", "all", 1.5, ">="),
    ("backward", "torch", "bnkernels", "min", "all", 1.0, ">="),
    ("backward", "bnkernels", "roofline", "median", "big", 1.3, "<="),
    ("backward", "bnkernels", "roofline", "max", "big", 1.6, "<="),
    ("forward", "torch", "bnkernels", "median", "all", 1.5, ">="),
    ("forward", "torch", "bnkernels", "min", "all", 1.0, ">="),
    ("forward", "bnkernels", "roofline", "median", "big", 1.3, "<="),
    ("forward", "bnkernels", "roofline", "max", "big", 1.6, "<="),
)
# the summary's columns: (numerator, denominator, big cases only)
SUMMARY = (
    ("torch", "bnkernels", False),
    ("bnkernels", "roofline", True),
    ("alt", "bnkernels", False),
)


def ratios(results, pass_, a, b, big_only=False):
    """{case: median time of a / median time of b} for one pass."""
    idx = {(r["case"], r["pass"], r["impl"]): r for r in results}
    out = {}
    for r in results:
        if r["pass"] != pass_ or r["impl"] != a:
            continue
        if big_only and prod(r["shape"]) * np.dtype(r["dtype"]).itemsize < BIG_BYTES:
            continue
        rb = idx.get((r["case"], pass_, b))
        if rb:
            out[r["case"]] = r["median_s"] / rb["median_s"]
    return out


def _stat(values, how):
    return {"median": float(np.median(values)), "min": min(values), "max": max(values)}[how]


def _median_range(a, values):
    """'median (min–max)' of ratios over a."""
    stats = (_stat(values, how) for how in ("median", "min", "max"))
    return "%s (%s–%s)" % tuple(_bench._fmt_ratio(a, x) for x in stats)


def _when(doc):
    return doc["date"][:16].replace("T", " ") + " UTC"


def machine_line(doc):
    """The machine and software of a run, in one line."""
    m, s = doc["machine"], doc.get("settings", {})
    return "%s, %s cores, %s threads, %s; bnkernels %s, NumPy %s, PyTorch %s" % (
        m["cpu"],
        m.get("usable_cores", m["cores"]),
        s.get("threads", m.get("openmp_default_threads")),
        _when(doc),
        m["bnkernels"],
        m["numpy"],
        m.get("torch") or "not installed",
    )


def summary(doc):
    """README's compact table: per pass, the median (min-max) of each ratio over the cases."""
    results = doc["results"]
    cases = list(dict.fromkeys(r["case"] for r in results))
    big = [c for c in cases if ratios(results, "backward", "bnkernels", "roofline", True).get(c)]
    head = ["pass"] + [
        "%s/%s%s" % (a, b, " (%d MiB+)" % (BIG_BYTES >> 20) if big_only else "")
        for a, b, big_only in SUMMARY
    ]
    out = [
        GENERATED,
        "%s ([per case](docs/bench.md)):" % machine_line(doc),
        "",
        "| " + " | ".join(head) + " |",
        "|---|" + "---:|" * len(SUMMARY),
    ]
    for pass_ in ("backward", "forward"):
        cells = []
        for a, b, big_only in SUMMARY:
            v = list(ratios(results, pass_, a, b, big_only).values())
            cells.append(_median_range(a, v) if v else "–")
        out.append("| %s | %s |" % (pass_, " | ".join(cells)))
    out += [
        "",
        "Median (min–max) over the %d cases; bnkernels/roofline over the %d whose arrays take "
        "%d MiB or more. x/bnkernels above 1: bnkernels is faster; bnkernels/roofline 1.00: at "
        "the memory roofline." % (len(cases), len(big), BIG_BYTES >> 20),
    ]
    return "\n".join(out) + "\n"


def readme_block(doc):
    """The text between README's bench markers."""
    return "\n" + summary(doc)


def bench_md(doc):
    """docs/bench.md: every case of the run."""
    return "\n".join(
        [
            "# Benchmark: every case",
            "",
            GENERATED,
            "",
            "The run recorded in `docs/bench.json` (`python -m bnkernels bench --json "
            "docs/bench.json`): %s. Build flags: `%s`. The implementations and the method: "
            "`python -m bnkernels bench --help` and the docstring of `bnkernels/_bench.py`; "
            "the summary: README, Performance."
            % (machine_line(doc), doc["machine"]["build_flags"]),
            "",
            _bench.format_markdown(doc),
        ]
    )


def format_targets(doc, before=None):
    """The targets met or not, by this run and, with ``before``, by an earlier one."""
    runs = [("this run", doc)] + ([("before", before)] if before else [])
    torch_on = any(r["impl"] == "torch" for r in doc["results"])
    out = [
        "Targets (the roofline ones over the cases whose arrays take %d MiB or more):"
        % (BIG_BYTES >> 20),
        "",
        "| pass | ratio | statistic | target | "
        + " | ".join("%s (%s)" % (name, _when(d)) for name, d in runs)
        + " |",
        "|---|---|---|---:|" + "---:|" * len(runs),
    ]
    short = _bench.SHORT
    for pass_, a, b, how, which, target, sense in TARGETS:
        if "torch" in (a, b) and not torch_on:
            continue
        cells = []
        for _, d in runs:
            v = list(ratios(d["results"], pass_, a, b, which == "big").values())
            if not v:
                cells.append("-")
                continue
            x = _stat(v, how)
            ok = x >= target if sense == ">=" else x <= target
            cells.append("%s %s" % (_bench._fmt_ratio(a, x), "met" if ok else "not met"))
        out.append(
            "| %s | %s/%s | %s%s | %s %s | %s |"
            % (
                pass_,
                short.get(a, a),
                short.get(b, b),
                how,
                " (%d MiB+)" % (BIG_BYTES >> 20) if which == "big" else "",
                sense,
                _bench._fmt_ratio(a, target),
                " | ".join(cells),
            )
        )
    return "\n".join(out) + "\n"


def read_block(text):
    """The text between README's bench markers."""
    i, j = text.index(START) + len(START), text.index(END)
    if i > j:
        raise ValueError("README's bench markers are out of order")
    return text[i:j]


def _load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write(doc, readme=README, bench_md_path=BENCH_MD):
    """Put the summary between README's markers and every case in docs/bench.md."""
    with open(readme, encoding="utf-8") as f:
        text = f.read()
    i = text.index(START) + len(START)
    new = text[:i] + readme_block(doc) + text[text.index(END) :]
    for path, content, old in ((readme, new, text), (bench_md_path, bench_md(doc), None)):
        if old is None and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                old = f.read()
        if content != old:
            with open(path, "w", encoding="utf-8") as f:
                f.write(content)
            print("wrote %s" % os.path.relpath(path))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", nargs="?", default=RUN, help="a recorded run (default docs/bench.json)")
    p.add_argument("--write", action="store_true", help="write README's block and docs/bench.md")
    p.add_argument("--targets", action="store_true", help="print the performance targets")
    p.add_argument("--before", metavar="JSON", help="with --targets: an earlier run beside it")
    args = p.parse_args(argv)
    if args.before and not args.targets:
        p.error("--before goes with --targets")
    doc = _load(args.run)
    if args.targets:
        sys.stdout.write(format_targets(doc, _load(args.before) if args.before else None))
    elif args.write:
        write(doc)
    else:
        sys.stdout.write(readme_block(doc) + "\n" + bench_md(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
