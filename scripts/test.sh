#!/usr/bin/env bash
# The test command: set-up, formatting, lints, the CUDA build check, then every test,
# all in the one release profile that the benchmarks and the demo also use.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/fetch-model.sh
source scripts/env.sh

cargo fmt --all --check
cargo clippy --release --workspace --all-targets --locked -- -D warnings
# The GPU backend must keep compiling even where no GPU is present.
cargo check --release --locked -p shoal-gpu-bench --features cuda --all-targets
# The binaries first: the chaos tests and the Python suite start `shoal` processes, and
# `cargo test` builds a package's binaries only for that package's own tests.
cargo build --release --workspace --locked --bins
cargo test --release --workspace --locked
# The deployment files against their tools and the binary just built.
deploy/check.sh
# The Python client against a `shoal dev` of the binary just built (issue 23).
scripts/test-python.sh
