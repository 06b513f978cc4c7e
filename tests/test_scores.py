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
