#!/usr/bin/env bash
# Runs a command with neurokernels' CUDA emulator as the GPU (see emulator/README.md):
#
#   bash scripts/cuda-emulator.sh cargo test --release --features cuda
#   bash scripts/cuda-emulator.sh cargo run --release --features cuda --example check_cases -- --device cuda tests/cases
#
# Idempotent: installs the pinned CUDA 13.0 headers if missing (scripts/install-cuda-toolkit.sh),
# builds the emulator's libraries into target/nkemu/, then runs the command with
#   NVCC=emulator/nkcc          build.rs compiles kernels/*.cu for the host instead of the GPU
#   CARGO_TARGET_DIR=target/emulated   so builds with the real nvcc are not invalidated
#   LD_LIBRARY_PATH=target/nkemu       cudarc opens the emulator's libcuda/libcublas/libcusolver
# Settings passed through: NKEMU_SCHEDULE=forward|reverse|random[:SEED] (thread order after
# each barrier), NKEMU_CC=8.0|9.0 (the emulated device's compute capability and limits),
# NKEMU_DIFFERENTIAL=1 (each launch also run forward; results must match bit for bit),
# NKEMU_TRACE=1 (a line per launch), NKEMU_STACK_KB (per CUDA thread, default 256),
# NKEMU_COVERAGE=FILE (appends the name of every kernel launched; scripts/emulator-coverage.sh).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
if [ $# -eq 0 ]; then
  sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi

nvcc=$(bash "$root/scripts/install-cuda-toolkit.sh" | tail -n 1)
cuda_inc=$(cd "$(dirname "$nvcc")/../include" && pwd)
lib_dir="$root/target/nkemu"
make -s -C "$root/emulator" OUT="$lib_dir" CUDA_INC="$cuda_inc" >&2
mkdir -p "$lib_dir/modules"

export NVCC="$root/emulator/nkcc"
export NKEMU_CUDA_INC="$cuda_inc"
export NKEMU_LIB_DIR="$lib_dir"
export NKEMU_MODULE_DIR="$lib_dir/modules"
export CARGO_TARGET_DIR="${NKEMU_TARGET_DIR:-$root/target/emulated}"
export NEUROKERNELS_REQUIRE_GPU=1   # a GPU test or check_cases that finds no device fails
export LD_LIBRARY_PATH="$lib_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# build.rs re-runs when NVCC changes, and the emulated modules depend on the emulator itself
export NEUROKERNELS_NVCC_FLAGS="${NEUROKERNELS_NVCC_FLAGS:-} -DNKEMU_BUILD=$(cat "$root"/emulator/include/*.h "$root/emulator/nkcc" | cksum | cut -d' ' -f1)"
echo "cuda-emulator: ${NKEMU_CC:-9.0} (sm_${NKEMU_CC:-9.0}), schedule ${NKEMU_SCHEDULE:-forward}; $*" | sed 's/sm_\([0-9]\)\.\([0-9]\)/sm_\1\2/' >&2
exec "$@"
