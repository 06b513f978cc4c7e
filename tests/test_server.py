"""The real server: uvicorn on a loopback port, queried with httpx, shut down cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(example_index):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SIFT_BUNDLE": str(example_index), "SIFT_GENERATOR__BACKEND": "none"}
    cmd = [
        sys.executable,
        "-c",
        "from app.cli import main; main()",
        "serve",
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
    ]
    process = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.5)
    else:
        process.kill()
        pytest.fail("server did not become ready in 120 s")
    yield base, process
    if process.poll() is None:
        process.kill()


QUERIES = [
    "how do black holes form",
    "tempering chocolate temperatures",
    "first powered flight",
    "why does bread rise",
    "greenhouse gases and warming",
    "hash table collisions",
    "waggle dance of bees",
    "marathon distance history",
]


def test_search_over_http(server):
    base, _ = server
    response = httpx.post(f"{base}/v1/search", json={"query": "black hole event horizon", "k": 3}, timeout=30)
    assert response.status_code == 200
    assert response.json()["hits"][0]["doc_id"] == "astro-003"
    bad = httpx.post(f"{base}/v1/search", json={"query": "x", "k": 0}, timeout=30)
    assert bad.status_code == 422 and bad.json()["error"]["fields"][0]["field"] == "k"


def test_64_concurrent_requests_equal_sequential_answers(server):
    base, _ = server
    bodies = [
        {"query": QUERIES[i % len(QUERIES)], "k": 10, "mode": ["hybrid", "bm25", "dense"][i % 3]} for i in range(64)
    ]
    with httpx.Client(timeout=60) as client:
        alone = [client.post(f"{base}/v1/search", json=b).json() for b in bodies]

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as client:
            return await asyncio.gather(*(client.post(f"{base}/v1/search", json=b) for b in bodies))

    responses = asyncio.run(fire())
    assert [r.status_code for r in responses] == [200] * 64
    for single, concurrent in zip(alone, (r.json() for r in responses)):
        assert [h["passage_id"] for h in concurrent["hits"]] == [h["passage_id"] for h in single["hits"]]
        assert [h["score"] for h in concurrent["hits"]] == pytest.approx([h["score"] for h in single["hits"]], rel=1e-5)


def test_metrics_and_clean_shutdown(server):
    base, process = server
    metrics = httpx.get(f"{base}/metrics", timeout=10).text
    assert 'route="/v1/search",status="200"' in metrics
    process.send_signal(signal.SIGTERM)
    # uvicorn shuts down gracefully, then re-raises the captured SIGTERM, so the exit status is -SIGTERM
    assert process.wait(timeout=30) in (0, -signal.SIGTERM)
    output = process.stdout.read()
    assert "Waiting for application shutdown" in output and "Application shutdown complete" in output
