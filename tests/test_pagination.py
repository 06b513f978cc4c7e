"""Paging `/v1/search`: pages concatenate to one request for the whole range (a property test over random
k/offset splits on SciFact), cursors resume the same ranking, and a cursor from another build gets 409."""

from __future__ import annotations

import json
import shutil

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.api.main import create_app
from app.settings import load_settings
from tests.conftest import SCIFACT, SHARED_DATA_WORKER, needs_scifact
from tests.servers import app_client
from tests.test_lifecycle import clone_build

pytestmark = SHARED_DATA_WORKER


def _queries() -> list[str]:
    if not (SCIFACT / "queries.jsonl").exists():
        return ["placeholder"]
    rows = [json.loads(line) for line in (SCIFACT / "queries.jsonl").open(encoding="utf-8")]
    return [r["text"] for r in rows[:40]]


QUERIES = _queries()


@pytest.fixture(scope="module")
def scifact_client(scifact_settings):
    with app_client(scifact_settings) as client:
        yield client


def _ids(response) -> list[tuple[str, float]]:
    assert response.status_code == 200, response.text
    return [(h["passage_id"], h["score"]) for h in response.json()["hits"]]


def _split(total: int, cuts: list[int]) -> list[tuple[int, int]]:
    points = sorted({c for c in cuts if 0 < c < total})
    edges = [0, *points, total]
    return [(a, b - a) for a, b in zip(edges, edges[1:])]


@needs_scifact
@pytest.mark.heavy  # over the SciFact bundle (see tests/test_regression_scifact.py)
@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    query=st.sampled_from(QUERIES),
    mode=st.sampled_from(["hybrid", "bm25", "dense"]),
    total=st.integers(min_value=2, max_value=60),
    cuts=st.lists(st.integers(min_value=1, max_value=59), min_size=1, max_size=5),
    collapse=st.booleans(),
)
def test_pages_concatenate_to_one_request_for_the_whole_range(scifact_client, query, mode, total, cuts, collapse):
    base = {"query": query, "mode": mode, "candidates": 60, "collapse": collapse, "return_text": False}
    whole = _ids(scifact_client.post("/v1/search", json={**base, "k": total}))
    pages = []
    for offset, k in _split(total, cuts):
        response = scifact_client.post("/v1/search", json={**base, "k": k, "offset": offset})
        assert response.json()["offset"] == offset
        pages += _ids(response)
    assert pages == whole
    # the same pages through cursors (page sizes may change between pages)
    sizes = [k for _, k in _split(total, cuts)]
    response = scifact_client.post("/v1/search", json={**base, "k": sizes[0]})
    paged = _ids(response)
    for k in sizes[1:]:
        cursor = response.json()["next_cursor"]
        if cursor is None:
            break
        response = scifact_client.post("/v1/search", json={**base, "k": k, "cursor": cursor})
        paged += _ids(response)
    assert paged == whole[: len(paged)]
    assert len(paged) == len(whole) or response.json()["next_cursor"] is None


@needs_scifact
@pytest.mark.heavy
def test_a_cursor_walks_the_whole_ranking_and_stops_at_its_end(scifact_client):
    base = {"query": QUERIES[0], "mode": "bm25", "candidates": 30, "return_text": False}
    whole = _ids(scifact_client.post("/v1/search", json={**base, "k": 30}))
    assert len(whole) == 30
    response = scifact_client.post("/v1/search", json={**base, "k": 7})
    seen = _ids(response)
    while response.json()["next_cursor"]:
        response = scifact_client.post("/v1/search", json={**base, "k": 7, "cursor": response.json()["next_cursor"]})
        seen += _ids(response)
    assert seen == whole  # 7 + 7 + 7 + 7 + 2, no page past the end


@needs_scifact
@pytest.mark.heavy
def test_a_first_page_deeper_than_candidates_fixes_the_depth_for_its_cursor(scifact_client):
    base = {"query": QUERIES[1], "mode": "hybrid", "candidates": 20, "return_text": False}
    whole = _ids(scifact_client.post("/v1/search", json={**base, "k": 40}))
    first = scifact_client.post("/v1/search", json={**base, "k": 25})  # depth 25 > candidates
    second = scifact_client.post(
        "/v1/search", json={**base, "k": 15, "cursor": first.json()["next_cursor"], "candidates": 20}
    )
    deeper = _ids(scifact_client.post("/v1/search", json={**base, "candidates": 25, "k": 40}))
    assert _ids(first) + _ids(second) == deeper[:40]
    assert len(whole) == 40


def test_bad_cursors_and_offsets_get_json_errors(example_settings):
    with app_client(example_settings) as client:
        first = client.post("/v1/search", json={"query": "stars", "k": 2, "mode": "bm25"})
        cursor = first.json()["next_cursor"]
        assert cursor
        cases = {
            "not base64 at all!": 422,
            "eyJ2IjogOX0": 422,  # {"v": 9}
        }
        for token, status in cases.items():
            r = client.post("/v1/search", json={"query": "stars", "k": 2, "mode": "bm25", "cursor": token})
            assert r.status_code == status and r.json()["error"]["fields"][0]["field"] == "cursor", r.text
        other_query = client.post("/v1/search", json={"query": "tea", "k": 2, "mode": "bm25", "cursor": cursor})
        assert other_query.status_code == 422 and "another query" in other_query.json()["error"]["message"]
        other_mode = client.post("/v1/search", json={"query": "stars", "k": 2, "mode": "dense", "cursor": cursor})
        assert other_mode.status_code == 422
        both = client.post("/v1/search", json={"query": "stars", "k": 2, "mode": "bm25", "cursor": cursor, "offset": 2})
        assert both.status_code == 422 and "not both" in both.json()["error"]["message"]
        negative = client.post("/v1/search", json={"query": "stars", "offset": -1})
        assert negative.status_code == 422 and negative.json()["error"]["fields"][0]["field"] == "offset"
        past_end = client.post("/v1/search", json={"query": "stars", "mode": "bm25", "offset": 5000, "k": 5})
        assert past_end.status_code == 200 and past_end.json()["hits"] == []
        assert past_end.json()["next_cursor"] is None


def test_a_cursor_from_another_build_gets_409(example_index, tmp_path):
    out = tmp_path / "index"
    shutil.copytree(example_index, out, symlinks=True)
    settings = load_settings(bundle=out, reranker={"model": None}, generator={"backend": "none"})
    with TestClient(create_app(settings)) as client:
        client.post("/v1/admin/reload")
        first = client.post("/v1/search", json={"query": "stars", "k": 2})
        assert first.status_code == 200, first.text
        old_build, cursor = first.json()["bundle"], first.json()["next_cursor"]
        assert client.post("/v1/search", json={"query": "stars", "k": 2, "cursor": cursor}).status_code == 200
        new_build = clone_build(out, old_build)
        reloaded = client.post("/v1/admin/reload").json()
        assert new_build in json.dumps(reloaded)
        stale = client.post("/v1/search", json={"query": "stars", "k": 2, "cursor": cursor})
        assert stale.status_code == 409, stale.text
        error = stale.json()["error"]
        assert error["type"] == "cursor_expired" and old_build in error["message"] and new_build in error["message"]
        assert error["fields"][0]["field"] == "cursor"
