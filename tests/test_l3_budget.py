"""The L3 size the plans assume: detected, or pinned with BNKERNELS_L3_BYTES.

It decides only the planar L3 share and the streaming stores, neither of which changes a
bit of the results; the rows plans do not depend on it.  Which machine runs the suite
decides the size, so these tests run in child processes with it pinned.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from bnkernels import _kernels, _machine

MiB = 1 << 20


def _child(code, l3):
    env = dict(os.environ)
    if l3 is None:
        env.pop("BNKERNELS_L3_BYTES", None)
    else:
        env["BNKERNELS_L3_BYTES"] = str(l3)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    return proc


PLAN = """
    import json
    from bnkernels import _kernels
    print(json.dumps([_kernels.L3_BYTES, _kernels.STREAM_OUTPUT_BYTES,
                      _kernels.rows_plan(2048, 1024, 4, 2), _kernels.rows_plan(4096, 1024, 4, 1)]))
"""


@pytest.mark.parametrize("l3", [0, 8 * MiB, 32 * MiB - 1, 32 * MiB, 64 * MiB])
def test_tall_rows_are_chunked_full_rows_whatever_the_l3(l3):
    got_l3, stream, bwd, fwd = json.loads(_child(PLAN, l3).stdout)
    assert got_l3 == l3 and stream == min(l3 or 16 * MiB, 16 * MiB)
    for cb, n_blocks, _chunk, n_chunks in (bwd, fwd):
        assert cb == 1024 and n_blocks == 1 and n_chunks > 1


def test_unset_means_detected():
    got_l3, _, _, _ = json.loads(_child(PLAN, None).stdout)
    assert got_l3 == _kernels.cache_bytes()[1]


@pytest.mark.parametrize("bad", ["abc", "-5", "1.5e6"])
def test_bad_value_is_ignored_with_a_warning(bad):
    proc = _child(PLAN, bad)
    got_l3 = json.loads(proc.stdout)[0]
    assert got_l3 == _kernels.cache_bytes()[1]
    assert "BNKERNELS_L3_BYTES" in proc.stderr and "RuntimeWarning" in proc.stderr


RESULTS = """
    import numpy as np
    import bnkernels
    from bnkernels import _kernels, reference

    def rel(a, b):
        return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))

    rng = np.random.default_rng(5)
    for shape, dtype, tol in [((2048, 1024), np.float32, 1e-5), ((1024, 700), np.float64, 1e-12),
                              ((600, 24, 7, 7), np.float32, 1e-5)]:
        x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        C = shape[1]
        g = rng.uniform(0.5, 1.5, C).astype(dtype)
        b = rng.standard_normal(C).astype(dtype)
        outs = []
        for nt in (1, 2, 3):
            out, cache = bnkernels.forward(x, g, b, {"mode": "train"})
            grads = bnkernels.backward(dy, cache, num_threads=nt)
            outs.append((out,) + tuple(grads))
        for other in outs[1:]:
            assert all(np.array_equal(u, v) for u, v in zip(outs[0], other)), shape
        ref_out, ref_cache = reference.forward(x.astype(np.float64), g.astype(np.float64),
                                               b.astype(np.float64), {"mode": "train"})
        ref = reference.backward_alt(dy.astype(np.float64), ref_cache)
        errs = [rel(outs[0][0], ref_out)] + [rel(u, v) for u, v in zip(outs[0][1:], ref)]
        assert max(errs) < tol, (shape, errs)
    print(_kernels.L3_BYTES)
"""


@pytest.mark.parametrize("l3", [32 * MiB, 8 * MiB])
def test_results_either_way(l3):
    # (2048, 1024) float32 and (1024, 700) float64 in chunked full rows, (600, 24, 7, 7) as
    # rows of C*L columns, streamed or not
    assert int(_child(RESULTS, l3).stdout) == l3


PLANAR = """
    import hashlib
    import numpy as np
    import bnkernels
    from bnkernels import reference

    digest = hashlib.sha256()
    rng = np.random.default_rng(6)
    # NCHW channels longer than one L2-sized task: chunked; with a large enough L3 each
    # thread runs both sweeps of a channel back to back, with the same chunk sums
    for shape, dtype, tol in [((2, 16, 300, 300), np.float64, 1e-12),
                              ((3, 9, 230, 251), np.float32, 1e-5)]:
        x = (rng.standard_normal(shape) * 2 - 4).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        C = shape[1]
        g = rng.uniform(0.5, 1.5, C).astype(dtype)
        b = rng.standard_normal(C).astype(dtype)
        for nt in (1, 2, 3):
            out, cache = bnkernels.forward(x, g, b, {"mode": "train"})
            dx, dgamma, dbeta = bnkernels.backward(dy, cache, num_threads=nt)
            for a in (out, dx, dgamma, dbeta, cache["mean"], cache["invstd"]):
                digest.update(np.ascontiguousarray(a).tobytes())
        ref_out, ref_cache = reference.forward(x.astype(np.float64), g.astype(np.float64),
                                               b.astype(np.float64), {"mode": "train"})
        ref = reference.backward_alt(dy.astype(np.float64), ref_cache)
        for got, want in zip((out, dx, dgamma, dbeta), (ref_out,) + tuple(ref)):
            assert np.max(np.abs(got - want)) <= tol * np.max(np.abs(want)), shape
    print(digest.hexdigest())
"""


def test_planar_bits_do_not_depend_on_the_l3_size():
    # the L3 size changes only which thread runs which chunk when, never the sums
    digests = {_child(PLANAR, l3).stdout.strip() for l3 in (0, 8 * MiB, 64 * MiB)}
    assert len(digests) == 1


@pytest.mark.parametrize("bad", ["99999999999999999999", str(2**62 + 1)])
def test_too_large_value_is_ignored_with_a_warning(bad):
    proc = _child(PLAN, bad)
    assert json.loads(proc.stdout)[0] == _kernels.cache_bytes()[1]
    assert "BNKERNELS_L3_BYTES" in proc.stderr and "RuntimeWarning" in proc.stderr


@pytest.mark.parametrize(
    "text, value",
    [
        ("512K", 512 << 10),
        ("8192K\n", 8 << 20),
        ("32M", 32 << 20),
        ("1G", 1 << 30),
        ("4096", 4096),
        ("", None),
        ("0K", None),
        ("-5K", None),
        ("8MB", None),
        ("1.5M", None),
        ("99999999999G", None),
    ],
)
def test_sysfs_size_parsing(text, value):
    assert _machine.sysfs_size(text) == value


def _fake_cache(root, entries):
    for i, (level, kind, size) in enumerate(entries):
        d = root / ("index%d" % i)
        d.mkdir()
        for name, text in (("level", level), ("type", kind), ("size", size)):
            if text is not None:
                (d / name).write_text(text + "\n")
    return str(root)


def test_sysfs_decides_and_bad_entries_are_skipped(tmp_path):
    # an unreadable L1 entry must not send the lookup to the C library, whose L3 may be the
    # whole package's
    base = _fake_cache(
        tmp_path,
        [
            ("1", "Data", None),
            ("1", "Instruction", "64K"),
            ("2", "Unified", "oops"),
            ("3", "Unified", "8192K"),
        ],
    )
    assert _machine.cache_bytes(3, base) == 8 << 20
    assert _machine.cache_bytes(2, base) == 0


def test_no_l3_in_sysfs_means_unknown(tmp_path):
    base = _fake_cache(tmp_path, [("1", "Data", "32K"), ("2", "Unified", "1024K")])
    assert _machine.cache_bytes(3, base) == 0
    assert _machine.cache_bytes(2, base) == 1 << 20


def test_without_sysfs_the_c_library_answers(tmp_path):
    value = _machine.cache_bytes(3, str(tmp_path / "missing"))
    assert isinstance(value, int) and 0 <= value <= 2**62


STREAMED = """
    import hashlib
    import numpy as np
    import bnkernels
    from bnkernels import _kernels

    digest = hashlib.sha256()
    rng = np.random.default_rng(7)
    # float64 (the dtype that streams): rows of odd widths (tasks start mid-line), rows in
    # chunks, NCHW planes whose runs are not whole lines, channels-last; both modes
    for shape, axis in [((300, 37), 1), ((5000, 203), 1), ((3, 5, 41, 43), 1),
                        ((2, 3, 300, 301), 1), ((6, 9, 11, 13), -1)]:
        x = rng.standard_normal(shape) * 3 - 1
        dy = rng.standard_normal(shape)
        C = shape[axis]
        g, b = rng.uniform(0.5, 1.5, C), rng.standard_normal(C)
        for nt in (1, 2):
            out, cache = bnkernels.forward(x, g, b, {"mode": "train"}, axis=axis)
            dx, dgamma, dbeta = bnkernels.backward(dy, cache, num_threads=nt)
            p = {"mode": "test", "running_mean": cache["mean"], "running_var": cache["var"]}
            out_test, _ = bnkernels.forward(x, g, b, p, axis=axis)
            for a in (out, dx, dgamma, dbeta, out_test):
                digest.update(np.ascontiguousarray(a).tobytes())
    print(_kernels.STREAM_OUTPUT_BYTES, digest.hexdigest())
"""


def test_streaming_stores_give_the_same_bits():
    # BNKERNELS_L3_BYTES=1: every float64 output is written with streaming stores; 16 MiB:
    # none of these is
    (on, d_on), (off, d_off) = (_child(STREAMED, l3).stdout.split() for l3 in (1, 16 * MiB))
    assert (int(on), int(off)) == (1, 16 * MiB)
    assert d_on == d_off


@pytest.mark.parametrize(
    "l3, threshold",
    # 16 MiB, or a smaller L3; a larger reported L3 (a shared VM's) or an unknown one: 16 MiB
    [(8 * MiB, 8 * MiB), (16 * MiB, 16 * MiB), (32 * MiB, 16 * MiB), (0, 16 * MiB)],
)
def test_stream_threshold_is_16_mib_or_a_smaller_l3(l3, threshold):
    code = "from bnkernels import _kernels; print(_kernels.STREAM_OUTPUT_BYTES)"
    assert _kernels.STREAM_CAP_BYTES == 16 * MiB
    assert int(_child(code, l3).stdout) == threshold
