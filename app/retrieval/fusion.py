"""Fusion of several rankings into one. All fusion math lives here.

- `rrf`: score = Σ_r 1 / (rrf_k + rank_r); a passage missing from a ranking adds nothing for it.
- `weighted`: score = Σ_r w_r · minmax_r(score); scores are min-max normalised within each ranking
  (a ranking whose scores are all equal normalises to 1.0); missing passages add nothing.
Ties are broken by the best single-retriever rank, then by passage row (deterministic).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from app.retrieval.types import Hit, StageScore


@dataclass(frozen=True)
class FusionConfig:
    method: Literal["rrf", "weighted"] = "rrf"
    rrf_k: int = 60
    weights: dict[str, float] = field(default_factory=dict)


def _minmax(hits: list[Hit]) -> dict[int, float]:
    if not hits:
        return {}
    scores = [h.score for h in hits]
    low, high = min(scores), max(scores)
    if high == low:
        return {h.idx: 1.0 for h in hits}
    return {h.idx: (h.score - low) / (high - low) for h in hits}


def fuse(rankings: dict[str, list[Hit]], config: FusionConfig | None = None, name: str = "fused") -> list[Hit]:
    """Fuse named rankings (each in rank order) into one ranking, recording stage `name` on every hit."""
    config = config or FusionConfig()
    fused: dict[int, float] = {}
    best_rank: dict[int, int] = {}
    first: dict[int, Hit] = {}
    stages: dict[int, dict[str, StageScore]] = {}
    for retriever, hits in rankings.items():
        normalised = _minmax(hits) if config.method == "weighted" else {}
        weight = config.weights.get(retriever, 1.0)
        for rank, hit in enumerate(hits, start=1):
            if config.method == "rrf":
                contribution = 1.0 / (config.rrf_k + rank)
            else:
                contribution = weight * normalised[hit.idx]
            fused[hit.idx] = fused.get(hit.idx, 0.0) + contribution
            best_rank[hit.idx] = min(best_rank.get(hit.idx, rank), rank)
            first.setdefault(hit.idx, hit)
            stages.setdefault(hit.idx, {}).update(hit.stages)
    order = sorted(fused, key=lambda i: (-fused[i], best_rank[i], i))
    result = []
    for rank, idx in enumerate(order, start=1):
        hit = first[idx]
        merged = {**stages[idx], name: StageScore(fused[idx], rank)}
        result.append(Hit(hit.idx, hit.passage_id, hit.doc_id, fused[idx], merged))
    return result
