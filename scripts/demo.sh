#!/usr/bin/env bash
# shoal's main job on its embedded default: today the shard engine on Fashion-MNIST.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh
exec cargo run --release --locked -p shoal --bin shoal -- demo "$@"
