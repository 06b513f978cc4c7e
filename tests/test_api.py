"""The HTTP API through FastAPI's TestClient: results, explain, filters, documents, info, metrics, errors."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.api.main import create_app
from app.settings import load_settings
from tests.servers import app_client, served_pipeline


@pytest.fixture(scope="module")
def client(example_settings):
    with app_client(example_settings) as c:
        yield c


def search(client, **body):
    response = client.post("/v1/search", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_hybrid_search_finds_the_right_document_with_explain_and_timings(client):
    data = search(client, query="how do stars form in molecular clouds", k=5)
    assert data["mode"] == "hybrid" and data["bundle"] == served_pipeline(client.app).bundle.build_id
    top = data["hits"][0]
    assert top["doc_id"] == "astro-001" and top["passage_id"] == "astro-001#0" and top["title"] == "How stars form"
    assert top["text"].startswith("Stars form inside cold, dense clouds")
    assert top["metadata"] == {"topic": "astronomy", "kind": "note", "reading_minutes": 1}
    assert set(top["explain"]) == {"bm25", "dense", "fused"}
    assert top["explain"]["fused"]["rank"] == 1 and top["score"] == top["explain"]["fused"]["score"]
    assert [h["score"] for h in data["hits"]] == sorted((h["score"] for h in data["hits"]), reverse=True)
    assert {"bm25", "dense", "fusion", "fetch", "total"} <= set(data["timings_ms"])


def test_each_mode_reports_only_its_stages(client):
    bm25 = search(client, query="sourdough starter wild yeast", mode="bm25", k=3)
    assert bm25["hits"][0]["doc_id"] == "cook-003" and set(bm25["hits"][0]["explain"]) == {"bm25"}
    dense = search(client, query="a cup of coffee under pressure", mode="dense", k=3)
    assert dense["hits"][0]["doc_id"] == "cook-014" and set(dense["hits"][0]["explain"]) == {"dense"}


def test_one_sided_hit_has_null_for_the_missing_stage(client):
    data = search(client, query="zooxanthellae", k=10, candidates=5)
    only_dense = [h for h in data["hits"] if h["explain"]["bm25"] is None]
    assert only_dense and all(h["explain"]["dense"]["rank"] >= 1 for h in only_dense)
    assert data["hits"][0]["doc_id"] == "bio-010" and data["hits"][0]["explain"]["bm25"]["rank"] == 1


def test_long_document_passages_carry_offsets(client):
    data = search(client, query="preheated Dutch oven lid steam crust", k=3)
    hit = data["hits"][0]
    assert hit["doc_id"] == "guide-bread" and hit["position"] >= 1 and hit["start"] > 0
    document = client.get("/v1/documents/guide-bread").json()
    assert document["text"][hit["start"] : hit["end"]] == hit["text"]
    assert [p["position"] for p in document["passages"]] == list(range(len(document["passages"])))
    assert len(document["passages"]) >= 3


def test_filters_equality_and_in(client):
    data = search(client, query="temperature", k=20, filters={"topic": "cooking"})
    assert data["hits"] and {h["metadata"]["topic"] for h in data["hits"]} == {"cooking"}
    data = search(client, query="temperature", k=30, filters={"topic": ["health", "earth"], "kind": "note"})
    assert {h["metadata"]["topic"] for h in data["hits"]} == {"health", "earth"}
    assert search(client, query="temperature", filters={"topic": "nonexistent"})["hits"] == []
    assert search(client, query="bread", filters={"reading_minutes": [3]}, k=5)["hits"][0]["doc_id"] == "guide-bread"


def test_snippet_and_highlight(client):
    data = search(client, query="Great Red Spot storm", k=1, return_text=False, highlight=True)
    hit = data["hits"][0]
    assert hit["text"] is None and "<mark>Great</mark> <mark>Red</mark> <mark>Spot</mark>" in hit["snippet"]


def test_weighted_fusion_and_rrf_k_are_honoured(client):
    bm25_only = search(client, query="Gutenberg movable type", fusion="weighted", weights={"bm25": 1.0, "dense": 0.0})
    assert bm25_only["hits"][0]["doc_id"] == "hist-001" and bm25_only["hits"][0]["score"] == pytest.approx(1.0)
    rrf = search(client, query="Gutenberg movable type", rrf_k=1)
    assert rrf["hits"][0]["score"] == pytest.approx(1.0)  # rank 1 in both: 1/(1+1) * 2


def test_batch_matches_single_queries(client):
    queries = ["why is mars red", "offside rule in football", "Bach fugues"]
    batch = client.post("/v1/search/batch", json={"queries": queries, "k": 5})
    assert batch.status_code == 200
    results = batch.json()["results"]
    for query, result in zip(queries, results):
        single = search(client, query=query, k=5)
        assert [h["passage_id"] for h in result["hits"]] == [h["passage_id"] for h in single["hits"]]
        assert [h["score"] for h in result["hits"]] == pytest.approx([h["score"] for h in single["hits"]], rel=1e-5)


def test_documents_info_health_and_metrics(client):
    assert client.get("/v1/documents/astro-003").json()["title"] == "Black holes"
    missing = client.get("/v1/documents/no-such-doc")
    assert missing.status_code == 404 and "no document with id 'no-such-doc'" in missing.json()["error"]["message"]
    info = client.get("/v1/info").json()
    assert info["models"]["dense"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert info["bundle"]["counts"]["passages"] >= 150 and info["modes"] == ["bm25", "dense", "hybrid"]
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    metrics = client.get("/metrics").text
    assert 'sift_requests_total{method="POST",route="/v1/search",status="200"}' in metrics
    assert 'sift_stage_latency_seconds_count{collection="default",stage="dense"}' in metrics
    assert "sift_in_flight_requests" in metrics and "sift_reranked_candidates_total" in metrics
    queries = client.app.state.settings.runtime.queries  # configs/default.yaml: onnx
    assert info["runtimes"] == {"passages": "torch", "queries": queries, "reranker": None, "maxsim": None}


def metric(client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_query_embeddings_are_cached_and_counted(client):
    hits, misses = metric(client, "sift_query_cache_hits_total"), metric(client, "sift_query_cache_misses_total")
    first = search(client, query="a query nobody sent before: comets and their tails", mode="dense", k=5)
    second = search(client, query="a query nobody sent before:  comets and their tails ", mode="dense", k=5)
    assert metric(client, "sift_query_cache_misses_total") == misses + 1
    assert metric(client, "sift_query_cache_hits_total") == hits + 1
    assert [(h["passage_id"], h["score"]) for h in second["hits"]] == [
        (h["passage_id"], h["score"]) for h in first["hits"]
    ]
    assert metric(client, "sift_query_cache_entries") >= 1


BAD_BODIES = [
    ({"query": ""}, "query", "at least 1 character"),
    ({"query": "   "}, "query", "non-whitespace"),
    ({"query": "x" * 2001}, "query", "longer than 2000 characters (search.max_query_chars)"),
    ({"query": "x", "k": 0}, "k", "greater than or equal to 1"),
    ({"query": "x", "k": 101}, "k", "must be <= 100 (search.max_k)"),
    ({"query": "x", "mode": "sparse"}, "mode", "'bm25', 'dense' or 'hybrid'"),
    ({"query": "x", "fusion": "max"}, "fusion", "'rrf' or 'weighted'"),
    ({"query": "x", "candidates": 1001}, "candidates", "must be <= 1000 (search.max_candidates)"),
    ({"query": "x", "filters": {"topic": {"$ne": 1}}}, "filters.topic", "valid"),
    ({"query": "x", "filters": {"topic": []}}, "filters", "must not be empty"),
    ({"query": "x", "weights": {"bm25": -1}}, "weights", "greater than or equal to 0"),
    ({"query": "x", "colour": "red"}, "colour", "Extra inputs are not permitted"),
    ({"query": "x", "rerank": True}, "rerank", "no reranker is configured"),
    ({"k": 3}, "query", "Field required"),
]


@pytest.mark.parametrize(("body", "field", "message"), BAD_BODIES)
def test_invalid_bodies_are_422_naming_the_field(client, body, field, message):
    response = client.post("/v1/search", json=body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["type"] == "validation_error"
    assert any(f["field"].startswith(field) and message in f["message"] for f in error["fields"]), error
    assert field.split(".")[0] in error["message"]


def test_batch_errors_name_the_query(client):
    response = client.post("/v1/search/batch", json={"queries": ["ok", " "]})
    assert response.status_code == 422 and "queries[1] must contain non-whitespace text" in response.text
    response = client.post("/v1/search/batch", json={"queries": []})
    assert response.status_code == 422 and response.json()["error"]["fields"][0]["field"] == "queries"


def test_malformed_json_and_oversized_body(client):
    response = client.post("/v1/search", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422 and "JSON" in response.json()["error"]["message"]
    big = b'{"query": "' + b"a" * 1_100_000 + b'"}'
    response = client.post("/v1/search", content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert "exceeds 1000000 bytes" in response.json()["error"]["message"]


def test_not_ready_is_503_with_what_to_do(tmp_path):
    settings = load_settings(bundle=tmp_path / "missing")
    with TestClient(create_app(settings)) as c:
        for _ in range(100):
            response = c.get("/readyz")
            if "loading failed" in response.text:
                break
        assert response.status_code == 503
        assert "no such bundle" in response.json()["error"]["message"]
        assert c.post("/v1/search", json={"query": "x"}).status_code == 503
        assert c.get("/healthz").status_code == 200


def test_openapi_documents_every_search_field_with_examples(client):
    schema = client.get("/openapi.json").json()
    props = schema["components"]["schemas"]["SearchRequest"]["properties"]
    for name in ("query", "k", "mode", "candidates", "fusion", "rrf_k", "weights", "rerank", "rerank_depth", "filters"):
        assert props[name].get("description"), name
        assert props[name].get("examples"), name


def test_snippet_window_is_the_first_densest_cluster_of_query_terms() -> None:
    """The window starts at the first match with the most matches within `chars` after it (checked against the
    quadratic count it replaced), backed up to a word boundary."""
    import random
    import re

    from app.api.shaping import snippet

    rng = random.Random(7)
    words = ["star", "gas", "cloud", "the", "of", "collapse", "core", "disk", "dust", "heat"]
    for _ in range(200):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(20, 120)))
        query = " ".join(rng.sample(words, 2))
        chars = rng.choice([30, 60, 120])
        terms = set(query.split())
        starts = [m.start() for m in re.finditer(r"\w+", text) if m.group() in terms]
        out = snippet(text, query, chars, highlight=False)
        if len(text) <= chars or not starts:
            continue
        counts = [sum(1 for n in starts if s <= n < s + chars) for s in starts]
        start = max(0, starts[counts.index(max(counts))] - chars // 6)
        end = min(len(text), start + chars)
        while start > 0 and not text[start - 1].isspace():
            start -= 1
        assert out.removeprefix("…").removesuffix("…") == text[start:end]
