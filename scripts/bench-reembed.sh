#!/usr/bin/env bash
# A re-embed under query load (issue 21) through a local cluster: `shoal dev` with both
# models on every node (insecure: the bench's clients speak neither TLS nor keys), the
# dataset ingested and indexed with all-MiniLM-L6-v2 by `shoal eval --build-index`,
# then `shoal-bench reembed` (to all-mpnet-base-v2 under 2 text-query clients, then
# committed). One JSON line. Needs scripts/fetch-model.sh mpnet.
# Usage: scripts/bench-reembed.sh [DATASET] [bench args...]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
shoal="$CARGO_TARGET_DIR/release/shoal"
bench="$CARGO_TARGET_DIR/release/shoal-bench"
set_name=${1:-cranfield}; shift || true
ir="${SHOAL_IR_DIR:-../shared/data/ir}"
data="${SHOAL_EVAL_DIR:-$(mktemp -d)}"; mkdir -p "$data"
new_model="${SHOAL_NEW_MODEL_DIR:-$PWD/models/all-mpnet-base-v2}"
export SHOAL_DEV_INSECURE=1 SHOAL_EXTRA_MODEL_DIRS="$new_model"
start_dev "$data" "$data/dev.log"
"$shoal" eval "$ir/$set_name" --collection "$set_name" --build-index | tail -1 >&2
"$bench" reembed --dataset "$ir/$set_name" --collection "$set_name" --dev-dir "$data" \
  --new-model-dir "$new_model" "$@"
