#!/usr/bin/env bash
# shoal's main job on its embedded default: a local cluster (three coordinators, two
# nodes, separate processes on loopback) on the bundled Cranfield collection. It sets
# up, builds, starts `shoal dev`, creates the collection, ingests its 1,400 documents
# (encoded on the nodes by the Burn encoder), runs all 225 judged queries through the
# cluster, prints sample results and nDCG@10 / recall@100 / latency, and stops.
# `scripts/demo.sh shard` runs the earlier shard-engine demo on Fashion-MNIST instead.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [[ "${1:-}" == "shard" ]]; then
  shift
  source scripts/env.sh
  exec cargo run --release --locked -p shoal --bin shoal -- demo "$@"
fi
scripts/fetch-model.sh
source scripts/env.sh
cargo build --release --locked -p shoal
shoal="$CARGO_TARGET_DIR/release/shoal"
data="${SHOAL_DEMO_DIR:-$(mktemp -d)}"
start_dev "$data"
"$shoal" status | sed -n '/"nodes"/,$p' | head -20
"$shoal" eval data/cranfield --collection cranfield --build-index --show 3
"$shoal" search "supersonic flow over a flat plate" --collection cranfield -k 5
