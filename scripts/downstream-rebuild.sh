#!/usr/bin/env bash
# The user's edit-build loop, measured: builds downstream/ (a crate that uses one op of each
# family through the public API, as a user's crate does), then edits only its own main.rs
# and times the rebuild, three times. Arguments go to cargo build (e.g. --release).
set -euo pipefail
cd "$(dirname "$0")/../downstream"
cargo build "$@" 2>&1 | tail -n 1
for i in 1 2 3; do
  printf '// edit %s\n' "$i" >> src/main.rs
  start=$(date +%s.%N)
  cargo build "$@" 2>&1 | grep -q 'Compiling downstream' || { echo "downstream was not rebuilt" >&2; exit 1; }
  end=$(date +%s.%N)
  printf 'rebuild %s after editing downstream/src/main.rs: %.2f s\n' "$i" "$(echo "$end - $start" | bc)"
done
git checkout -q src/main.rs 2>/dev/null || sed -i '/^\/\/ edit [0-9]$/d' src/main.rs
cargo run "$@" 2>&1 | tail -n 4
