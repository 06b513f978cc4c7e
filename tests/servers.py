"""Start the service for tests as real servers start it: `sift serve` (uvicorn) on a free loopback port, or
the same app from settings in process (`app_client`, FastAPI's TestClient); stop it afterwards."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from tests.conftest import ROOT

if TYPE_CHECKING:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from app.pipeline import Pipeline
    from app.settings import Settings


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


def wait_ready(
    get: Callable[[str], Any], ready_timeout: float = 300, failed: Callable[[], str | None] = lambda: None
) -> None:
    """Poll `get("/readyz")` until it answers 200. The deadline only catches a hang (no claim about speed);
    `failed()` returning an error (models that failed to load: nothing will retry) fails at once."""
    deadline = time.monotonic() + ready_timeout
    while True:
        response = get("/readyz")
        if response.status_code == 200:
            return
        if error := failed():
            pytest.fail(f"the app failed to load: {error}")
        if time.monotonic() > deadline:
            pytest.fail(f"app not ready in {ready_timeout} s: {response.text[:2000]}")
        time.sleep(0.1)


@contextmanager
def app_client(settings: Settings, ready_timeout: float = 300, **options: Any) -> Iterator[TestClient]:
    """`create_app(settings)` in FastAPI's TestClient (`options`: the client's), started as `sift serve`
    starts it: its lifespan loads the models, every collection's build (with its lease) and the second
    stage's calibration in the background, under the server's thread policy. Yields the client once
    `/readyz` answers 200; the app is closed (builds, leases, models) when the block ends."""
    from fastapi.testclient import TestClient

    from app.api.main import create_app

    with TestClient(create_app(settings), **options) as client:
        wait_ready(client.get, ready_timeout, lambda: client.app.state.services.load_error)
        yield client


def served_pipeline(app: FastAPI, collection: str | None = None) -> Pipeline:
    """The pipeline of the build `app` serves now for `collection` (default: the first), reached the way the app
    holds it: services → collection → current build → pipeline."""
    return app.state.services.collection(collection).current.pipeline
