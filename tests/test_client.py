"""The Python client (`clients/python`, `sift-client`) against a real `sift serve`: the same hits as raw HTTP,
typed results, paging, batch, documents, collections, answers (JSON and streamed), keys, typed errors, retries
that honour `Retry-After` and never retry other 4xx, timeouts; its models against the served OpenAPI document;
and its install: no torch, only the declared dependencies."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest
from pydantic import TypeAdapter
from sift_client import (
    AsyncSiftClient,
    AuthenticationError,
    InvalidRequestError,
    NotFoundError,
    RateLimitError,
    SiftClient,
    SiftConnectionError,
    SiftTimeoutError,
    models,
)
from sift_client.client import _Config

from tests.conftest import ROOT
from tests.servers import free_port, sift_server

QUERY = "how do stars form?"


def raw_search(base: str, key: str, **body: Any) -> dict[str, Any]:
    response = httpx.post(f"{base}/v1/search", json=body, headers={"authorization": f"Bearer {key}"}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def counting(hits: list[str]) -> httpx.Client:
    """An httpx client that records every request it sends (to count the client's attempts)."""
    return httpx.Client(event_hooks={"request": [lambda request: hits.append(request.url.path)]})


@pytest.fixture(scope="module")
def sift(client_server):
    base, key = client_server
    with SiftClient(base, api_key=key) as client:
        yield client


# -- the same results as raw HTTP, typed ---------------------------------------------------------------------


def test_facets_and_classify_typed(client_server, sift):
    """Facets (value counts over the candidates) and zero-shot classification through the client, as raw HTTP
    returns them."""
    base, key = client_server
    page = sift.search("bread and eggs", k=3, candidates=20, facets=["topic", "kind"])
    raw = raw_search(base, key, query="bread and eggs", k=3, candidates=20, facets=["topic", "kind"])
    assert page.facets == raw["facets"] and sum(page.facets["topic"].values()) == 20
    assert next(iter(page.facets["topic"])) == "cooking"  # the most frequent topic among the candidates
    result = sift.classify(["The striker scored twice in the final."], "topic")
    assert isinstance(result, models.ClassifyResponse) and result.label_set == "topic"
    assert result.results[0].label == "sport" and result.results[0].score == max(result.results[0].scores.values())
    inline = sift.classify(["Knead the dough and let it rise."], {"labels": {"baking": [], "sailing": []}})
    assert inline.labels == ["baking", "sailing"] and inline.results[0].label == "baking"
    with pytest.raises(InvalidRequestError) as refused:
        sift.classify(["a"], "no-such-set")
    assert refused.value.status_code == 422 and refused.value.fields[0]["field"] == "label_set"


def test_search_returns_the_raw_hits_typed_with_explain_and_timings(client_server, sift):
    base, key = client_server
    raw = raw_search(base, key, query=QUERY, k=5)
    page = sift.search(QUERY, k=5)
    assert isinstance(page, models.SearchResponse)
    assert [h.passage_id for h in page.hits] == [h["passage_id"] for h in raw["hits"]]
    assert [h.score for h in page.hits] == pytest.approx([h["score"] for h in raw["hits"]], rel=1e-6)
    assert page.hits[0].doc_id == "astro-001" and page.mode == "hybrid" and page.bundle == raw["bundle"]
    first = page.hits[0]
    # the shipped second stage: every stage explained, typed, ranks 1-based
    assert set(first.explain) >= {"bm25", "dense", "fused", "rerank"}
    rerank = first.explain["rerank"]
    assert isinstance(rerank, models.StageExplain) and rerank.rank == 1 and rerank.score is not None
    assert first.text and first.end > first.start and first.metadata["topic"] == "astronomy"
    assert page.timings_ms["total"] > 0 and "rerank" in page.timings_ms


def test_options_filters_and_collections_pass_through(client_server, sift):
    base, key = client_server
    history = sift.search("kings and empires", k=4, mode="dense", filters={"topic": "history"})
    raw = raw_search(base, key, query="kings and empires", k=4, mode="dense", filters={"topic": "history"})
    assert [h.passage_id for h in history.hits] == [h["passage_id"] for h in raw["hits"]]
    assert history.mode == "dense" and len(history.hits) == 4
    assert {h.metadata["topic"] for h in history.hits} == {"history"}
    recipes = sift.search("lemons and sugar", k=1, collection="recipes")
    assert [h.doc_id for h in recipes.hits] == ["r2"]
    # a client bound to a collection uses it unless a call names another
    base, key = client_server
    with SiftClient(base, api_key=key, collection="recipes") as bound:
        assert bound.search("lemons and sugar", k=1).hits[0].doc_id == "r2"
        assert bound.search(QUERY, k=1, collection="examples").hits[0].doc_id == "astro-001"
        assert bound.document("r1").title == "Pancakes"


def test_paging_follows_the_cursor_to_the_last_page(sift):
    pages = list(sift.search_pages("music and rhythm", k=7, mode="dense", rerank=False, filters={"topic": "music"}))
    ids = [h.passage_id for p in pages for h in p.hits]
    assert len(pages) >= 2 and pages[-1].next_cursor is None
    assert all(p.next_cursor for p in pages[:-1])
    assert len(ids) == len(set(ids)), "a passage came back on two pages"
    assert [p.offset for p in pages] == [7 * i for i in range(len(pages))]
    whole = sift.search("music and rhythm", k=len(ids), mode="dense", rerank=False, filters={"topic": "music"})
    assert ids == [h.passage_id for h in whole.hits]


def test_batch_search_equals_one_search_per_query(sift):
    queries = [QUERY, "lemons and sugar", "vaccines and the immune system"]
    batch = sift.search_batch(queries, k=3, mode="bm25")
    assert isinstance(batch, models.BatchSearchResponse) and len(batch.results) == 3
    for query, result in zip(queries, batch.results):
        single = sift.search(query, k=3, mode="bm25")
        assert result.query == query
        assert [h.passage_id for h in result.hits] == [h.passage_id for h in single.hits]


def test_documents_and_collections(sift):
    doc = sift.document("astro-001")
    assert isinstance(doc, models.DocumentResponse) and doc.id == "astro-001" and doc.title == "How stars form"
    assert doc.passages and doc.passages[0].id == "astro-001#0"
    assert doc.text[doc.passages[0].start : doc.passages[0].end] == doc.passages[0].text
    listing = sift.collections()
    assert listing.default == "examples"
    assert [(c.name, c.ready, c.documents) for c in listing.collections] == [
        ("examples", True, 147),
        ("recipes", True, 3),
    ]
    # ids with `/`, `#`, `?` and `%` reach the server whole
    odd = sift.document("tips/eggs#1?fresh=100%", collection="recipes")
    assert odd.id == "tips/eggs#1?fresh=100%" and odd.title == "Fresh eggs"
    with pytest.raises(NotFoundError) as dots:
        sift.document("..")
    assert "'..'" in dots.value.message  # the id arrived as `..`, not resolved away as a path segment
    with pytest.raises(ValueError, match="empty"):
        sift.document("")
    with pytest.raises(NotFoundError) as caught:
        sift.document("no-such-doc")
    assert caught.value.status_code == 404 and caught.value.error_type == "not_found"
    assert caught.value.request_id and "no-such-doc" in caught.value.message


def test_answer_and_streamed_answer_agree(sift):
    answer = sift.answer(QUERY, k=5)
    assert isinstance(answer, models.AnswerResponse)
    assert answer.answered and answer.mode == "extractive" and answer.collection == "examples"
    assert answer.citations and answer.citations[0].doc_id == "astro-001"
    cited = answer.citations[0]
    assert cited.start is not None and cited.end is not None and answer.span is not None
    assert cited.text[cited.start : cited.end] == answer.span.text
    events = list(sift.answer_stream(QUERY, k=5))
    kinds = [e.event for e in events]
    assert kinds[0] == "passages" and kinds[-1] == "done" and set(kinds[1:-1]) <= {"token"}
    assert isinstance(events[0], models.PassagesEvent) and isinstance(events[-1], models.DoneEvent)
    tokens = "".join(e.text for e in events if isinstance(e, models.TokenEvent))
    done = events[-1].answer
    assert done.answer == tokens == answer.answer
    assert [c.passage_id for c in done.citations] == [c.passage_id for c in answer.citations]
    assert [p.passage_id for p in events[0].passages] == [p.passage_id for p in answer.passages]


def test_async_client_matches_the_sync_one(client_server, sift):
    base, key = client_server

    async def run() -> tuple[Any, ...]:
        async with AsyncSiftClient(base, api_key=key) as client:
            page, recipes, batch = await asyncio.gather(
                client.search(QUERY, k=5),
                client.search("lemons and sugar", k=1, collection="recipes"),
                client.search_batch([QUERY, "lemons"], k=2, mode="bm25"),
            )
            pages = [
                p
                async for p in client.search_pages(
                    "music and rhythm", k=7, mode="dense", rerank=False, filters={"topic": "music"}
                )
            ]
            events = [e async for e in client.answer_stream(QUERY, k=5)]
            doc = await client.document("r1", collection="recipes")
            return page, recipes, batch, pages, events, doc

    page, recipes, batch, pages, events, doc = asyncio.run(run())
    assert [h.passage_id for h in page.hits] == [h.passage_id for h in sift.search(QUERY, k=5).hits]
    assert [h.doc_id for h in recipes.hits] == ["r2"]
    assert [len(r.hits) for r in batch.results] == [2, 2]
    assert pages[-1].next_cursor is None and len(pages) >= 2
    assert events[-1].event == "done" and events[-1].answer.answered
    assert doc.title == "Pancakes"


# -- keys, errors and retries ------------------------------------------------------------------------------


def test_missing_or_wrong_key_is_an_authentication_error_sent_once(client_server, monkeypatch):
    base, _ = client_server
    monkeypatch.delenv("SIFT_API_KEY", raising=False)
    for key in (None, "not-the-right-key-000"):
        sent: list[str] = []
        with SiftClient(base, api_key=key, max_retries=3, http_client=counting(sent)) as client:
            with pytest.raises(AuthenticationError) as caught:
                client.search(QUERY)
        assert caught.value.status_code == 401 and caught.value.error_type == "unauthorized"
        assert caught.value.request_id
        assert sent == ["/v1/search"], "a 401 must not be retried"
    # the URL and key from the environment, as the README says
    monkeypatch.setenv("SIFT_URL", base)
    monkeypatch.setenv("SIFT_API_KEY", client_server[1])
    with SiftClient() as client:
        assert client.base_url == base
        assert client.search(QUERY, k=1, mode="bm25").hits


def test_invalid_request_names_the_field_and_is_not_retried(client_server):
    base, key = client_server
    sent: list[str] = []
    with SiftClient(base, api_key=key, max_retries=3, http_client=counting(sent)) as client:
        with pytest.raises(InvalidRequestError) as caught:
            client.search(QUERY, k=0)
        assert caught.value.status_code == 422 and caught.value.error_type == "validation_error"
        assert [f["field"] for f in caught.value.fields or []] == ["k"]
        with pytest.raises(NotFoundError):
            client.search(QUERY, collection="nope")
    assert sent == ["/v1/search", "/v1/search"]


def test_retry_policy():
    """429 and 502/503/504 and transport failures are retried (waiting `Retry-After` when given, else backing off
    with jitter); no other status is; nothing past `max_retries` or a longer wait than `max_retry_wait`."""
    config = _Config.of("http://x", None, 5, 2, 0.5, 4.0, 30.0, None)
    req = httpx.Request("POST", "http://x/v1/search")

    def response(status: int, **headers: str) -> httpx.Response:
        return httpx.Response(status, headers=headers, request=req)

    assert config.retry_delay(0, response(429, **{"retry-after": "3"})) == 3.0
    assert config.retry_delay(0, response(503, **{"retry-after": "1"})) == 1.0
    assert config.retry_delay(0, response(429, **{"retry-after": "120"})) is None  # over max_retry_wait
    for status in (502, 503, 504):
        assert 0.25 <= config.retry_delay(0, response(status)) <= 0.5
        assert 0.5 <= config.retry_delay(1, response(status)) <= 1.0
    assert 0.25 <= config.retry_delay(0, None) <= 0.5
    for status in (400, 401, 403, 404, 409, 413, 422, 500, 501):
        assert config.retry_delay(0, response(status)) is None, status
    assert config.retry_delay(2, response(503)) is None and config.retry_delay(2, None) is None
    with pytest.raises(ValueError, match="max_retries"):
        _Config.of("http://x", None, 5, -1, 0.5, 4.0, 30.0, None)
    with pytest.raises(ValueError, match="http"):
        SiftClient("localhost:8000")


def test_stream_failures_after_the_status_line_are_stream_errors():
    """After the first event nothing is sent again: an `error` event, a malformed event and a stream that ends
    before `done` each raise `SiftStreamError` carrying the request id; unknown events are skipped."""
    from sift_client import SiftStreamError
    from sift_client.client import _AnswerStream

    def events(lines: list[str]) -> list[Any]:
        stream = _AnswerStream("req-1")
        out = [e for line in lines if (e := stream.feed(line)) is not None]
        last = stream.finish()
        return out + ([last] if last is not None else [])

    passages = 'data: {"passages": [], "answered": false, "missing_shards": []}'
    done = {"question": "q", "answer": "a", "answered": True, "citations": [], "passages": [], "model": "m"}
    done |= {"mode": "extractive", "timings_ms": {}, "bundle": "b", "collection": "c", "missing_shards": []}
    ok = ["\ufeffevent: passages", passages, "", ": a comment", "event: future", "data: {}", ""]
    ok += ["event: token", 'data: {"text": "a"}', "", "event: done", f"data: {json.dumps(done)}"]  # no blank line
    assert [e.event for e in events(ok)] == ["passages", "token", "done"]
    failing = {
        "server failed": ["event: passages", passages, "", "event: error", 'data: {"message": "boom"}', ""],
        "malformed": ["event: token", "data: {not json", ""],
        "ended before its done": ["event: passages", passages, ""],
    }
    for expected, lines in failing.items():
        with pytest.raises(SiftStreamError, match=expected) as caught:
            events(lines)
        assert caught.value.request_id == "req-1"


@pytest.fixture(scope="module")
def rate_limited_server(example_index):
    """A server allowing each client one request every 2 s (burst 1): the second request at once is a 429
    with `Retry-After: 2`."""
    env = {
        "SIFT_BUNDLE": str(example_index),
        "SIFT_GENERATOR__BACKEND": "none",
        "SIFT_SERVER__RATE_LIMIT_PER_S": "0.5",
        "SIFT_SERVER__RATE_LIMIT_BURST": "1",
    }
    with sift_server(env) as (base, _):
        yield base


def test_a_429_waits_retry_after_then_succeeds(rate_limited_server):
    sent: list[str] = []
    with SiftClient(rate_limited_server, max_retries=0, http_client=counting(sent)) as client:
        time.sleep(2.1)  # a full bucket (start-up polled /readyz, which is not limited, but be sure)
        client.search(QUERY, k=1, mode="bm25", rerank=False)
        with pytest.raises(RateLimitError) as caught:
            client.search(QUERY, k=1, mode="bm25", rerank=False)
    assert caught.value.status_code == 429 and caught.value.error_type == "rate_limited"
    assert caught.value.retry_after == 2.0 and len(sent) == 2
    sent.clear()
    with SiftClient(rate_limited_server, max_retries=2, http_client=counting(sent)) as client:
        time.sleep(2.1)
        client.search(QUERY, k=1, mode="bm25", rerank=False)
        started = time.monotonic()
        page = client.search(QUERY, k=1, mode="bm25", rerank=False)
        waited = time.monotonic() - started
    assert page.hits and len(sent) == 3, sent  # one 429, then the retry after Retry-After
    assert waited >= 1.9, f"retried after {waited:.2f} s, before the Retry-After of 2 s"


def test_the_async_client_waits_retry_after_too(rate_limited_server):
    sent: list[str] = []

    async def record(request: httpx.Request) -> None:
        sent.append(request.url.path)

    async def run() -> tuple[Any, float]:
        async with httpx.AsyncClient(event_hooks={"request": [record]}) as http:
            client = AsyncSiftClient(rate_limited_server, max_retries=2, http_client=http)
            await asyncio.sleep(2.1)  # a full bucket
            await client.search(QUERY, k=1, mode="bm25", rerank=False)
            started = time.monotonic()
            page = await client.search(QUERY, k=1, mode="bm25", rerank=False)
            return page, time.monotonic() - started

    page, waited = asyncio.run(run())
    assert page.hits and len(sent) == 3, sent  # one 429, then the retry after Retry-After
    assert waited >= 1.9, f"retried after {waited:.2f} s, before the Retry-After of 2 s"


def test_unreachable_server_is_retried_then_a_connection_error():
    sent: list[str] = []
    port = free_port()  # nothing listens there
    with SiftClient(f"http://127.0.0.1:{port}", max_retries=2, backoff=0.01, http_client=counting(sent)) as client:
        with pytest.raises(SiftConnectionError, match="is `sift serve` running"):
            client.search(QUERY)
    assert len(sent) == 3


def test_timeout_is_a_timeout_error(client_server):
    base, key = client_server
    with SiftClient(base, api_key=key, timeout=0.0001, max_retries=0) as client:
        with pytest.raises(SiftTimeoutError):
            client.search(QUERY, k=10)


# -- the client's models against the served OpenAPI document ------------------------------------------------


def _shape(schema: dict[str, Any], request: bool = False) -> Any:
    """What a JSON schema admits, without words (titles, descriptions, examples) or limits: for comparing
    two documents of the same model. Request options drop `null` (the client omits an unset option)."""
    if schema is True or schema == {}:
        return "any"
    if "$ref" in schema:
        return ("ref", schema["$ref"].rsplit("/", 1)[-1])
    for key in ("anyOf", "oneOf"):
        if key in schema:
            branches = {_shape(s, request) for s in schema[key]}
            if request:
                branches.discard(("null",))
            return next(iter(branches)) if len(branches) == 1 else ("anyOf", frozenset(branches))
    if "enum" in schema:
        return ("enum", frozenset(schema["enum"]))
    if "const" in schema:
        return ("enum", frozenset([schema["const"]]))
    kind = schema.get("type")
    if kind == "array":
        return ("array", _shape(schema.get("items", {}), request))
    if kind == "object":
        extra = schema.get("additionalProperties")
        if extra is not None:
            return ("map", _shape(extra, request), _shape(schema.get("propertyNames", {}), request))
        return "object"
    return (kind,)


def _compare(served: dict[str, Any], ours: dict[str, Any], name: str, request: bool = False) -> None:
    assert set(ours["properties"]) == set(served["properties"]), f"{name}: fields differ"
    if not request:
        assert set(ours.get("required", [])) == set(served.get("required", [])), f"{name}: required fields differ"
    for field, schema in served["properties"].items():
        assert _shape(ours["properties"][field], request) == _shape(schema, request), f"{name}.{field}"


RESPONSES = [
    models.StageExplain,
    models.SearchHit,
    models.SearchResponse,
    models.BatchSearchResponse,
    models.DocumentPassage,
    models.DocumentResponse,
    models.IngestStatus,
    models.CollectionStatus,
    models.CollectionsResponse,
    models.TaskResponse,
    models.Citation,
    models.AnswerPassage,
    models.AnswerSpan,
    models.AnswerResponse,
    models.ClassifyResult,
    models.ClassifyResponse,
]


def test_models_match_the_served_openapi_document(client_server):
    base, _ = client_server
    document = httpx.get(f"{base}/openapi.json", timeout=30).json()
    components = document["components"]["schemas"]
    for model in RESPONSES:
        _compare(components[model.__name__], model.model_json_schema(), model.__name__)
    # the routes document these models as their answers
    paths = document["paths"]

    def answered_by(path: str, method: str) -> str:
        return paths[path][method]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].rsplit("/")[-1]

    assert answered_by("/v1/search", "post") == "SearchResponse"
    assert answered_by("/v1/search/batch", "post") == "BatchSearchResponse"
    assert answered_by("/v1/documents/{doc_id}", "get") == "DocumentResponse"
    assert answered_by("/v1/collections", "get") == "CollectionsResponse"
    assert answered_by("/v1/answer", "post") == "AnswerResponse"
    assert answered_by("/v1/classify", "post") == "ClassifyResponse"
    # request options: every option the server takes, with its JSON type, and no other
    options = TypeAdapter(models.SearchOptions).json_schema()
    generation = TypeAdapter(models.GenerationOptions).json_schema()
    per_route = {
        "SearchRequest": {"query", "offset", "cursor", "facets"},
        "BatchSearchRequest": {"queries", "offset"},
        "AnswerRequest": {"question", "passages", "generation", "stream"},
    }
    for name, own in per_route.items():
        served = components[name]
        assert set(options["properties"]) | own == set(served["properties"]), name
        for field, schema in options["properties"].items():
            assert _shape(schema, True) == _shape(served["properties"][field], True), f"{name}.{field}"
    _compare(components["GenerationOptions"], generation, "GenerationOptions", request=True)


# -- the install: light, no torch ----------------------------------------------------------------------------

ALLOWED = {
    # sift-client and what httpx, pydantic and typing-extensions need (PEP 503 names)
    "sift-client",
    "httpx",
    "httpcore",
    "h11",
    "anyio",
    "idna",
    "sniffio",
    "certifi",
    "exceptiongroup",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-extensions",
    "typing-inspection",
    # the venv's own tools
    "pip",
    "setuptools",
    "wheel",
}


def test_client_installs_alone_without_torch(tmp_path):
    """`pip install clients/python` in a fresh virtual environment (from the package registry): the installed
    set is the declared dependencies' closure, no torch, numpy or Sift server code; the client imports and its
    framework modules say which extra to install."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    install = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", str(ROOT / "clients" / "python")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    listed = subprocess.run([python, "-m", "pip", "list", "--format=json"], capture_output=True, text=True, env=env)
    installed = {p["name"].lower().replace("_", "-") for p in json.loads(listed.stdout)}
    assert "sift-client" in installed
    assert installed <= ALLOWED, f"installed beyond the declared dependencies: {sorted(installed - ALLOWED)}"
    assert not installed & {"torch", "numpy", "sentence-transformers", "fastapi", "faiss-cpu"}
    probe = (
        "import importlib.metadata as m, sys, sift_client\n"
        "print(sorted(r.split(';')[0].split('>')[0].strip() for r in m.requires('sift-client') if 'extra ==' not in r))\n"
        "print(sorted(n for n in sys.modules if n.split('.')[0] in {'torch', 'numpy', 'app', 'indexer'}))\n"
        "try:\n    import sift_client.langchain\nexcept ImportError as e:\n    print(e.name)\n"
    )
    out = subprocess.run([python, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    declared, imported, missing = out.stdout.splitlines()
    assert declared == "['httpx', 'pydantic', 'typing-extensions']"
    assert imported == "[]"
    assert missing == "langchain_core"
