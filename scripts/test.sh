#!/usr/bin/env bash
# The test command: set-up, formatting, lints, then every test, all in the one
# release profile that the benchmarks and the demo also use (nothing builds twice).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh

cargo fmt --all --check
cargo clippy --release --workspace --all-targets --locked -- -D warnings
cargo test --release --workspace --locked
