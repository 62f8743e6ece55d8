"""Importing bnkernels from a source tree without its compiled module, as Python does when run
in a checkout's root after a non-editable install: an installed build of the same version
serves the compiled module, and without one the ImportError says what to do."""

import os
import shutil
import subprocess
import sys

import numpy as np

import bnkernels
from bnkernels import _kernels

PACKAGE = os.path.dirname(os.path.abspath(bnkernels.__file__))
# the directory holding the package whose compiled module this process runs
INSTALLED = os.path.dirname(os.path.dirname(os.path.abspath(_kernels.__file__)))
NUMPY_SITE = os.path.dirname(os.path.dirname(os.path.abspath(np.__file__)))


def _source_tree(root, version=None):
    """The package's Python files, no compiled module, in root/bnkernels."""
    pkg = root / "bnkernels"
    pkg.mkdir()
    for name in os.listdir(PACKAGE):
        if name.endswith(".py"):
            shutil.copy(os.path.join(PACKAGE, name), pkg)
    if version is not None:
        (pkg / "_version.py").write_text('__version__ = "%s"\n' % version)


def _run_in(root, code, extra_path=()):
    """Run code in a fresh interpreter in root, whose sys.path is root, the standard library
    and extra_path (no site-packages, no PYTHONPATH)."""
    prog = "import sys\nsys.path.extend(%r)\n%s" % (list(extra_path), code)
    return subprocess.run(
        [sys.executable, "-E", "-S", "-c", prog],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _assert_clear_error(res, root):
    assert res.returncode != 0
    assert "ImportError: bnkernels is being imported from a source tree without its compiled" in (
        res.stderr
    )
    assert os.path.realpath(root / "bnkernels") in res.stderr
    assert "pip install -e ." in res.stderr
    assert "circular import" not in res.stderr


def test_a_source_tree_alone_says_what_to_do(tmp_path):
    _source_tree(tmp_path)
    res = _run_in(tmp_path, "import bnkernels")
    _assert_clear_error(res, tmp_path)


def test_an_installed_build_of_another_version_is_not_used(tmp_path):
    _source_tree(tmp_path, version="0.0.0.dev0")
    res = _run_in(tmp_path, "import bnkernels", [INSTALLED, NUMPY_SITE])
    _assert_clear_error(res, tmp_path)


def test_an_installed_build_of_the_same_version_serves_the_compiled_module(tmp_path):
    _source_tree(tmp_path)
    code = (
        "import numpy as np, bnkernels\n"
        "x = np.arange(12.0).reshape(4, 3)\n"
        "out, cache = bnkernels.forward(x, np.ones(3), np.zeros(3), {'mode': 'train'})\n"
        "dx, dgamma, dbeta = bnkernels.backward(np.ones_like(x), cache)\n"
        "print(bnkernels.__file__)\n"
        "print(bnkernels._kernels.__file__)\n"
        "print(bnkernels.reference.__file__)\n"
        "print(float(dbeta.sum()))\n"
    )
    res = _run_in(tmp_path, code, [INSTALLED, NUMPY_SITE])
    assert res.returncode == 0, res.stderr
    init, kernels, ref, dbeta = res.stdout.split()
    # the tree's Python files, the installed build's compiled module
    tree = os.path.realpath(tmp_path / "bnkernels")
    assert os.path.dirname(os.path.realpath(init)) == tree
    assert os.path.dirname(os.path.realpath(ref)) == tree
    assert os.path.realpath(kernels) == os.path.realpath(_kernels.__file__)
    assert float(dbeta) == 12.0
