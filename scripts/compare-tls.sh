#!/usr/bin/env bash
# The load run of docs/benchmarks.md ("Load") with and without TLS and API keys, side by
# side on this machine in one run (issue 17): for each mode, a fresh `shoal dev` (three
# coordinators, two nodes; open with --insecure, or with its local CA, certificates and
# root key), Cranfield ingested and indexed, then the bench's closed-loop search load
# (4 clients, 20 s) and ingest next to the encoder alone. One JSON line per run, tagged,
# in the order given (default: open secure open secure).
# Usage: scripts/compare-tls.sh [open|secure]...
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
ir="${SHOAL_IR_DIR:-../shared/data/ir}"
shoal="$CARGO_TARGET_DIR/release/shoal"
bench="$CARGO_TARGET_DIR/release/shoal-bench"
[[ -x $bench && -x $shoal ]] || { echo "build first: cargo build --release -p shoal -p shoal-bench" >&2; exit 1; }
modes=("$@")
((${#modes[@]})) || modes=(open secure open secure)
for mode in "${modes[@]}"; do
  unset SHOAL_INSECURE SHOAL_DEV_INSECURE SHOAL_TLS_CA SHOAL_TLS_CERT SHOAL_TLS_KEY SHOAL_API_KEY_FILE
  [[ $mode == open ]] && export SHOAL_DEV_INSECURE=1
  data=$(mktemp -d)
  start_dev "$data" "$data/dev.log"
  "$shoal" eval "$ir/cranfield" --collection cranfield --build-index >/dev/null
  out=$("$bench" load "$ir/cranfield" --collection cranfield --clients 4 --duration-s 20 \
    --ingest-docs 128 | tail -1)
  echo "{\"mode\":\"$mode\",\"result\":$out}"
  kill -TERM "$SHOAL_DEV_PID"
  wait "$SHOAL_DEV_PID" 2>/dev/null || true
  trap - EXIT
  rm -rf "$data"
done
