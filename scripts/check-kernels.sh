#!/usr/bin/env bash
# ptxas -v on every kernel in kernels/*.cu for sm_80 and sm_90: prints registers, shared
# memory, stack and spills per kernel, and fails if any kernel spills.
#
# Usage: bash scripts/check-kernels.sh     (finds nvcc like build.rs: NVCC, CUDA_HOME/CUDA_PATH,
#                                           PATH, then the repo-local .cuda/ toolkit)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

nvcc=${NVCC:-}
for home in "${CUDA_HOME:-}" "${CUDA_PATH:-}"; do
  [ -z "$nvcc" ] && [ -n "$home" ] && [ -x "$home/bin/nvcc" ] && nvcc="$home/bin/nvcc"
done
[ -z "$nvcc" ] && nvcc=$(command -v nvcc || true)
[ -z "$nvcc" ] && nvcc=$(ls -1 .cuda/nvidia/*/bin/nvcc 2>/dev/null | tail -n 1 || true)
if [ -z "$nvcc" ]; then
  echo "check-kernels: no nvcc found; run: bash scripts/install-cuda-toolkit.sh" >&2
  exit 1
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
spills=0
printf '%-6s %-40s %5s %8s %6s %s\n' arch kernel regs smem stack spills
for arch in 80 90; do
  for src in kernels/*.cu; do
    log="$tmp/$(basename "$src" .cu).sm_$arch.log"
    "$nvcc" -cubin -arch=sm_$arch -O3 -std=c++17 -I kernels -Xptxas -v "$src" -o "$tmp/out.cubin" >"$log" 2>&1 || {
      cat "$log" >&2
      echo "check-kernels: nvcc failed on $src for sm_$arch" >&2
      exit 1
    }
    # ptxas prints, per kernel: "Function properties for NAME", then the stack/spill line,
    # then "Used N registers, ... N bytes smem"
    while IFS=$'\t' read -r name regs smem stack spill_st spill_ld; do
      printf '%-6s %-40s %5s %8s %6s %s\n' "sm_$arch" "$name" "$regs" "$smem" "$stack" "st=$spill_st ld=$spill_ld"
      if [ "$spill_st" != 0 ] || [ "$spill_ld" != 0 ]; then spills=$((spills + 1)); fi
    done < <(awk '
      /Function properties for/ { name = $NF }
      /bytes stack frame/ { stack = $1; st = $5; ld = $9 }
      /Used [0-9]+ registers/ {
        regs = $5; smem = 0
        for (i = 1; i <= NF; i++) if ($(i) ~ /^smem/) smem = $(i-2)
        if (name != "") printf "%s\t%s\t%s\t%s\t%s\t%s\n", name, regs, smem, stack, st, ld
        name = ""
      }' "$log")
  done
done
if [ "$spills" -ne 0 ]; then
  echo "check-kernels: $spills kernel(s) spill registers" >&2
  exit 1
fi
echo "check-kernels: no spills"
