#!/usr/bin/env bash
# The Python client's and the web console's tests (issue 23): a virtual environment with the client installed
# from clients/python (its stubs generated from proto/ by the build), then pytest
# against a `shoal dev` of the release binary (the tests start and stop it).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
VENV="$HOME/.cache/shoal/pyclient"
# The console's browser test drives Debian's Chromium through its chromedriver (no
# browser download at test time).
command -v chromium >/dev/null && command -v chromedriver >/dev/null \
  || apt_install test-python chromium chromium-driver
if ! "$VENV/bin/python" -c "import pytest, pytest_asyncio, selenium, grpc_tools, pyarrow" 2>/dev/null; then
  python3 -m venv --help >/dev/null 2>&1 && python3 -c "import ensurepip" 2>/dev/null \
    || apt_install test-python python3-venv
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check \
    "grpcio>=1.60,<2" "grpcio-tools>=1.60,<2" "numpy>=1.22,<3" "pyarrow>=12" \
    "pytest>=7,<10" "pytest-asyncio>=0.21,<2" "selenium>=4.10,<5"
fi
"$VENV/bin/pip" install --quiet --disable-pip-version-check --force-reinstall --no-deps ./clients/python
SHOAL_BIN="$CARGO_TARGET_DIR/release/shoal" "$VENV/bin/pytest" -q clients/python/tests "$@"
