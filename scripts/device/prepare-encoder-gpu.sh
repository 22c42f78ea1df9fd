#!/usr/bin/env bash
# Builds what scripts/device/encoder-gpu.sh needs on the device machine into .gpu/
# (ignored through .git/info/exclude; carried with the device tool's `carry: [".gpu"]`).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
cargo build --release --locked -p shoal-gpu-bench --features cuda
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/model/1_Pooling
strip -o .gpu/shoal-gpu-bench "$CARGO_TARGET_DIR/release/shoal-gpu-bench"
m=models/all-MiniLM-L6-v2
cp "$m"/{config.json,tokenizer.json,modules.json,sentence_bert_config.json} .gpu/model/
cp "$m"/1_Pooling/config.json .gpu/model/1_Pooling/
du -sh .gpu
