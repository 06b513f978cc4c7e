"""The real server: uvicorn on a loopback port, queried with httpx, shut down cleanly."""

from __future__ import annotations

import asyncio
import signal

import httpx
import pytest

from tests.servers import sift_server


@pytest.fixture(scope="module")
def server(example_index):
    env = {"SIFT_BUNDLE": str(example_index), "SIFT_GENERATOR__BACKEND": "none", "SIFT_RERANKER__MODEL": "none"}
    with sift_server(env) as (base, process):
        yield base, process


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
    output = open(process.log_path, encoding="utf-8").read()
    assert "Waiting for application shutdown" in output and "Application shutdown complete" in output
