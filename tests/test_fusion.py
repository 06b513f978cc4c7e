"""Fusion math: exact RRF values, ties, one-sided hits, weighted fusion."""

from __future__ import annotations

import pytest

from app.retrieval import FusionConfig, Hit, fuse
from app.retrieval.types import ranked


def hits(name: str, ids: list[int], scores: list[float] | None = None) -> list[Hit]:
    scores = scores or [float(10 - i) for i in range(len(ids))]
    return ranked(name, [(i, f"p{i}", f"d{i}", s) for i, s in zip(ids, scores)])


def test_rrf_exact_values_and_one_sided_hits():
    fused = fuse({"bm25": hits("bm25", [1, 2, 3]), "dense": hits("dense", [2, 4])}, FusionConfig("rrf", rrf_k=60))
    by_id = {h.idx: h for h in fused}
    assert by_id[2].score == pytest.approx(1 / 62 + 1 / 61)
    assert by_id[1].score == pytest.approx(1 / 61)  # found by bm25 only
    assert by_id[4].score == pytest.approx(1 / 62)  # found by dense only
    assert by_id[3].score == pytest.approx(1 / 63)
    assert [h.idx for h in fused] == [2, 1, 4, 3]
    assert "bm25" not in by_id[4].stages and by_id[4].stages["dense"].rank == 2
    assert by_id[2].stages["fused"].rank == 1 and by_id[2].stages["bm25"].rank == 2


def test_rrf_ties_break_by_best_single_rank_then_row():
    # 5 is rank 1 in bm25 only, 7 is rank 1 in dense only: equal RRF score, equal best rank → lower row first
    fused = fuse({"bm25": hits("bm25", [5, 9]), "dense": hits("dense", [7, 8])})
    assert [h.idx for h in fused] == [5, 7, 8, 9]
    assert fused[0].score == fused[1].score == pytest.approx(1 / 61)
    assert [h.stages["fused"].rank for h in fused] == [1, 2, 3, 4]


def test_rrf_k_changes_values():
    fused = fuse({"bm25": hits("bm25", [1])}, FusionConfig("rrf", rrf_k=1))
    assert fused[0].score == pytest.approx(0.5)


def test_weighted_fusion_minmax_normalises_each_ranking():
    rankings = {
        "bm25": hits("bm25", [1, 2, 3], [30.0, 20.0, 10.0]),
        "dense": hits("dense", [3, 4], [0.9, 0.5]),
    }
    fused = fuse(rankings, FusionConfig("weighted", weights={"bm25": 0.25, "dense": 0.75}))
    by_id = {h.idx: h.score for h in fused}
    assert by_id == pytest.approx({1: 0.25, 2: 0.125, 3: 0.75, 4: 0.0})
    assert [h.idx for h in fused] == [3, 1, 2, 4]


def test_weighted_fusion_constant_scores_normalise_to_one_and_empty_is_empty():
    fused = fuse({"bm25": hits("bm25", [1, 2], [3.0, 3.0])}, FusionConfig("weighted", weights={"bm25": 2.0}))
    assert [h.score for h in fused] == [2.0, 2.0]
    assert fuse({"bm25": [], "dense": []}) == []
