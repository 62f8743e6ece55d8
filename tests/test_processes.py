"""Kernel calls in forked processes, and the cap on threads.

GNU OpenMP's thread pool does not survive fork(): after one multi-threaded call in the
parent, a multi-threaded call in a forked child waits forever for threads that do not exist.
The face runs every call of a forked process (and of its descendants) on one thread, which
enters no OpenMP region.  And it caps every thread count at the CPUs the process may use.

Every scenario runs in a fresh interpreter under a timeout, so a regression fails the test
instead of hanging it.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

import bnkernels
from bnkernels import _api as _api_module

_BUSY_CPUS = _api_module._busy_cpus

pytestmark = pytest.mark.skipif(
    not hasattr(os, "fork") or not os.path.isdir("/proc/self/task"),
    reason="needs os.fork and Linux's /proc/self/task",
)

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(bnkernels.__file__)))
TIMEOUT = 60

# The parent makes its results with several threads (the OpenMP default, and 4 asked for),
# which starts GNU OpenMP's pool; then the scenario forks.
PRELUDE = """
import os, sys, traceback
import numpy as np
import bnkernels

def threads():
    return len(os.listdir("/proc/self/task"))

MULTI = bnkernels.openmp_enabled() and len(os.sched_getaffinity(0)) >= 2
rng = np.random.default_rng(0)
SHAPE = (32, 256, 8, 8)  # enough elements and tasks for several threads
x, dy = rng.standard_normal(SHAPE), rng.standard_normal(SHAPE)
gamma, beta = rng.standard_normal(256), rng.standard_normal(256)

def run(x=x, dy=dy):
    out, cache = bnkernels.forward(x, gamma, beta, {"mode": "train"})
    grads = bnkernels.backward(dy, cache) + bnkernels.backward(dy, cache, num_threads=4)
    return (out,) + grads

def same(got, want):
    return len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))

want = run()
assert threads() > 1 or not MULTI, "the parent ran on one thread: nothing is tested"

def child(body):
    # run body() in a forked child; its exit code: 0 if it returned True
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = 0 if body() else 3
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
"""


def _python(code, **env):
    """Run code in a fresh interpreter with this tree's bnkernels and env added; the
    finished process (its exit status checked)."""
    full = dict(os.environ, **env)
    full["PYTHONPATH"] = _REPO + os.pathsep + full.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=full,
        cwd=_REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def _run(body, env=None, setup="", timeout=TIMEOUT):
    """Run setup + PRELUDE + body in a fresh interpreter, in its own process group, which is
    killed (forked children too) if it is not done within timeout seconds; returns its
    stdout."""
    full_env = dict(os.environ, **(env or {}))
    full_env["PYTHONPATH"] = _REPO + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.setdefault("OPENBLAS_NUM_THREADS", "1")
    code = "\n".join(textwrap.dedent(s) for s in (setup, PRELUDE, body))
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=_REPO,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the scenario hung: not done within %d s" % timeout)
    assert proc.returncode == 0, err
    return out


def test_forked_child_runs_on_one_thread_with_the_parents_results():
    out = _run("""
        def body():
            got = run()
            return same(got, want) and bnkernels.max_threads() == 1 and threads() == 1

        assert child(body) == 0
        # the parent is not a forked process: it keeps its threads
        assert bnkernels.max_threads() > 1 or not MULTI
        assert same(run(), want)
        print("done")
    """)
    assert out.split() == ["done"]


def test_fork_pool_normalizes_four_batches():
    out = _run("""
        import multiprocessing

        batches = [rng.standard_normal(SHAPE) for _ in range(4)]

        def normalize(i):
            return run(batches[i], dy), threads()

        wanted = [normalize(i)[0] for i in range(4)]
        with multiprocessing.get_context("fork").Pool(4) as pool:
            got = pool.map(normalize, range(4))
        assert all(same(g, w) for (g, _), w in zip(got, wanted))
        assert [t for _, t in got] == [1, 1, 1, 1], got
        print("done")
    """)
    assert out.split() == ["done"]


def test_grandchild_runs_on_one_thread_too():
    out = _run("""
        def grandchild():
            return same(run(), want) and bnkernels.max_threads() == 1

        def middle():
            return same(run(), want) and child(grandchild) == 0

        assert child(middle) == 0
        print("done")
    """)
    assert out.split() == ["done"]


def test_thread_count_is_capped_at_the_usable_cpus():
    # at most two CPUs for this process (set before the OpenMP runtime loads), 64 threads by
    # default (the prelude's calls), then 4000 and more asked for
    out = _run(
        """
        import json
        _, cache = bnkernels.forward(x, gamma, beta, {"mode": "train"})
        counts = [threads()]
        bnkernels.backward(dy, cache, num_threads=4000)
        counts.append(threads())
        # huge requests neither overflow nor change the results
        for n in (2**31, 2**63, np.uint64(2**63), np.int64(2**40)):
            assert same(bnkernels.backward(dy, cache, num_threads=n), want[1:4])
        counts.append(threads())
        cpus = len(os.sched_getaffinity(0))
        print(json.dumps([cpus, counts, bnkernels.max_threads()]))
        """,
        env={"OMP_NUM_THREADS": "64"},
        setup="""
        import os
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])
        """,
    )
    cpus, counts, default = json.loads(out)
    # the main thread is one of a team of at most `cpus`
    assert all(n <= cpus for n in counts), (cpus, counts)
    assert 1 <= default <= cpus


@pytest.mark.parametrize("var", ["MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE"])
def test_ranks_of_an_mpi_job_share_the_cpus(var):
    # an MPI launcher that started 2 ranks on this machine: each gets half of the CPUs
    code = (
        "import json, os, bnkernels; "
        "print(json.dumps([len(os.sched_getaffinity(0)), bnkernels.max_threads()]))"
    )
    proc = _python(code, OMP_NUM_THREADS="64", **{var: "2"})
    cpus, default = json.loads(proc.stdout)
    assert default == max(1, cpus // 2)


def test_the_default_leaves_out_cpus_busy_with_other_tasks(tmp_path, monkeypatch):
    from bnkernels import _api

    fake = tmp_path / "loadavg"
    monkeypatch.setattr(_api, "_LOADAVG", str(fake))
    monkeypatch.setattr(_api, "_busy_cpus", _BUSY_CPUS)  # the real one (conftest stubs it)
    monkeypatch.setattr(_api, "_cpus", 4)
    monkeypatch.setattr(bnkernels._kernels, "max_threads", lambda: 4)
    for running, own, want in (("1", 1, 4), ("2", 1, 3), ("4", 1, 1), ("9", 1, 1), ("3", 3, 4)):
        # own: this process's runnable threads (the caller, spinning workers), not others
        monkeypatch.setattr(_api, "_own_running", lambda own=own: own)
        fake.write_text("0.50 0.40 0.30 %s/321 4242\n" % running)
        monkeypatch.setattr(_api, "_load_at", -1.0)  # read it again
        assert _api._n_threads(None) == want, (running, own)
        assert _api._n_threads(3) == 3  # an explicit count is kept
    # unreadable: no adaptation
    fake.write_text("garbage\n")
    monkeypatch.setattr(_api, "_load_at", -1.0)
    assert _api._n_threads(None) == 4


def test_own_running_threads_are_counted():
    from bnkernels import _api

    assert _api._own_running() >= 1  # the caller


def test_under_load_the_default_runs_on_fewer_threads():
    # as many busy processes as CPUs: the default call runs on one thread
    code = (
        "import os, subprocess, sys, time, bnkernels\n"
        "from bnkernels import _api\n"
        "n = len(os.sched_getaffinity(0))\n"
        "busy = [subprocess.Popen([sys.executable, '-c', 'while True: pass']) for _ in range(n)]\n"
        "try:\n"
        "    time.sleep(0.5)\n"
        "    _api._load_at = -1.0\n"
        "    print(_api._n_threads(None), bnkernels.max_threads())\n"
        "finally:\n"
        "    [p.kill() for p in busy]\n"
    )
    proc = _python(code, OMP_NUM_THREADS="8")
    under_load, most = map(int, proc.stdout.split())
    assert under_load == 1
    assert most == len(os.sched_getaffinity(0))  # max_threads reports the most, not the load


def test_a_failed_scratch_allocation_says_what_and_how_much():
    # tall rows: the chunked schedule's per-channel partials (~20 MB here) are allocated in
    # the call, after dx; an address-space limit just above dx makes that allocation fail
    code = (
        "import os, resource, numpy as np, bnkernels\n"
        "x = np.ones((40000, 1024), np.float32); x[::2] = 2\n"
        "out, cache = bnkernels.forward(x, np.ones(1024, np.float32), np.zeros(1024, np.float32),"
        " {'mode': 'train'})\n"
        "with open('/proc/self/status') as f:\n"
        "    vm = [int(l.split()[1]) * 1024 for l in f if l.startswith('VmSize')][0]\n"
        "resource.setrlimit(resource.RLIMIT_AS, (vm + x.nbytes + (4 << 20),) * 2)\n"
        "try:\n"
        "    bnkernels.backward(x, cache, num_threads=1)\n"
        "    print('no error')\n"
        "except MemoryError as exc:\n"
        "    print('MemoryError:', exc)\n"
    )
    proc = _python(code)
    assert proc.stdout.startswith("MemoryError: bnkernels: could not allocate"), proc.stdout
    assert "bytes" in proc.stdout and "channels" in proc.stdout, proc.stdout
