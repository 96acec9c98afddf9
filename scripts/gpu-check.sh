#!/usr/bin/env bash
# Prepares the one device call that checks the CUDA path on a real GPU.
#
# Here (Rust machine): builds, release with `--features cuda`, the test binaries, the
# check_cases and tour examples and the bench binary, and stages them in .gpu/ (git-ignored)
# with a copy of ../shared/anchors/gpu.py and .gpu/run.sh.
#
# Then make ONE device call (no Rust there; the working tree, tests/cases included, travels):
#     run(command="bash .gpu/run.sh", carry=[".gpu"], timeout_s=540)
# run.sh prints nvidia-smi, runs every test binary, check_cases --device cuda on every
# committed case, the tour, the CUDA benches and the PyTorch anchors (gpu.py) in the same
# call, and writes the logs under $OUT. Give the machine back afterwards unless you rerun.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
stage=.gpu
rm -rf "$stage"
mkdir -p "$stage/bin"

tests_json=$(mktemp)
benches_json=$(mktemp)
cargo test --release --features cuda --no-run --message-format=json > "$tests_json"
cargo bench --features cuda --no-run --message-format=json > "$benches_json"
cargo build --release --features cuda --examples
# the test harness binaries (lib unit tests and tests/*.rs) and the criterion bench binaries
python3 - "$tests_json" "$benches_json" "$stage/bin" <<'PY'
import json, shutil, sys, os
def artifacts(path, kinds):
    for line in open(path):
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if msg.get("reason") == "compiler-artifact" and msg.get("executable") and msg["target"]["kind"][0] in kinds:
            yield msg["target"]["name"], msg["executable"]
out = sys.argv[3]
for prefix, path, kinds in [("test", sys.argv[1], ("lib", "test")), ("bench", sys.argv[2], ("bench",))]:
    for name, exe in artifacts(path, kinds):
        shutil.copy2(exe, os.path.join(out, f"{prefix}-{name}"))
        print("staged", f"{prefix}-{name}")
PY
rm -f "$tests_json" "$benches_json"
cp target/release/examples/check_cases target/release/examples/tour "$stage/bin/"
if [ -f ../shared/anchors/gpu.py ]; then
  cp ../shared/anchors/gpu.py "$stage/gpu.py"
else
  echo "gpu-check: ../shared/anchors/gpu.py not found; the anchors will be skipped" >&2
fi

cat > "$stage/run.sh" <<'RUN'
#!/usr/bin/env bash
# Runs on the device machine from the repository root. Logs go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export NEUROKERNELS_CASES_DIR="$PWD/tests/cases"
# cuBLAS and cuSOLVER (ridge.cv, large ridge.solve_batched) load dynamically: on the device
# machine they come with PyTorch's pip wheels, under site-packages/nvidia/*/lib
nvidia_libs=$(python3 - <<'PY' 2>/dev/null
import glob, os, site, sys
roots = list(site.getsitepackages()) + [site.getusersitepackages()] + sys.path
dirs = []
for root in roots:
    for d in sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib"))):
        if os.path.isdir(d) and d not in dirs:
            dirs.append(d)
print(":".join(dirs))
PY
)
if [ -n "$nvidia_libs" ]; then
  export LD_LIBRARY_PATH="$nvidia_libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
status=0
section() { printf '\n===== %s\n' "$1" | tee -a "$OUT/summary.txt"; }
section "device"
nvidia-smi 2>&1 | tee "$OUT/nvidia-smi.txt" | head -n 15
echo "CUDA library dirs: ${nvidia_libs:-none found (cuBLAS/cuSOLVER ops will report NoDevice)}" | tee -a "$OUT/summary.txt"
section "tests"
for t in .gpu/bin/test-*; do
  if "$t" > "$OUT/$(basename "$t").log" 2>&1; then r=ok; else r=FAILED; status=1; fi
  printf '%-32s %s  %s\n' "$(basename "$t")" "$r" "$(grep -E '^test result' "$OUT/$(basename "$t").log" | tail -n 1)" | tee -a "$OUT/summary.txt"
  grep -E 'SKIPPED|panicked' "$OUT/$(basename "$t").log" | head -n 5 | tee -a "$OUT/summary.txt"
done
section "reference cases on cuda"
.gpu/bin/check_cases --device cuda tests/cases > "$OUT/check_cases.log" 2>&1 || status=1
grep -v '^PASS' "$OUT/check_cases.log" | tail -n 20 | tee -a "$OUT/summary.txt"
section "tour"
.gpu/bin/tour 2>&1 | tee "$OUT/tour.log" | tail -n 14 | tee -a "$OUT/summary.txt"
section "benches (criterion, CUDA groups)"
.gpu/bin/bench-scan --bench '_cuda/' > "$OUT/bench.log" 2>&1 || status=1
.gpu/bin/bench-topk --bench '_cuda/' >> "$OUT/bench.log" 2>&1 || status=1
grep -E '^(scan|topk|sae)_.*_cuda|thrpt:' "$OUT/bench.log" | tee -a "$OUT/summary.txt"
section "anchors (PyTorch, same card)"
if [ -f .gpu/gpu.py ]; then
  timeout 240 python3 .gpu/gpu.py copy scan_linear sae_encode topk 2>&1 | tee "$OUT/anchors.log" | tee -a "$OUT/summary.txt"
fi
section "status $status"
exit $status
RUN
chmod +x "$stage/run.sh"
du -sh "$stage"
echo "staged in $stage; now: run(command=\"bash .gpu/run.sh\", carry=[\".gpu\"], timeout_s=540)"
