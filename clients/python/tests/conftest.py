"""A `shoal dev` cluster for the client's tests: three coordinators and two nodes as
processes with TLS and the root key, started once for the session from the binary
$SHOAL_BIN (default: the repository's release build), stopped at the end."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import tempfile
import time

import pytest

from shoal_client import Client

REPO = pathlib.Path(__file__).resolve().parents[3]


def shoal_bin() -> str:
    if os.environ.get("SHOAL_BIN"):
        return os.environ["SHOAL_BIN"]
    target = os.environ.get("CARGO_TARGET_DIR", str(pathlib.Path.home() / ".cache/shoal/target"))
    return str(pathlib.Path(target) / "release" / "shoal")


@pytest.fixture(scope="session")
def dev():
    data = tempfile.mkdtemp(prefix="shoal-pytest-")
    log = open(os.path.join(data, "dev.log"), "wb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    # Placement's disk watermarks near full: a build machine's volume may be mostly
    # used already (the tests write a few MB).
    env.update(SHOAL_DISK_LOW_WATERMARK="0.98", SHOAL_DISK_HIGH_WATERMARK="0.99")
    proc = subprocess.Popen(
        # --keep-going: the console test kills a node and watches the map say so.
        [shoal_bin(), "dev", "--data-dir", data, "--keep-going"],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"shoal dev exited with {proc.returncode}: see {data}/dev.log")
            try:
                with Client.dev(data, patience=1.0, timeout=2.0) as c:
                    if sum(n["state"] == "up" for n in c.status()["nodes"]) == 2:
                        break
            except Exception:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"shoal dev: nodes not up after 120 s: see {data}/dev.log")
            time.sleep(0.5)
        yield {"data": data, "proc": proc, "bin": shoal_bin(), "repo": REPO}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture
def client(dev):
    with Client.dev(dev["data"]) as c:
        yield c
