"""Build the compiled kernels.

Environment switches
--------------------
BNKERNELS_NATIVE=1   add -march=native (fast on this CPU only; never for wheels you ship)
BNKERNELS_DEBUG=1    bounds checks on, -O1 -g, -fsanitize=address,undefined
BNKERNELS_NO_OPENMP=1  build the serial kernels even where OpenMP works
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import warnings

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

OPENMP_TEST = textwrap.dedent(
    """
    #include <omp.h>
    #include <stdio.h>
    int main(void) {
        int n = 0;
        #pragma omp parallel reduction(+:n)
        n += 1;
        printf("%d\\n", n > 0 && n == omp_get_max_threads());
        return 0;
    }
    """
)


def _flag(name):
    return os.environ.get(name, "") not in ("", "0")


def openmp_flags():
    """Compile, link and run a tiny OpenMP program; return the flag if it works."""
    if _flag("BNKERNELS_NO_OPENMP"):
        return []
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    cc = cc.split()
    tmp = tempfile.mkdtemp()
    try:
        src = os.path.join(tmp, "omp.c")
        exe = os.path.join(tmp, "omp")
        with open(src, "w") as f:
            f.write(OPENMP_TEST)
        build = subprocess.run(cc + ["-fopenmp", src, "-o", exe], capture_output=True)
        if build.returncode == 0:
            run = subprocess.run([exe], capture_output=True, text=True)
            if run.returncode == 0 and run.stdout.strip() == "1":
                return ["-fopenmp"]
    except OSError:
        pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    warnings.warn(
        "bnkernels: OpenMP was not found (compiling with -fopenmp failed); "
        "building serial kernels. They are correct but use one core.",
        stacklevel=1,
    )
    return []


omp = openmp_flags()
debug = _flag("BNKERNELS_DEBUG")
compile_args = ["-O1", "-g", "-fno-omit-frame-pointer"] if debug else ["-O3"]
# no FMA contraction: every SIMD clone of the loops gives bitwise the same results
compile_args.append("-ffp-contract=off")
# floating-point operations may be assumed not to trap (values are unchanged): a choice
# c ? a : b whose operand a floating-point operation made then stays a select that
# vectorizes, where GCC would otherwise move the operation into a branch
compile_args.append("-fno-trapping-math")
macros = [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]
link_args = []
if debug:
    compile_args += ["-fsanitize=address,undefined"]
    link_args += ["-fsanitize=address,undefined"]
if _flag("BNKERNELS_NATIVE"):
    compile_args.append("-march=native")
    macros.append(("BN_NO_CLONES", "1"))
# without OpenMP threads, still honour the `omp simd` loop annotations
compile_args += omp or ["-fopenmp-simd"]
link_args += omp

directives = {
    "language_level": 3,
    "boundscheck": debug,
    "wraparound": False,
    "cdivision": True,
    "initializedcheck": debug,
    "embedsignature": True,
}

ext = Extension(
    "bnkernels._kernels",
    ["bnkernels/_kernels.pyx"],
    include_dirs=[np.get_include()],
    define_macros=macros + [("BNKERNELS_BUILD_FLAGS", '"%s"' % " ".join(compile_args))],
    depends=["bnkernels/_kernels.h", "bnkernels/_loops.h"],
    extra_compile_args=compile_args,
    extra_link_args=link_args,
    # the C math library (sqrt; fmaf in the clones for CPUs without FMA), named rather than
    # taken from the interpreter's own symbols
    libraries=["m"],
)

if "--quiet" not in sys.argv:
    print("bnkernels: compile flags:", " ".join(compile_args))

setup(ext_modules=cythonize([ext], compiler_directives=directives))
