"""Defects found in Sift's HTTP API, each pinned by a test against a real `sift serve` where how the server
starts shapes the behaviour (settings from the environment, a sharded build); sections are numbered as the
defects were."""

from __future__ import annotations

import httpx
import pytest

from tests.servers import sift_server

QUERY = "how do stars form"
QUESTION = "When was the Eiffel Tower completed?"


@pytest.fixture(scope="module")
def maxsim_server(example_index):
    """One real server: MaxSim alone as the second stage, extractive answers (no generator), default k 3."""
    env = {
        "SIFT_BUNDLE": str(example_index),
        "SIFT_SEARCH__DEFAULT_K": "3",
        "SIFT_RERANKER__MODEL": "maxsim",
        "SIFT_RERANKER__MAXSIM": "true",
        "SIFT_GENERATOR__BACKEND": "none",
        "SIFT_ANSWER__MODE": "extractive",
    }
    with sift_server(env) as (base, _):
        yield base


# -- 1. search.default_k -----------------------------------------------------------------------------------------


def test_omitted_k_defaults_to_search_default_k_over_http(maxsim_server):
    search = httpx.post(f"{maxsim_server}/v1/search", json={"query": QUERY}, timeout=60)
    assert search.status_code == 200, search.text
    assert len(search.json()["hits"]) == 3
    batch = httpx.post(f"{maxsim_server}/v1/search/batch", json={"queries": [QUERY, "tea"]}, timeout=60).json()
    assert [len(r["hits"]) for r in batch["results"]] == [3, 3]
    assert len(httpx.post(f"{maxsim_server}/v1/search", json={"query": QUERY, "k": 5}, timeout=60).json()["hits"]) == 5
    # the document does not promise a fixed default: it names the setting
    k = httpx.get(f"{maxsim_server}/openapi.json").json()["components"]["schemas"]["SearchRequest"]["properties"]["k"]
    assert k.get("default") is None and "search.default_k" in k["description"]
