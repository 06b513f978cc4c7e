"""Pinned quality of the cross-encoder shipped in models/ on a SciFact test subset small enough for CI:
the first `queries` claims, hybrid top-`depth` reranked through `Pipeline.search` (the API's code path).
Expected values: the `reranker` section of configs/regression/scifact.yaml; full-split figures in the model card."""

from __future__ import annotations

import pytest
import yaml

from app.eval.retrieval import BeirDataset, load_beir, run_pipelines
from tests.conftest import ROOT, SCIFACT, SHARED_DATA_WORKER, needs_scifact

# heavy: the suites over the SciFact bundle (its build alone takes 8–10 min on a 2-core CPU) run in CI's
# `make test-heavy`, keeping `make test` within its 20 minutes on a clean clone
pytestmark = [needs_scifact, pytest.mark.slow, pytest.mark.heavy, SHARED_DATA_WORKER]
PIN = yaml.safe_load((ROOT / "configs" / "regression" / "scifact.yaml").read_text())["reranker"]
MODEL = ROOT / PIN["model"]


@pytest.fixture(scope="module")
def subset() -> BeirDataset:
    full = load_beir(SCIFACT, "test")
    qids = list(full.queries)[: PIN["queries"]]
    return BeirDataset(full.root, full.split, {q: full.queries[q] for q in qids}, {q: full.qrels[q] for q in qids})


@pytest.fixture(scope="module")
def scores(scifact_pipeline, subset):
    """The session's SciFact pipeline (bundle, searchers and bi-encoder already loaded) plus the shipped model."""
    from app.retrieval.reranker import Reranker
    from app.services import derive_pipeline

    settings = scifact_pipeline.settings.model_copy(deep=True)
    settings.reranker.model = str(MODEL)
    settings.reranker.interpolation = PIN["interpolation"]
    settings.reranker.maxsim, settings.reranker.weights = False, None  # the cross-encoder alone, interpolated
    settings.reranker.max_length = PIN["max_length"]
    reranker = Reranker.load(str(MODEL), PIN["max_length"], "cpu")
    pipeline = derive_pipeline(scifact_pipeline, settings, reranker)
    rows, _ = run_pipelines(pipeline, subset, ["hybrid", "hybrid+rerank"], rerank_depth=PIN["depth"])
    return {row.name: row.metrics for row in rows}


def test_the_shipped_model_is_small_and_half_precision():
    weights = MODEL / "model.safetensors"
    assert weights.stat().st_size <= 50 * 1024 * 1024, "models/ may hold at most 50 MB of weights"
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as handle:
        dtypes = {str(handle.get_slice(k).get_dtype()) for k in handle.keys()}
    assert dtypes <= {"F16", "I64"}, dtypes
    assert (MODEL / "README.md").exists(), "the model card is missing"


@pytest.mark.parametrize("pipeline_name", ["hybrid", "hybrid+rerank"])
def test_subset_scores_are_pinned(scores, pipeline_name):
    for measure, expected in PIN["pinned"][pipeline_name].items():
        got = scores[pipeline_name][measure]
        assert got == pytest.approx(expected, abs=PIN["tolerance"]), (
            f"{pipeline_name} {measure} on the first {PIN['queries']} claims moved: {got:.4f} vs {expected}; "
            "if intended (a retrained model), update configs/regression/scifact.yaml and the model card"
        )


def test_reranking_beats_hybrid_on_the_subset(scores):
    gain = scores["hybrid+rerank"]["ndcg@10"] - scores["hybrid"]["ndcg@10"]
    assert gain >= PIN["min_gain"], f"rerank gains {gain:+.4f} nDCG@10 over hybrid; pinned at least {PIN['min_gain']}"
