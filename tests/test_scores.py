"""Hit scores fall as rank falls on every path: a client that sorts or thresholds by score (LangChain score
thresholds, LlamaIndex cutoffs, trec_eval over an exported run, a downstream fusion) gets the served ranking."""

from __future__ import annotations

import numpy as np

from app.retrieval.reranker import combine_stages, stack_below
from app.retrieval.types import ranked


def test_hits_below_the_reranked_depth_score_below_the_reranked_ones():
    first = ranked("rrf", [(i, f"p{i}", f"d{i}", 0.033 - 0.0005 * i) for i in range(8)])
    head = combine_stages(first[:3], {"cross_encoder": np.array([-4.0, -2.0, -6.0])}, {"cross_encoder": 1.0})
    assert [h.idx for h in head] == [1, 0, 2]
    assert head[-1].score < 0  # fused z-scores are often negative: the first-stage tail (≈0.03) would sit above
    out = stack_below(head, first[3:])
    scores = [h.score for h in out]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores)
    assert [h.idx for h in out] == [1, 0, 2, 3, 4, 5, 6, 7]
    # the tail keeps its first-stage spacing and stage record; the raw first-stage score stays in `stages`
    assert np.allclose(np.diff(scores[3:]), -0.0005)
    assert out[3].stages["rrf"].score == first[3].score
    assert stack_below([], first) == first and stack_below(head, []) == head


def test_scores_fall_with_rank_over_http_on_every_path(example_index):
    """A real server with the shipped second stage at its configured depth (12): one page, consecutive pages,
    a batch and a collapsed ranking all carry scores that never rise as rank falls, across the depth too."""
    import httpx

    from tests.servers import sift_server

    env = {"SIFT_BUNDLE": str(example_index), "SIFT_RERANKER__LATENCY_BUDGET_MS": "0"}
    query = {"query": "how do stars form", "k": 30, "candidates": 60}

    def falling(hits: list[dict]) -> list[float]:
        scores = [h["score"] for h in hits]
        assert all(a >= b for a, b in zip(scores, scores[1:])), scores
        return scores

    with sift_server(env) as (base, _), httpx.Client(base_url=base, timeout=120) as client:
        whole = client.post("/v1/search", json=query).json()["hits"]
        scores = falling(whole)
        reranked = [h for h in whole if (h["explain"].get("rerank") or {}).get("score") is not None]
        assert len(reranked) == 12 and scores[11] > scores[12]  # the first-stage tail sits below the head
        pages = [client.post("/v1/search", json={**query, "k": 10, "offset": o}).json()["hits"] for o in (0, 10, 20)]
        assert [h["score"] for page in pages for h in page] == scores  # pages concatenate to the same scores
        batch = client.post("/v1/search/batch", json={"queries": ["how do stars form", "ocean tides"], "k": 30})
        for result in batch.json()["results"]:
            falling(result["hits"])
        collapsed = client.post("/v1/search", json={**query, "collapse": True}).json()["hits"]
        falling(collapsed)
