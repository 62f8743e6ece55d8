"""The synchronized passes across real processes: tests/mpi_ranks.py and the example in
examples/ under mpiexec with 1, 2 and 3 ranks, each run under a timeout (a hang fails).

They need mpi4py and an mpiexec (``pip install 'bnkernels[mpi]'``); without them they are
skipped, unless BNKERNELS_REQUIRE_MPI=1 (as in CI), where that is a failure."""

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TIMEOUT = 300


def _mpiexec():
    if importlib.util.find_spec("mpi4py") is None:
        return None
    # the mpich wheel puts mpiexec beside the interpreter
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return beside if os.path.exists(beside) else shutil.which("mpiexec")


MPIEXEC = _mpiexec()
if MPIEXEC is None:
    if os.environ.get("BNKERNELS_REQUIRE_MPI", "") not in ("", "0"):
        raise RuntimeError("BNKERNELS_REQUIRE_MPI is set but mpi4py or mpiexec is missing")
    pytestmark = pytest.mark.skip(reason="needs mpi4py and mpiexec: pip install 'bnkernels[mpi]'")


def _run(n, *args):
    cmd = [MPIEXEC, "-n", str(n), sys.executable, *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, cwd=HERE)
    except subprocess.TimeoutExpired as exc:
        pytest.fail("%s did not finish in %d s:\n%s" % (" ".join(cmd), TIMEOUT, exc.stdout))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_synchronized_passes_match_one_process(n):
    proc = _run(n, os.path.join(HERE, "mpi_ranks.py"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("ok "), proc.stdout + proc.stderr


def test_example_trains_like_one_process():
    proc = _run(2, os.path.join(ROOT, "examples", "data_parallel.py"), "--steps", "5")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "same as one process" in proc.stdout, proc.stdout


def test_self_check():
    proc = _run(2, "-m", "bnkernels", "--mpi")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "agree" in proc.stdout, proc.stdout
