"""Pinned quality on SciFact (BEIR) test: BM25 and dense searchers directly, and every mode through the API's
`/v1/search/batch`. Expected values live in configs/regression/scifact.yaml (Pyserini-style)."""

from __future__ import annotations

import time

import pytest
import yaml
from fastapi.testclient import TestClient

from app.api.main import create_app
from app.evaluation import document_run, evaluate, load_beir
from app.retrieval.types import Hit
from tests.conftest import ROOT, SCIFACT, needs_scifact

pytestmark = [needs_scifact, pytest.mark.slow]
PINNED = yaml.safe_load((ROOT / "configs" / "regression" / "scifact.yaml").read_text())


@pytest.fixture(scope="module")
def dataset():
    return load_beir(SCIFACT, "test")


def check(pipeline_name: str, scores: dict[str, float]) -> None:
    tolerance = PINNED["tolerance"]
    for measure, expected in PINNED["pipelines"][pipeline_name].items():
        got = scores[measure]
        if "floor" in expected:
            assert got >= expected["floor"], f"{pipeline_name} {measure} {got:.4f} below floor {expected['floor']}"
        assert got == pytest.approx(expected["pinned"], abs=tolerance), (
            f"{pipeline_name} {measure} moved: {got:.4f} vs pinned {expected['pinned']} (±{tolerance}); "
            "if intended, update configs/regression/scifact.yaml and say why"
        )


def test_dataset_is_the_beir_test_split(dataset):
    assert len(dataset.queries) == 300
    assert sum(len(v) for v in dataset.qrels.values()) == 339


@pytest.mark.parametrize("name", ["bm25", "dense"])
def test_searcher_ndcg_is_pinned(scifact_pipeline, dataset, name):
    searcher = scifact_pipeline.searchers[name]
    results = searcher.search_many(list(dataset.queries.values()), 100)
    scores = evaluate(dataset.qrels, document_run(list(dataset.queries), results))
    check(name, scores)


def _api_hits(payload: dict) -> list[list[Hit]]:
    return [[Hit(0, h["passage_id"], h["doc_id"], h["score"]) for h in result["hits"]] for result in payload["results"]]


def test_batch_api_hybrid_and_bm25_match_pinned(scifact_pipeline, dataset):
    app = create_app(scifact_pipeline.settings, pipeline=scifact_pipeline)
    qids, texts = list(dataset.queries), list(dataset.queries.values())
    with TestClient(app) as client:
        scores = {}
        for mode in ("bm25", "hybrid"):
            t = time.perf_counter()
            response = client.post(
                "/v1/search/batch",
                json={"queries": texts, "mode": mode, "k": 100, "rerank": False, "return_text": False},
            )
            assert response.status_code == 200, response.text
            assert time.perf_counter() - t < 120
            scores[mode] = evaluate(dataset.qrels, document_run(qids, _api_hits(response.json())))
    check("hybrid", scores["hybrid"])
    direct = evaluate(dataset.qrels, document_run(qids, scifact_pipeline.searchers["bm25"].search_many(texts, 100)))
    assert round(scores["bm25"]["ndcg@10"], 3) == round(direct["ndcg@10"], 3)
    check("bm25", scores["bm25"])
