#!/usr/bin/env bash
# Run the test suite against a debug build under AddressSanitizer and UBSan.
#
#   scripts/asan-tests.sh                 # the whole suite (minus tests/test_leaks.py)
#   scripts/asan-tests.sh --quick         # a reduced run for CI: the kernel-heavy tests,
#                                         # hypothesis profile "asan" (few examples),
#                                         # BNKERNELS_STRESS=0.1 (fewer stress repetitions)
#   scripts/asan-tests.sh --keep -- -k planar -x   # keep the build dir; extra pytest args
#
# What it does: copies the working tree (tracked and untracked, not ignored files) to a
# temporary directory, builds the extension there in place with BNKERNELS_DEBUG=1
# (boundscheck/initializedcheck on, -O1 -g, -fsanitize=address,undefined), and runs pytest
# from that copy, so the checkout's own build is never touched.  The interpreter is not
# instrumented, so libasan is preloaded (LD_PRELOAD of `$CC -print-file-name=libasan.so`).
#   ASAN_OPTIONS   detect_leaks=0: CPython keeps objects alive at exit by design;
#                  allocator_may_return_null=1: a huge allocation gives MemoryError as usual
#   UBSAN_OPTIONS  print_stacktrace=1, halt_on_error=1: the first undefined behaviour stops
# PYTHONMALLOC=malloc routes Python's small objects through the sanitizer's allocator too.
# ASan reports go to log files; UBSan ignores log_path when ASan is loaded, so pytest runs
# with --capture=sys (C-level stderr is not swallowed) and its output is kept.  Any report,
# from pytest itself or a child process a test started, is listed at the end and makes the
# script fail, as does a failing test.
#
# test_leaks.py is left out: RSS means nothing under ASan (freed memory sits in quarantine,
# shadow memory grows) and ASan's malloc does not keep glibc's statistics.
#
# Needs: gcc (or $CC) with libasan/libubsan, and a Python ($PYTHON, default python3) with the
# build and test requirements (numpy, Cython, setuptools, pytest, hypothesis).
set -euo pipefail

quick=0
keep=0
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1 ;;
        --keep) keep=1 ;;
        --) shift; extra=("$@"); break ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
cc="${CC:-gcc}"
libasan="$($cc -print-file-name=libasan.so)"
if [ ! -e "$libasan" ]; then
    echo "libasan not found ($cc -print-file-name=libasan.so gave '$libasan')" >&2
    exit 2
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/bnkernels-asan.XXXXXX")"
cleanup() {
    if [ "$keep" = 1 ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
src="$work/src"
logs="$work/logs"
mkdir -p "$src" "$logs"

echo "== copying the working tree to $src"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard \
    | tar --null --ignore-failed-read -T - -cf - 2>/dev/null) | tar -xf - -C "$src"

echo "== building with BNKERNELS_DEBUG=1"
(cd "$src" && BNKERNELS_DEBUG=1 "$python" setup.py build_ext --inplace >"$work/build.log" 2>&1) || {
    tail -n 50 "$work/build.log"; echo "build failed" >&2; exit 1; }

export LD_PRELOAD="$libasan${LD_PRELOAD:+ $LD_PRELOAD}"
export ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:log_path=$logs/asan${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
export PYTHONMALLOC=malloc
export PYTHONFAULTHANDLER=1

cd "$src"
# the copy's debug build, not an installed bnkernels, must be the one imported
"$python" - "$src" <<'EOF'
import os, sys
sys.path.insert(0, sys.argv[1])
import bnkernels, bnkernels._kernels as k
where = os.path.realpath(bnkernels.__file__)
assert where.startswith(os.path.realpath(sys.argv[1])), "imported %s, not the copy" % where
assert "-fsanitize=address,undefined" in k.build_flags(), k.build_flags()
print("== using %s built with: %s" % (where, k.build_flags()))
EOF

tests=()
if [ "$quick" = 1 ]; then
    export BNKERNELS_HYPOTHESIS_PROFILE="${BNKERNELS_HYPOTHESIS_PROFILE:-asan}"
    export BNKERNELS_STRESS="${BNKERNELS_STRESS:-0.1}"  # fewer repetitions of stress tests
    for t in test_properties test_precision test_plan test_vs_reference test_errors test_concurrency; do
        [ -e "tests/$t.py" ] && tests+=("tests/$t.py")
    done
else
    tests=(tests --ignore=tests/test_leaks.py)
fi

echo "== pytest ${tests[*]} ${extra[*]:-}"
set +e
"$python" -m pytest -p no:cacheprovider --capture=sys -q -ra "${tests[@]}" \
    ${extra[@]+"${extra[@]}"} 2>&1 | tee "$work/pytest.log"
status=${PIPESTATUS[0]}
set -e

found=0
for f in "$logs"/*; do
    [ -e "$f" ] || continue
    found=1
    echo "================ sanitizer log: $(basename "$f") ================"
    cat "$f"
done
pattern='runtime error:|ERROR: AddressSanitizer|ERROR: UndefinedBehaviorSanitizer|ERROR: LeakSanitizer'
if grep -Eq "$pattern" "$work/pytest.log"; then
    found=1
    echo "================ sanitizer reports in the test output ================"
    # each distinct report line once, with the frames that follow it
    grep -E -A 8 "$pattern" "$work/pytest.log" | sed 's/^E *//' | awk '!seen[$0]++' | head -n 400
fi
if [ "$found" = 1 ]; then
    echo "sanitizer reports found (above)" >&2
    [ "$status" = 0 ] && status=1
fi
echo "== pytest exit status $status; sanitizer reports: $([ "$found" = 1 ] && echo yes || echo none)"
exit "$status"
