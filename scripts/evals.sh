#!/usr/bin/env bash
# Retrieval quality through a local cluster (`shoal dev`: three coordinators, two
# nodes, 3 shards, RF 1) on the BEIR collections in ../shared/data/ir: each corpus is
# ingested once (encoded on the nodes), scored by exact scan, then an IVF-PQ
# generation is built on every shard and the same queries are scored again, so both
# figures come from the same stored vectors. Output: one JSON line per run, tagged.
# Usage: scripts/evals.sh [COLLECTION...]   (default: scifact medline cacm cranfield)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
shoal="$CARGO_TARGET_DIR/release/shoal"
ir="${SHOAL_IR_DIR:-../shared/data/ir}"
data="${SHOAL_EVAL_DIR:-$(mktemp -d)}"; mkdir -p "$data"
sets=("$@"); [[ ${#sets[@]} -gt 0 ]] || sets=(scifact medline cacm cranfield)
start_dev "$data" "$data/dev.log"
for s in "${sets[@]}"; do
  exact=$("$shoal" eval "$ir/$s" --collection "$s" --mode dense | tail -1)
  echo "{\"run\":\"exact\",\"result\":$exact}"
  ivf=$("$shoal" eval "$ir/$s" --collection "$s" --build-index --mode dense | tail -1)
  echo "{\"run\":\"ivfpq\",\"result\":$ivf}"
done
