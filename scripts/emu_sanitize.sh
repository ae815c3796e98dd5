#!/usr/bin/env bash
# Runs the kernel files on the emulated CUDA device (csrc/emu) under AddressSanitizer and
# UndefinedBehaviorSanitizer: builds the torch-free driver tests/emu/sanitize.cpp with
# csrc/emu/runtime.cpp and the driver's kernel units (tests/emu/sanitize_kernels.cpp, which compiles
# csrc/cuda/step_kernels.cuh and csrc/cuda/misc_kernels.cu against the CUDA shim: g++ only, no
# torch, no GPU), runs it, and exits non-zero on any sanitizer report or bit mismatch.
#
# Usage: scripts/emu_sanitize.sh [--mutant NAME] [--no-cache]
#   --mutant NAME  apply tests/emu/mutants/NAME.mutant to the build's copy of csrc/ (the
#                  repository's files are never modified); the run is then expected to fail.
#   --no-cache     compile every translation unit, ignoring the object cache.
# Environment: CXX (default g++), JOBS (parallel compiles, default 2), PYTHON (default python3, to
# apply a mutant), FUSEDWARM_EMU_CACHE (the object cache directory).
#
# Exit status: 0 when every check passed; 1 on a sanitizer report or a mismatch; 2 when the
# build (or applying the mutant) failed.
#
# Mutant files (tests/emu/mutants/NAME.mutant) are plain text: leading lines starting with '#'
# are a comment (what the mutant breaks and how the run must fail); the next line is the file to
# change, relative to csrc/; then the exact old text, a line "====", and the new text up to the
# end of the file. The old text must occur exactly once in the file.
#
# The build works on a copy of the sources in a temporary directory. It takes minutes on two cores
# (sanitize_kernels.cpp is compiled once per rule, each time with the rule's step variants, and
# once for the other kernels), so objects are cached by a hash of the compiler, the flags and the
# preprocessed source (under ${TMPDIR:-/tmp}; entries unused for a week are removed): a mutant
# rebuilds only the units that include the file it changes. AddressSanitizer prints one warning
# that it does not fully support swapcontext (the emulator's fibers); it is expected and is not a
# failure.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CXX="${CXX:-g++}"
JOBS="${JOBS:-2}"
PYTHON="${PYTHON:-python3}"
CACHE="${FUSEDWARM_EMU_CACHE:-${TMPDIR:-/tmp}/fusedwarm-emu-sanitize-cache}"
MUTANT=""
USE_CACHE=1

while [ $# -gt 0 ]; do
  case "$1" in
    --mutant)
      [ $# -ge 2 ] || { echo "emu_sanitize: --mutant needs a name" >&2; exit 2; }
      MUTANT="$2"
      shift 2
      ;;
    --no-cache) USE_CACHE=0; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "emu_sanitize: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

WORK="$(mktemp -d "${TMPDIR:-/tmp}/fusedwarm-emu-sanitize.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# Everything is built from one snapshot of the sources (csrc/ and the driver), so that edits made
# to the working tree during the build cannot mix two versions; a mutant changes the snapshot.
SRC="$WORK/src"
mkdir -p "$SRC/tests/emu"
cp -R "$ROOT/csrc" "$SRC/csrc"
cp "$ROOT"/tests/emu/sanitize*.cpp "$ROOT"/tests/emu/sanitize*.h "$SRC/tests/emu/"
if [ -n "$MUTANT" ]; then
  MUTANT_FILE="$ROOT/tests/emu/mutants/$MUTANT.mutant"
  if [ ! -f "$MUTANT_FILE" ]; then
    echo "emu_sanitize: no mutant '$MUTANT' in tests/emu/mutants; there are:" \
      $(cd "$ROOT/tests/emu/mutants" && ls -- *.mutant | sed 's/\.mutant$//') >&2
    exit 2
  fi
  "$PYTHON" - "$MUTANT_FILE" "$SRC/csrc" <<'PY' || exit 2
import sys
from pathlib import Path

mutant, csrc = Path(sys.argv[1]), Path(sys.argv[2])
lines = mutant.read_text().splitlines(keepends=True)
while lines and lines[0].startswith("#"):
    lines.pop(0)
if not lines or "====\n" not in lines[1:]:
    sys.exit(f"emu_sanitize: {mutant}: expected a path line, the old text, '====' and the new text")
split = lines.index("====\n", 1)
path = lines[0].strip()
old, new = "".join(lines[1:split]), "".join(lines[split + 1:])
text = (csrc / path).read_text()
if not old or text.count(old) != 1:
    sys.exit(f"emu_sanitize: {mutant}: its old text occurs {text.count(old)} times in csrc/{path}, not once")
(csrc / path).write_text(text.replace(old, new))
print(f"mutant {mutant.stem}: csrc/{path} changed")
PY
fi

# -g1: line tables and inlined frames, all that the sanitizers' stack traces use, in three quarters
# of the build time of -g (whose variable locations only a debugger reads).
FLAGS=(-std=c++17 -O1 -g1 -fsanitize=address,undefined -fno-sanitize-recover=all -ffp-contract=off
       -fno-strict-aliasing)
INCLUDES=(-Icsrc/emu -Icsrc/include -Icsrc)
# Translation units: a source relative to $SRC (so that reports name csrc/...) and its defines,
# longest first so that two jobs end together (on one core, about 60 s for the driver and 10 to 15 s
# for each rule's kernels).
UNITS=("tests/emu/sanitize.cpp"
       "tests/emu/sanitize_kernels.cpp -DFW_SANITIZE_RULE=fw::AdamW"
       "tests/emu/sanitize_kernels.cpp -DFW_SANITIZE_RULE=fw::Lion"
       "tests/emu/sanitize_kernels.cpp -DFW_SANITIZE_RULE=fw::SGDMomentum"
       "tests/emu/sanitize_kernels.cpp -DFW_SANITIZE_RULE=fw::SGD"
       "tests/emu/sanitize_kernels.cpp"
       "csrc/emu/runtime.cpp")
COMPILER_ID="$("$CXX" --version | head -n 1)"
[ "$USE_CACHE" = 0 ] || { mkdir -p "$CACHE"; find "$CACHE" -name '*.o' -mtime +7 -delete 2>/dev/null || true; }

# compile OBJECT SOURCE [DEFINE...]: preprocesses SOURCE with the defines and compiles that text,
# or takes the object from the cache when the compiler, the flags and the text match an entry
# (then stores it). Writes "hit" or "built" to OBJECT.status.
compile() {
  local obj="$1" src="$2" key=""
  shift 2
  (cd "$SRC" && "$CXX" "${FLAGS[@]}" -fno-working-directory "${INCLUDES[@]}" "$@" -E "$src" -o "$obj.ii")
  if [ "$USE_CACHE" = 1 ]; then
    key="$({ echo "$COMPILER_ID"; echo "${FLAGS[*]}"; cat "$obj.ii"; } | sha256sum | cut -c1-32)"
    if [ -f "$CACHE/$key.o" ] && cp "$CACHE/$key.o" "$obj"; then
      touch "$CACHE/$key.o"
      echo hit > "$obj.status"
      return 0
    fi
  fi
  (cd "$SRC" && "$CXX" "${FLAGS[@]}" -c "$obj.ii" -o "$obj")
  if [ "$USE_CACHE" = 1 ]; then
    cp "$obj" "$CACHE/$key.o.$$.tmp" && mv -f "$CACHE/$key.o.$$.tmp" "$CACHE/$key.o"
  fi
  echo built > "$obj.status"
}

echo "building tests/emu/sanitize.cpp and the emulated kernels with -fsanitize=address,undefined ($JOBS jobs)"
BUILD_START="$(now)"
OBJECTS=()
for i in "${!UNITS[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
  OBJECTS+=("$WORK/$i.o")
  # shellcheck disable=SC2086 # a unit is its source and defines, split on spaces
  ( compile "$WORK/$i.o" ${UNITS[$i]} > "$WORK/$i.log" 2>&1 ) &
done
wait || true
FAILED=0
BUILT=0
for i in "${!UNITS[@]}"; do
  if [ ! -f "$WORK/$i.o.status" ]; then
    echo "emu_sanitize: compiling ${UNITS[$i]} failed:" >&2
    cat "$WORK/$i.log" >&2
    FAILED=1
  elif [ "$(cat "$WORK/$i.o.status")" = built ]; then
    BUILT=$((BUILT + 1))
  fi
done
[ "$FAILED" = 0 ] || exit 2
"$CXX" -fsanitize=address,undefined -pthread "${OBJECTS[@]}" -o "$WORK/emu_sanitize" || exit 2
echo "build: $(elapsed "$BUILD_START") s ($BUILT translation units compiled, $((${#UNITS[@]} - BUILT)) from the cache)"

RUN_START="$(now)"
set +e
ASAN_OPTIONS="detect_leaks=0${ASAN_OPTIONS:+:$ASAN_OPTIONS}" \
UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}" \
  "$WORK/emu_sanitize" > "$WORK/run.log" 2>&1
STATUS=$?
set -e
cat "$WORK/run.log"
echo "run: $(elapsed "$RUN_START") s"
if [ "$STATUS" != 0 ] || grep -q -E 'ERROR: AddressSanitizer|runtime error:|^MISMATCH' "$WORK/run.log"; then
  echo "emu_sanitize: FAILED (exit status $STATUS)${MUTANT:+ with mutant $MUTANT}"
  exit 1
fi
echo "emu_sanitize: passed${MUTANT:+ with mutant $MUTANT (it was not caught)}"
