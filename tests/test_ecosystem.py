"""Drop-in endpoints against a real Sift server with the official clients: cohere's v2 `rerank` and openai's
`embeddings.create`; the numbers equal Sift's own (search's rerank stage, the bundle's stored vectors)."""

from __future__ import annotations

import base64

import faiss
import httpx
import numpy as np
import pytest

from indexer.bundle import DENSE_DIR, DOCSTORE, open_bundle
from indexer.dense import INDEX_FILE
from indexer.docstore import Docstore
from indexer.models import passage_index_text
from tests.conftest import ROOT
from tests.servers import app_client, sift_server

QUERY = "how do stars form"


@pytest.fixture(scope="module")
def server(example_index):
    env = {
        "SIFT_BUNDLE": str(example_index),
        "SIFT_GENERATOR__BACKEND": "none",
        "SIFT_RERANKER__MODEL": str(ROOT / "models" / "sift-reranker-minilm-l6"),
        "SIFT_RERANKER__MAX_LENGTH": "128",
        "SIFT_EMBEDDINGS__MAX_INPUTS": "8",
    }
    with sift_server(env) as (base, _):
        yield base


def test_cohere_client_rerank_equals_the_search_rerank_stage(server):
    import cohere

    search = httpx.post(
        f"{server}/v1/search", json={"query": QUERY, "k": 6, "rerank": True, "rerank_depth": 6}, timeout=60
    ).json()
    hits = search["hits"]
    by_id = {h["passage_id"]: h["explain"]["rerank"]["score"] for h in hits}
    texts = [passage_index_text(h["title"], h["text"]) for h in hits]
    client = cohere.ClientV2(api_key="unused", base_url=server)
    reply = client.rerank(model="sift", query=QUERY, documents=texts[::-1], top_n=4)
    assert len(reply.results) == 4
    scores = [r.relevance_score for r in reply.results]
    assert scores == sorted(scores, reverse=True)
    for result in reply.results:
        pid = hits[::-1][result.index]["passage_id"]
        assert result.relevance_score == pytest.approx(by_id[pid], abs=1e-4)
    # Sift's addition: passage ids instead of text give the same scores
    by_ids = httpx.post(
        f"{server}/v1/rerank",
        json={"query": QUERY, "documents": [{"id": h["passage_id"]} for h in hits], "return_documents": True},
        timeout=60,
    ).json()
    assert [hits[r["index"]]["passage_id"] for r in by_ids["results"]] == [h["passage_id"] for h in hits]
    for r in by_ids["results"]:
        assert r["relevance_score"] == pytest.approx(by_id[hits[r["index"]]["passage_id"]], abs=1e-4)
        assert r["document"]["text"] == texts[r["index"]]
    assert by_ids["usage"]["total_tokens"] > 0 and by_ids["meta"]["bundle"] == search["bundle"]


def test_long_documents_are_truncated_and_said_so(server):
    long_doc = "Stars form in cold clouds of gas. " * 200
    r = httpx.post(
        f"{server}/v1/rerank",
        json={"query": QUERY, "documents": [long_doc, "Bread rises because of yeast."], "max_tokens_per_doc": 32},
        timeout=60,
    ).json()
    assert r["meta"]["truncated_documents"] == [0]
    assert [x["index"] for x in r["results"]] == [0, 1] and r["results"][0]["truncated"] is True


def test_openai_client_embeddings_equal_the_stored_vectors(server, example_index):
    from openai import OpenAI

    info = open_bundle(example_index)
    store = Docstore(info.path(DOCSTORE))
    rows = store.passage_texts()[:3]
    store.close()
    stored = faiss.read_index(str(info.path(DENSE_DIR) / INDEX_FILE)).reconstruct_n(0, 3)
    texts = [passage_index_text(title, text) for _, title, text in rows]
    client = OpenAI(base_url=f"{server}/v1", api_key="unused")
    reply = client.embeddings.create(model="sift", input=texts)  # the client asks for base64 and decodes it
    got = np.asarray([d.embedding for d in reply.data], dtype=np.float32)
    cosine = (got * stored).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(stored, axis=1))
    assert cosine.min() >= 0.999 and reply.usage.prompt_tokens > 0
    assert np.linalg.norm(got, axis=1) == pytest.approx(1.0, abs=1e-4), "normalised as the index"
    floats = httpx.post(
        f"{server}/v1/embeddings", json={"input": texts[0], "encoding_format": "float"}, timeout=60
    ).json()
    b64 = httpx.post(f"{server}/v1/embeddings", json={"input": [texts[0]], "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, floats["data"][0]["embedding"], atol=1e-6) and len(decoded) == 384


@pytest.mark.parametrize(
    ("path", "body", "status", "field"),
    [
        ("/v1/rerank", {"query": QUERY, "documents": []}, 422, "documents"),
        ("/v1/rerank", {"query": QUERY, "documents": ["  "]}, 422, "documents"),
        ("/v1/rerank", {"query": QUERY, "documents": ["a"], "top_n": 0}, 422, "top_n"),
        ("/v1/rerank", {"query": QUERY, "documents": ["a"] * 201}, 413, "documents"),
        ("/v1/rerank", {"query": QUERY, "documents": [{"id": "no-such#0"}]}, 422, "documents"),
        ("/v1/rerank", {"query": " ", "documents": ["a"]}, 422, "query"),
        ("/v1/embeddings", {"input": ["a"], "encoding_format": "int8"}, 422, "encoding_format"),
        ("/v1/embeddings", {"input": ["a"] * 9}, 413, "input"),
        ("/v1/embeddings", {"input": []}, 422, "input"),
        ("/v1/embeddings", {"input": "x" * 9000}, 413, "input"),
        ("/v1/embeddings", {"input": "a", "dimensions": 12}, 422, "dimensions"),
    ],
)
def test_bad_input_gets_a_json_error_naming_the_field(server, path, body, status, field):
    r = httpx.post(f"{server}{path}", json=body, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["fields"][0]["field"].startswith(field), error


def test_rerank_without_a_reranker_says_how_to_configure_one(example_settings):
    with app_client(example_settings) as client:  # reranker.model: null
        r = client.post("/v1/rerank", json={"query": QUERY, "documents": ["a"]})
    assert r.status_code == 422 and "SIFT_RERANKER__MODEL" in r.json()["error"]["message"]


def test_concurrent_embeddings_and_reranks_never_fail(server):
    """The tokenizers are not thread-safe: counting tokens beside a running encode once gave 500s."""
    from concurrent.futures import ThreadPoolExecutor

    texts = [f"passage number {i} about stars, bread and tides" for i in range(32)]

    def call(i: int) -> int:
        if i % 2:
            body = {"query": QUERY, "documents": texts[:12], "max_tokens_per_doc": 8}
            return httpx.post(f"{server}/v1/rerank", json=body, timeout=120).status_code
        return httpx.post(f"{server}/v1/embeddings", json={"input": texts[:8]}, timeout=120).status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(call, range(24)))
    assert statuses == [200] * 24


def test_maxsim_and_dense_search_share_one_lock_per_encoder(example_pipeline):
    """MaxSim over the bundle's own bi-encoder and dense query encoding run on different threads; one
    tokenizer must never be used by both at once (a private lock each did not prevent that)."""
    from app.retrieval.maxsim import MaxSimReranker

    dense = example_pipeline.searchers["dense"]
    maxsim = MaxSimReranker.load("maxsim", 128, "cpu", encoder=dense.encoder)
    assert maxsim._lock is dense.queries._lock
