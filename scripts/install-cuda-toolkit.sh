#!/usr/bin/env bash
# Installs a minimal, pinned CUDA 13.0 toolkit (nvcc, ptxas, headers) from PyPI wheels into
# the repo-local, git-ignored `.cuda/`, so `cargo build --features cuda` works without a
# system CUDA install or a GPU. Idempotent: a second run only prints the nvcc path.
#
# nvvm is pinned on purpose: pip would otherwise take a newer nvvm whose PTX (ISA 9.5) the
# 13.0 ptxas rejects.
#
# Usage: bash scripts/install-cuda-toolkit.sh   -> prints the nvcc path on its last line.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest="$root/.cuda"
wheels=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-nvvm==13.0.88
  nvidia-cuda-cccl==13.0.85
)
stamp="$dest/.installed"
want="${wheels[*]}"

find_nvcc() { find "$dest" -type f -path '*/bin/nvcc' 2>/dev/null | head -n 1; }

if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || [ -z "$(find_nvcc)" ]; then
  rm -rf "$dest"
  mkdir -p "$dest"
  python3 -m pip install -q --disable-pip-version-check --no-deps --target "$dest" "${wheels[@]}" >&2
  echo "$want" > "$stamp"
fi

nvcc=$(find_nvcc)
if [ -z "$nvcc" ]; then
  echo "install-cuda-toolkit: nvcc not found under $dest after install" >&2
  exit 1
fi
chmod +x "$(dirname "$nvcc")"/* 2>/dev/null || true
echo "$nvcc"
