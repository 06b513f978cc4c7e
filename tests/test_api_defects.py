"""Defects found in Sift's HTTP API, each pinned by a test against a real `sift serve` where how the server
starts shapes the behaviour (settings from the environment, a sharded build); sections are numbered as the
defects were."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from indexer.build import reshard_bundle
from indexer.bundle import open_bundle
from indexer.docstore import Docstore
from indexer.models import passage_index_text
from tests.servers import app_client, served_pipeline, sift_server

QUERY = "how do stars form"
QUESTION = "When was the Eiffel Tower completed?"


@pytest.fixture(scope="module")
def maxsim_server(int8_example_index):
    """One real server: MaxSim alone as the second stage, extractive answers (no generator), default k 3; over the
    example corpus with int8 token vectors, which equal a fresh encoding to 5e-3 (pq codes approximate it)."""
    env = {
        "SIFT_BUNDLE": str(int8_example_index),
        "SIFT_SEARCH__DEFAULT_K": "3",
        "SIFT_RERANKER__MODEL": "maxsim",
        "SIFT_RERANKER__MAXSIM": "true",
        "SIFT_GENERATOR__BACKEND": "none",
        "SIFT_ANSWER__MODE": "extractive",
    }
    with sift_server(env) as (base, _):
        yield base


@pytest.fixture(scope="module")
def sharded_index(example_index, tmp_path_factory):
    """examples/ in two shards (the passages and vectors of `example_index`, split)."""
    return reshard_bundle(example_index, tmp_path_factory.mktemp("two-shards") / "index", 2, show_progress=False).path


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


# -- 2. allow_partial on /v1/search/batch, /v1/answer and chat ---------------------------------------------------


class _DeadShard:
    """A shard that does not answer."""

    def search_many(self, *args, **kwargs):
        raise TimeoutError("shard frozen")

    def search_vectors(self, *args, **kwargs):
        raise TimeoutError("shard frozen")


@pytest.fixture(scope="module")
def partial_client(sharded_index):
    from app.settings import load_settings

    settings = load_settings(
        bundle=sharded_index, reranker={"model": None}, generator={"backend": "none"}, answer={"mode": "extractive"}
    )
    with app_client(settings) as client:
        pipeline = served_pipeline(client.app)
        for name in ("bm25", "dense"):
            pipeline.searchers[name].shards[1] = _DeadShard()
        lost = {row[1] for row in pipeline.docstore.docstores[1].passage_rows()}  # documents of shard-001
        yield client, lost


def _assert_names_the_dead_shard(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert (
        error["type"] == "shard_unavailable" and error["shard"] == "shard-001" and "allow_partial" in error["message"]
    )


def test_batch_search_honours_allow_partial(partial_client):
    client, lost = partial_client
    body = {"queries": [QUERY, "bread and yeast"], "k": 5, "mode": "hybrid"}
    _assert_names_the_dead_shard(client.post("/v1/search/batch", json=body))
    partial = client.post("/v1/search/batch", json={**body, "allow_partial": True})
    assert partial.status_code == 200, partial.text
    data = partial.json()
    assert data["missing_shards"] == ["shard-001"]
    assert [r["missing_shards"] for r in data["results"]] == [["shard-001"], ["shard-001"]]
    hits = [h for r in data["results"] for h in r["hits"]]
    assert [len(r["hits"]) for r in data["results"]] == [5, 5] and not {h["doc_id"] for h in hits} & lost
    # the same as /v1/search with allow_partial, query by query
    for query, result in zip(body["queries"], data["results"]):
        one = client.post("/v1/search", json={"query": query, "k": 5, "allow_partial": True}).json()
        assert one["missing_shards"] == ["shard-001"]
        assert [h["passage_id"] for h in one["hits"]] == [h["passage_id"] for h in result["hits"]]


def test_answer_and_chat_honour_allow_partial(partial_client):
    client, lost = partial_client
    body = {"question": QUESTION, "k": 5}
    _assert_names_the_dead_shard(client.post("/v1/answer", json=body))
    answer = client.post("/v1/answer", json={**body, "allow_partial": True})
    assert answer.status_code == 200, answer.text
    data = answer.json()
    assert data["missing_shards"] == ["shard-001"]
    assert data["passages"] and not {p["doc_id"] for p in data["passages"]} & lost
    with client.stream("POST", "/v1/answer", json={**body, "allow_partial": True, "stream": True}) as stream:
        assert stream.status_code == 200
        text = "".join(stream.iter_text())
    assert '"missing_shards": ["shard-001"]' in text.split("event: token")[0]  # the passages event says so
    chat = {"messages": [{"role": "user", "content": QUESTION}], "sift": {"k": 5}}
    _assert_names_the_dead_shard(client.post("/v1/chat/completions", json=chat))
    chat["sift"]["allow_partial"] = True
    completion = client.post("/v1/chat/completions", json=chat)
    assert completion.status_code == 200, completion.text
    assert completion.json()["missing_shards"] == ["shard-001"]


# -- 3. the chat stream's usage chunk (stream_options.include_usage) -------------------------------------------


def test_openai_stream_with_include_usage_ends_with_a_usage_chunk(maxsim_server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{maxsim_server}/v1", api_key="unused")
    messages = [{"role": "user", "content": QUESTION}]
    chunks = list(
        client.chat.completions.create(
            model="sift-rag", messages=messages, stream=True, stream_options={"include_usage": True}
        )
    )
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    usage = last.usage
    assert all(isinstance(n, int) and n > 0 for n in (usage.prompt_tokens, usage.completion_tokens))
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1]) and all(c.choices for c in chunks[:-1])
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert "1889" in streamed
    # the numbers a non-streamed reply reports for the same answer
    plain = client.chat.completions.create(model="sift-rag", messages=messages)
    assert plain.choices[0].message.content == streamed
    assert (plain.usage.prompt_tokens, plain.usage.completion_tokens) == (usage.prompt_tokens, usage.completion_tokens)
    # without include_usage: no usage chunk, no usage field
    chunks = list(client.chat.completions.create(model="sift-rag", messages=messages, stream=True))
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)


# -- 4. /v1/rerank with MaxSim alone as the second stage -------------------------------------------------------


def test_cohere_client_rerank_with_maxsim_alone_equals_the_search_maxsim_stage(maxsim_server):
    import cohere

    search = httpx.post(
        f"{maxsim_server}/v1/search", json={"query": QUERY, "k": 6, "rerank": True, "rerank_depth": 6}, timeout=60
    ).json()
    hits = search["hits"]
    assert len(hits) == 6 and all(h["explain"]["maxsim"]["score"] is not None for h in hits)
    maxsim = {h["passage_id"]: h["explain"]["maxsim"]["score"] for h in hits}
    # by passage id: the stored token vectors /v1/search scores with, so exactly its numbers
    by_ids = httpx.post(
        f"{maxsim_server}/v1/rerank",
        json={"query": QUERY, "documents": [{"id": h["passage_id"]} for h in hits], "return_documents": True},
        timeout=60,
    )
    assert by_ids.status_code == 200, by_ids.text
    results = by_ids.json()["results"]
    assert sorted(r["index"] for r in results) == list(range(6))
    for r in results:
        assert r["relevance_score"] == pytest.approx(maxsim[hits[r["index"]]["passage_id"]], abs=1e-5)
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True) and by_ids.json()["meta"]["model"] == "maxsim"
    assert by_ids.json()["usage"]["total_tokens"] > 0
    # free texts through the official client: encoded by the bundle's bi-encoder (the stored vectors are int8)
    texts = [passage_index_text(h["title"], h["text"]) for h in hits]
    client = cohere.ClientV2(api_key="unused", base_url=maxsim_server)
    reply = client.rerank(model="sift", query=QUERY, documents=texts[::-1], top_n=4)
    assert len(reply.results) == 4
    got = [r.relevance_score for r in reply.results]
    assert got == sorted(got, reverse=True) and 0.3 < got[0] <= 1.0
    for result in reply.results:
        assert result.relevance_score == pytest.approx(maxsim[hits[::-1][result.index]["passage_id"]], abs=5e-3)
    unrelated = client.rerank(model="sift", query=QUERY, documents=["Bread rises because of yeast.", texts[0]])
    assert [r.index for r in unrelated.results] == [1, 0]


# -- 5. /v1/embeddings over a sharded build -----------------------------------------------------------------------


def test_openai_client_embeddings_over_a_sharded_build_equal_the_unsharded_ones(maxsim_server, sharded_index):
    from openai import OpenAI

    store = Docstore(sharded_index / "shard-001" / "docstore.sqlite")
    texts = [passage_index_text(title, text) for _, title, text in store.passage_texts()[:3]] + [QUERY]
    store.close()

    def embed(base: str) -> tuple[np.ndarray, int]:
        reply = OpenAI(base_url=f"{base}/v1", api_key="unused").embeddings.create(model="sift", input=texts)
        return np.asarray([d.embedding for d in reply.data], dtype=np.float32), reply.usage.prompt_tokens

    env = {"SIFT_BUNDLE": str(sharded_index), "SIFT_RERANKER__MODEL": "none", "SIFT_GENERATOR__BACKEND": "none"}
    assert len(open_bundle(sharded_index).manifest["shards"]["map"]) == 2
    with sift_server(env) as (sharded, _):
        got, tokens = embed(sharded)
    want, want_tokens = embed(maxsim_server)
    assert got.shape == want.shape == (4, 384) and tokens == want_tokens > 0
    cosine = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cosine.min() >= 0.9999, cosine


# -- 6. the OpenAPI document agrees with the server (tests/test_fuzz.py fuzzes every operation) -----------------


@pytest.fixture(scope="module")
def documented_client(example_index):
    """In process, as tests/test_fuzz.py serves it: MaxSim alone, extractive answers."""
    from tests.test_fuzz import documented_settings

    with app_client(documented_settings(example_index)) as client:
        yield client


def _validator(document: dict, path: str):
    import jsonschema

    schema = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    return jsonschema.Draft202012Validator({**schema, "components": document["components"]})


USER = [{"role": "user", "content": QUESTION}]
AGREEMENT = [  # (path, body, whether the document allows it): the server must agree (2xx, or a 4xx)
    ("/v1/search", {"query": "tea", "k": 3}, True),
    ("/v1/search", {"query": "tea", "k": 3.0}, True),  # JSON Schema's integer admits 3.0
    ("/v1/search", {"query": " \t"}, False),
    ("/v1/search", {"query": "tea", "k": "3"}, False),
    ("/v1/search", {"query": "tea", "rerank": 1}, False),
    ("/v1/search", {"query": "tea", "cursor": "not a cursor!"}, False),
    ("/v1/search", {"query": "tea", "cursor": "eyJ2IjoxfQ", "offset": 3}, False),
    ("/v1/search", {"query": "tea", "filters": {" ": "x"}}, False),
    ("/v1/search/batch", {"queries": ["tea", ""]}, False),
    ("/v1/search/batch", {"queries": ["tea"], "offset": "2"}, False),
    ("/v1/search/batch", {"queries": ["tea"], "offset": 2}, True),
    ("/v1/rerank", {"query": "tea", "documents": ["tea leaves", ""]}, False),
    ("/v1/rerank", {"query": "tea", "documents": ["tea leaves"], "return_documents": "yes"}, False),
    ("/v1/rerank", {"query": "tea", "documents": ["tea leaves"], "return_documents": True}, True),
    ("/v1/rerank", {"query": "tea", "documents": [{"id": "cook-003#0", "text": "tea"}]}, False),
    ("/v1/embeddings", {"input": ""}, False),
    ("/v1/embeddings", {"input": []}, False),
    ("/v1/embeddings", {"input": "tea", "dimensions": 12}, False),
    ("/v1/embeddings", {"input": "tea", "dimensions": 384}, True),
    ("/v1/answer", {"question": QUESTION, "generation": {"top_k": 5}}, False),
    ("/v1/answer", {"question": QUESTION, "generation": {"top_k": 5, "temperature": 0.5}}, True),
    ("/v1/answer", {"question": QUESTION, "generation": {"max_new_tokens": "5"}}, False),
    ("/v1/answer", {"question": QUESTION, "generation": {"num_beams": 2}, "stream": True}, False),
    ("/v1/answer", {"question": QUESTION, "generation": {"stop": [""]}}, False),
    ("/v1/chat/completions", {"messages": [{"role": "tool"}]}, False),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, False),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "Eiffel?"}]}]}, True),
    ("/v1/chat/completions", {"messages": USER, "stop": ""}, False),
    ("/v1/chat/completions", {"messages": USER, "seed": -1}, False),
    ("/v1/chat/completions", {"messages": USER, "stream": "false"}, False),
    ("/v1/chat/completions", {"messages": USER, "seed": 7}, True),
]


@pytest.mark.parametrize(("path", "body", "allowed"), AGREEMENT)
def test_the_document_allows_what_the_server_accepts(documented_client, path, body, allowed):
    document = documented_client.get("/openapi.json").json()
    assert _validator(document, path).is_valid(body) is allowed, body
    response = documented_client.post(path, json=body)
    if allowed:
        assert response.status_code == 200, response.text
    else:
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["type"] == "validation_error" and error["fields"][0]["field"], error


def test_the_document_follows_the_configuration(documented_client, example_settings):
    """What a server cannot do leaves its document: without a second stage `rerank: true` and /v1/rerank
    (both 422s); a `dimensions` other than the bi-encoder's; a made-up cursor or passage id (formats)."""
    document = documented_client.get("/openapi.json").json()
    components = document["components"]["schemas"]
    dimensions = components["EmbeddingsRequest"]["properties"]["dimensions"]["anyOf"][0]
    assert dimensions["enum"] == [384]
    cursor = components["SearchRequest"]["properties"]["cursor"]["anyOf"][0]
    assert cursor["format"] == "sift-cursor" and cursor["pattern"] == "^[A-Za-z0-9_-]+$"
    assert "/v1/rerank" in document["paths"]
    with app_client(example_settings) as client:  # no second stage
        bare = client.get("/openapi.json").json()
        assert "/v1/rerank" not in bare["paths"]
        rerank = bare["components"]["schemas"]["SearchRequest"]["properties"]["rerank"]["anyOf"][0]
        assert rerank == {"type": "boolean", "enum": [False]}
        assert not _validator(bare, "/v1/search").is_valid({"query": "tea", "rerank": True})
        assert client.post("/v1/search", json={"query": "tea", "rerank": True}).status_code == 422
        assert client.post("/v1/search", json={"query": "tea", "rerank": False}).status_code == 200
