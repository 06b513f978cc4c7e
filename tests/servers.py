"""Start a real `sift serve` (uvicorn) on a free loopback port for tests, and stop it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from tests.conftest import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def sift_server(env: dict[str, str], ready_timeout: float = 180) -> Iterator[tuple[str, subprocess.Popen]]:
    """Yield (base URL, process) once `/readyz` answers 200; kill the process afterwards if still running.
    The server's output goes to a temporary file, readable at `process.log_path`."""
    port = free_port()
    cmd = [sys.executable, "-c", "from app.cli import main; main()", "serve", "--port", str(port)]
    log = tempfile.NamedTemporaryFile(prefix="sift-server-", suffix=".log", delete=False)
    process = subprocess.Popen(
        [*cmd, "--host", "127.0.0.1"],
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    process.log_path = log.name
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + ready_timeout
    try:
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None:
                pytest.fail(f"server exited during start-up: {open(log.name).read()[-3000:]}")
            if time.time() > deadline:
                pytest.fail(f"server not ready in {ready_timeout} s")
            time.sleep(0.5)
        yield base, process
    finally:
        if process.poll() is None:  # SIGTERM first: a pre-fork master stops its workers
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)
        os.unlink(log.name)
