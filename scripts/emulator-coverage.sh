#!/usr/bin/env bash
# Which kernels the emulated runs launched, and which of the entry points in kernels/*.cu none
# did. Usage: bash scripts/emulator-coverage.sh LAUNCHED_FILE
# LAUNCHED_FILE is what NKEMU_COVERAGE=FILE collected over one or more emulated runs; the
# entry points come from the lists nkcc writes beside each module (target/emulated/.../*.kernels).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
require_all=0
if [ "${1:-}" = "--require-all" ]; then require_all=1; shift; fi
launched=$1
lists=$(find "${NKEMU_TARGET_DIR:-$root/target/emulated}" -path '*/out/*.fatbin.kernels' 2>/dev/null | xargs -r ls -t | awk -F/ '!seen[$NF]++')
[ -n "$lists" ] || { echo "emulator-coverage: no *.fatbin.kernels lists; build with scripts/cuda-emulator.sh first" >&2; exit 1; }
all=$(cat $lists | sort -u)
ran=$(sort -u "$launched")
total=$(echo "$all" | wc -l)
missed=$(comm -23 <(echo "$all") <(echo "$ran"))
n_missed=$(echo -n "$missed" | grep -c . || true)
echo "emulator coverage: $((total - n_missed)) of $total kernel entry points launched"
libs=$(comm -13 <(echo "$all") <(echo "$ran") | grep -E '^cu(blas|solver)' || true)
echo "cuBLAS/cuSOLVER calls made: $(echo $libs)"
if [ -n "$missed" ]; then
  echo "never launched:"
  echo "$missed" | sed 's/^/  /'
fi
if [ -n "$missed" ] && [ "$require_all" = 1 ]; then
  echo "emulator-coverage: add a GPU test or case that launches the kernels above" >&2
  exit 1
fi
