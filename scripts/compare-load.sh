#!/usr/bin/env bash
# The load run of docs/benchmarks.md ("Load") against two builds, side by side on
# this machine in one run: for each `shoal` binary, a fresh `shoal dev` (three
# coordinators, two nodes), Cranfield ingested and indexed (`shoal eval
# --build-index`), then the bench's closed-loop search load (4 clients, 20 s) and
# ingest next to the encoder alone. The bench client is this tree's. One JSON line per
# build, tagged, in the order given (repeat a binary to interleave: OLD NEW OLD NEW).
# Usage: scripts/compare-load.sh SHOAL_BIN...
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
ir="${SHOAL_IR_DIR:-../shared/data/ir}"
bench="$CARGO_TARGET_DIR/release/shoal-bench"
# Both clusters run open: an older build may not know TLS or keys (scripts/compare-tls.sh
# compares the two modes of one build).
export SHOAL_DEV_INSECURE=1
[[ -x $bench ]] || { echo "build it first: cargo build --release -p shoal-bench" >&2; exit 1; }
for shoal in "$@"; do
  data=$(mktemp -d)
  start_dev "$data" "$data/dev.log"
  "$shoal" eval "$ir/cranfield" --collection cranfield --build-index >/dev/null
  out=$("$bench" load "$ir/cranfield" --collection cranfield --clients 4 --duration-s 20 \
    --ingest-docs 128 | tail -1)
  echo "{\"build\":\"$shoal\",\"result\":$out}"
  kill -TERM "$SHOAL_DEV_PID"
  wait "$SHOAL_DEV_PID" 2>/dev/null || true
  trap - EXIT
  rm -rf "$data"
done
