#!/usr/bin/env bash
# Batch search (issue 22, docs/benchmarks.md "Batch search"): a fresh `shoal dev`
# (three coordinators, two nodes), then `shoal-bench batch` for each batch size given
# (default 8 32 64): B random-vector queries as one SearchBatch next to B concurrent
# and B sequential Search calls, alternating, answers compared. One JSON line per size.
# Usage: scripts/bench-batch.sh [BATCH...]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
shoal="$CARGO_TARGET_DIR/release/shoal"
bench="$CARGO_TARGET_DIR/release/shoal-bench"
[[ -x $bench && -x $shoal ]] || { echo "build first: cargo build --release -p shoal -p shoal-bench" >&2; exit 1; }
sizes=("$@"); [[ ${#sizes[@]} -gt 0 ]] || sizes=(8 32 64)
data=$(mktemp -d)
start_dev "$data" "$data/dev.log"
for b in "${sizes[@]}"; do
  "$bench" batch --batch "$b" | tail -1
done
