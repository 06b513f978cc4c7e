"""Hardening: API keys and scopes, rate limits, limits from settings, the JSON error contract (500s, 405s,
chunked 413s), redacted /v1/info, bounded work, an honest OpenAPI document, and the indexer's edge cases."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from app.api.main import create_app
from app.cli import anonymous_refusal
from app.retrieval.reranker import MicroBatcher, QueueFull
from app.settings import load_settings
from indexer.build import build_bundle
from indexer.config import DenseSettings, IndexConfig
from indexer.sources import SourceError, read_documents
from tests.conftest import EXAMPLES, ROOT, write_jsonl
from tests.servers import app_client, served_pipeline

SEARCH_KEY = "search-key-0123456789abcdef"
ADMIN_KEY = "admin-key-0123456789abcdef"


def settings_with(example_index, **overrides):
    """Settings over the examples' build with `overrides`: first stage only, no answer backend (extractive
    answers without a reader)."""
    overrides.setdefault("reranker", {})["model"] = None
    overrides.setdefault("answer", {})["reader"] = None
    return load_settings(bundle=example_index, **overrides)


@pytest.fixture(scope="module")
def client(example_settings):
    """The examples' build served as tests/conftest.py's example_pipeline is configured (no keys, default limits)."""
    with app_client(example_settings) as client:
        yield client


@pytest.fixture(scope="module")
def keyed_client(example_index):
    """The same build behind a search key and an admin key."""
    with app_client(settings_with(example_index, server={"api_keys": [SEARCH_KEY], "admin_keys": [ADMIN_KEY]})) as c:
        yield c


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# -- keys, scopes, rate limits ---------------------------------------------------------------------------------


def test_keys_and_scopes(keyed_client):
    client = keyed_client  # keys of both scopes
    body = {"query": "stars", "k": 2}
    for headers in ({}, bearer("wrong-key-0123456789abcdef"), {"Authorization": SEARCH_KEY}):
        r = client.post("/v1/search", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized", r.text
        assert r.headers["www-authenticate"] == "Bearer" and "Bearer" in r.json()["error"]["message"]
    assert client.post("/v1/search", json=body, headers=bearer(SEARCH_KEY)).status_code == 200
    assert client.post("/v1/search", json=body, headers=bearer(ADMIN_KEY)).status_code == 200  # admin ⊃ search
    for method, path in (("post", "/v1/admin/reload"), ("get", "/metrics")):
        denied = client.request(method, path, headers=bearer(SEARCH_KEY))
        assert denied.status_code == 403 and "admin scope" in denied.json()["error"]["message"]
        assert client.request(method, path, headers=bearer(ADMIN_KEY)).status_code == 200
    # probes, the playground and the docs need no key
    for path in ("/healthz", "/readyz", "/ui", "/openapi.json"):
        assert client.get(path).status_code == 200, path


def test_key_file_and_short_keys(tmp_path, example_index):
    keys = tmp_path / "keys"
    keys.write_text(f"# team keys\nsearch {SEARCH_KEY}\nadmin {ADMIN_KEY}  # ops\n")
    with app_client(settings_with(example_index, server={"api_key_file": str(keys)})) as client:
        assert client.get("/v1/collections", headers=bearer(SEARCH_KEY)).status_code == 200
        assert client.post("/v1/admin/reload", headers=bearer(SEARCH_KEY)).status_code == 403
        assert client.post("/v1/admin/reload", headers=bearer(ADMIN_KEY)).status_code == 200
    with pytest.raises(ValueError, match="shorter than 16"):
        create_app(settings_with(example_index, server={"api_keys": ["short"]}))


def test_anonymous_serving_is_refused_off_loopback():
    settings = load_settings()
    assert anonymous_refusal(settings, "127.0.0.1") is None and anonymous_refusal(settings, "::1") is None
    assert "without API keys" in anonymous_refusal(settings, "0.0.0.0")
    assert anonymous_refusal(load_settings(server={"api_keys": [SEARCH_KEY]}), "0.0.0.0") is None
    assert anonymous_refusal(load_settings(server={"allow_anonymous": True}), "0.0.0.0") is None
    run = subprocess.run(
        [sys.executable, "-c", "from app.cli import main; main()", "serve", "--host", "0.0.0.0", "--port", "1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert run.returncode == 2 and "SIFT_SERVER__API_KEYS" in run.stderr


def test_rate_limit_per_key_answers_429_with_retry_after(example_index, monkeypatch):
    settings = settings_with(
        example_index,
        server={"api_keys": [SEARCH_KEY, "other-key-0123456789abcdef"], "rate_limit_per_s": 0.5, "rate_limit_burst": 3},
    )
    # the limiter's clock stands still: no token refills between requests, however slowly they run
    monkeypatch.setattr("app.api.auth.time", SimpleNamespace(monotonic=lambda: 1000.0))
    with app_client(settings) as client:
        codes = [client.get("/v1/collections", headers=bearer(SEARCH_KEY)).status_code for _ in range(5)]
        assert codes == [200, 200, 200, 429, 429]
        limited = client.get("/v1/collections", headers=bearer(SEARCH_KEY))
        # an empty bucket refills one token in 1 / 0.5 = 2 s
        assert limited.json()["error"]["type"] == "rate_limited" and limited.headers["retry-after"] == "2"
        # another key has its own bucket
        assert client.get("/v1/collections", headers=bearer("other-key-0123456789abcdef")).status_code == 200


# -- the error contract ----------------------------------------------------------------------------------------


def test_unhandled_errors_are_json_500s_with_a_request_id(example_settings, caplog):
    async def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail /srv/x")

    with app_client(example_settings, raise_server_exceptions=False) as client:
        served_pipeline(client.app).search_many = broken
        r = client.post("/v1/search", json={"query": "stars"}, headers={"X-Request-ID": "boom-1"})
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert error["type"] == "internal_error" and error["request_id"] == "boom-1"
    assert "secret" not in r.text and "Traceback" not in r.text
    assert any("boom-1" == getattr(rec, "request_id", None) for rec in caplog.records)


def test_405_carries_allow_and_chunked_bodies_over_the_limit_get_413(example_index):
    with app_client(settings_with(example_index, server={"max_body_bytes": 2048})) as client:
        r = client.get("/v1/search")
        assert r.status_code == 405 and r.headers["allow"] == "POST" and "POST" in r.json()["error"]["message"]

        def chunks():
            yield b'{"query": "'
            for _ in range(10):
                yield b"x" * 512
            yield b'"}'

        big = client.post("/v1/search", content=chunks(), headers={"content-type": "application/json"})
        assert big.status_code == 413 and big.json()["error"]["type"] == "payload_too_large", big.text
        assert "server.max_body_bytes" in big.json()["error"]["message"]
        small = client.post(
            "/v1/search", content=iter([b'{"query": ', b'"stars"}']), headers={"content-type": "application/json"}
        )
        assert small.status_code == 200


@pytest.mark.parametrize("weight", ["NaN", "Infinity", "-1"])
def test_non_finite_or_negative_fusion_weights_are_422(client, weight):
    raw = '{"query": "stars", "fusion": "weighted", "weights": {"bm25": WEIGHT, "dense": 0.5}}'.replace(
        "WEIGHT", weight
    )
    r = client.post("/v1/search", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["fields"][0]["field"].startswith("weights"), r.text


def test_info_hides_paths_and_hosts_without_an_admin_key(client, keyed_client):
    root = str(served_pipeline(client.app).bundle.root)
    anonymous = client.get("/v1/info").text
    assert root not in anonymous and '"host"' not in anonymous and "/root/" not in anonymous
    searcher = keyed_client.get("/v1/info", headers=bearer(SEARCH_KEY))
    admin = keyed_client.get("/v1/info", headers=bearer(ADMIN_KEY))
    assert searcher.status_code == 200 and root not in searcher.text and '"host"' not in searcher.text
    assert admin.json()["bundle"]["path"] == root and "host" in admin.json()["bundle"]["build"]


# -- limits come from settings ----------------------------------------------------------------------------------


def test_limits_are_read_from_settings(example_index):
    settings = settings_with(
        example_index,
        search={"max_k": 200, "max_query_chars": 50, "max_candidates": 300, "max_batch_work": 1000},
        reranker={"model": None, "max_depth": 30},
    )
    with app_client(settings) as client:
        assert client.post("/v1/search", json={"query": "stars", "k": 150, "candidates": 150}).status_code == 200
        cases = [
            ({"query": "stars", "k": 201}, "k", "search.max_k"),
            ({"query": "x" * 51}, "query", "search.max_query_chars"),
            ({"query": "stars", "candidates": 301}, "candidates", "search.max_candidates"),
            ({"query": "stars", "rerank_depth": 31}, "rerank_depth", "reranker.max_depth"),
        ]
        for body, field, setting in cases:
            r = client.post("/v1/search", json=body)
            assert r.status_code == 422 and r.json()["error"]["fields"][0]["field"] == field, r.text
            assert setting in r.json()["error"]["message"]
        batch = client.post("/v1/search/batch", json={"queries": ["a"] * 6, "candidates": 100, "mode": "hybrid"})
        assert batch.status_code == 413 and "search.max_batch_work" in batch.json()["error"]["message"]
        assert (
            client.post("/v1/search/batch", json={"queries": ["a"] * 5, "candidates": 100, "mode": "bm25"}).status_code
            == 200
        )
        schema = client.get("/openapi.json").json()["components"]["schemas"]
        assert schema["SearchRequest"]["properties"]["k"]["maximum"] == 200
        assert schema["SearchRequest"]["properties"]["query"]["maxLength"] == 50


def test_chat_has_the_query_limit_and_a_prompt_token_budget(example_index):
    settings = load_settings(
        bundle=example_index,
        reranker={"model": None},
        answer={"max_question_tokens": 200, "mode": "generative"},
        generator={"backend": "local", "model": "smollm2", "cache_dir": str(ROOT / "var" / "models")},  # conftest's
    )
    with app_client(settings) as client:
        long_user = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x " * 1500}]})
        assert long_user.status_code == 422 and "search.max_query_chars" in long_user.json()["error"]["message"]
        huge_system = client.post(
            "/v1/chat/completions",
            json={
                "messages": [{"role": "system", "content": "be brief " * 400}, {"role": "user", "content": "tides?"}]
            },
        )
        assert huge_system.status_code == 413 and huge_system.json()["error"]["type"] == "prompt_too_long"
        assert "answer.max_question_tokens" in huge_system.json()["error"]["message"]
        question = client.post("/v1/answer", json={"question": "why " * 300})
        assert question.status_code == 413


def test_the_rerank_queue_is_bounded():
    import threading

    taken, release = threading.Event(), threading.Event()

    class Slow:
        def score(self, pairs):
            taken.set()  # the worker took a batch
            assert release.wait(60), "the test never released the worker"
            return np.zeros(len(pairs))

    async def scenario():
        batcher = MicroBatcher(Slow(), max_batch_size=4, max_wait_ms=0, max_queued=10)
        first = asyncio.ensure_future(batcher.score([("q", "p")] * 4))
        assert await asyncio.to_thread(taken.wait, 60)  # the worker is busy with the first batch
        second = asyncio.ensure_future(batcher.score([("q", "p")] * 8))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull, match="max_queued_pairs"):
            await batcher.score([("q", "p")] * 3)  # 8 queued + 3 > 10
        release.set()
        assert len(await first) == 4 and len(await second) == 8
        await batcher.close()

    asyncio.run(scenario())


# -- an honest OpenAPI document ---------------------------------------------------------------------------------


def test_documented_examples_are_accepted_and_content_types_documented(client):
    schema = client.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    for name, path in (("SearchRequest", "/v1/search"), ("BatchSearchRequest", "/v1/search/batch")):
        example = {k: v["examples"][0] for k, v in components[name]["properties"].items() if v.get("examples")}
        r = client.post(path, json=example)
        assert r.status_code == 200, (name, example, r.text)
    answer = components["AnswerRequest"]["properties"]
    generation = components["GenerationOptions"]["properties"]
    example = {k: v["examples"][0] for k, v in answer.items() if v.get("examples") and k != "generation"}
    example["generation"] = {k: v["examples"][0] for k, v in generation.items() if v.get("examples")}
    from app.api.answer import AnswerRequest, check_generation

    request = AnswerRequest(**example)
    check_generation(request.generation, request.stream, "generation.", 2048)  # no 422 for the example
    paths = schema["paths"]
    assert set(paths["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    for path in ("/v1/answer", "/v1/chat/completions"):
        assert "text/event-stream" in paths[path]["post"]["responses"]["200"]["content"]
    assert "temperature > 0" in generation["top_k"]["description"]


# -- indexer ----------------------------------------------------------------------------------------------------


def test_csv_keeps_quoted_newlines_and_huge_fields_are_skippable(tmp_path):
    path = tmp_path / "docs.csv"
    path.write_text(
        'id,title,text\n1,One,"first line\nsecond line"\n2,Two,' + "y" * 2_000_001 + '\n3,Three,"ok, fine"\n',
        encoding="utf-8",
    )
    with pytest.raises(SourceError, match=r"docs.csv:4: unreadable row .*max_field_chars"):
        list(read_documents(path))
    docs = list(read_documents(path, skip_bad=True))
    assert [d.id for d in docs] == ["1", "3"] and docs[0].text == "first line\nsecond line"


def test_folder_ids_that_collide_are_refused_naming_both_files(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "a.md").write_text("# A\n\nmarkdown")
    (folder / "a.txt").write_text("text")
    with pytest.raises(SourceError, match=r"a\.txt: document id 'a' is also the id of .*a\.md"):
        list(read_documents(folder))
    assert [d.id for d in read_documents(folder, skip_bad=True)] == ["a"]


def test_bundle_paths_with_hash_spaces_and_unicode_work(tmp_path):
    out = tmp_path / "my #1 índex ☃"
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"_id": "d1", "title": "Stars", "text": "how stars form in clouds"}])
    build_bundle(corpus, out, IndexConfig(dense=DenseSettings(enabled=False)), show_progress=False)
    settings = load_settings(bundle=out, reranker={"model": None}, answer={"reader": None})
    with app_client(settings) as client:
        r = client.post("/v1/search", json={"query": "stars", "mode": "bm25"})
    assert r.status_code == 200 and r.json()["hits"][0]["doc_id"] == "d1"


def test_examples_corpus_is_streamed_not_read_whole(monkeypatch):
    from pathlib import Path

    def refuse(*args, **kwargs):
        raise AssertionError("read_bytes would load the whole input")

    monkeypatch.setattr(Path, "read_bytes", refuse)
    assert sum(1 for _ in read_documents(EXAMPLES)) == 147


def test_the_ci_guard_fails_without_shared_data(tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "tests/test_hardening.py::test_bundle_paths_with_hash_spaces_and_unicode_work",
            "-p",
            "no:cacheprovider",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "CI": "true", "SIFT_SHARED_DATA": str(tmp_path / "missing")},
        timeout=300,
    )
    assert run.returncode != 0 and "CI=true" in run.stdout + run.stderr and "missing" in run.stdout + run.stderr
