#!/usr/bin/env bash
# An online rebuild under query load (issue 21) through a local cluster: `shoal dev`
# (insecure: the bench's clients speak neither TLS nor keys), SciFact ingested and
# indexed by `shoal eval --build-index`, then `shoal-bench rebuild` (a rebuild to other
# parameters under 2 query clients, rollback, a second rebuild committed). One JSON
# line. Usage: scripts/bench-rebuild.sh [DATASET] [bench args...]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
shoal="$CARGO_TARGET_DIR/release/shoal"
bench="$CARGO_TARGET_DIR/release/shoal-bench"
set_name=${1:-scifact}; shift || true
ir="${SHOAL_IR_DIR:-../shared/data/ir}"
data="${SHOAL_EVAL_DIR:-$(mktemp -d)}"; mkdir -p "$data"
export SHOAL_DEV_INSECURE=1
start_dev "$data" "$data/dev.log"
"$shoal" eval "$ir/$set_name" --collection "$set_name" --build-index | tail -1 >&2
"$bench" rebuild --dataset "$ir/$set_name" --collection "$set_name" --dev-dir "$data" "$@"
