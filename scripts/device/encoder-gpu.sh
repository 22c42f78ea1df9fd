#!/usr/bin/env bash
# The GPU encoder benchmark, run on a lent device machine (no Rust toolchain there).
# Prepared here by scripts/device/prepare-encoder-gpu.sh into .gpu/ (git-ignored):
# the shoal-gpu-bench binary built with --features cuda, and the model dir's small
# files (config, tokenizer, pooling). The torch script writes seeded weights into a
# copy of that dir, then the Burn binary loads them; results land in $OUT.
set -euo pipefail
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
model=/tmp/shoal-gpu-model
rm -rf "$model" && cp -r .gpu/model "$model"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
# cudarc opens libcuda and libnvrtc at run time: point it at the toolkit and the pip wheels.
extra=$(python3 - <<'PY'
import glob, os
dirs = ["/usr/local/cuda/lib64"]
try:
    import nvidia
    for p in nvidia.__path__:
        dirs += glob.glob(os.path.join(p, "*", "lib"))
except ImportError:
    pass
print(":".join(d for d in dirs if os.path.isdir(d)))
PY
)
export LD_LIBRARY_PATH="${extra}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTHONUNBUFFERED=1
python3 scripts/reference/torch_gpu_bench.py --model-dir "$model" \
  --texts node/tests/fixtures/minilm_reference.json --out "$OUT/torch.json" "$@" 2>&1 | tee "$OUT/torch.log"
# Each precision with both ways of masking padding: an additive bias (burn-cubecl's
# multi-kernel attention fallback) and a boolean mask (its flash-attention kernels).
for p in fp32 fp16; do
  for m in bias bool; do
    .gpu/shoal-gpu-bench --model-dir "$model" --torch "$OUT/torch.json" --precision $p \
      --mask $m 2>&1 | tee -a "$OUT/burn.log"
  done
done
