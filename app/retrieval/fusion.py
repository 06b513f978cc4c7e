"""Fusion of several rankings into one. All fusion math lives here.

- `rrf`: score = Σ_r 1 / (rrf_k + rank_r); a passage missing from a ranking adds nothing for it.
- `weighted`: score = Σ_r w_r · minmax_r(score); scores are min-max normalised within each ranking
  (a ranking whose scores are all equal normalises to 1.0); missing passages add nothing.
Ties are broken by the best single-retriever rank, then by passage row (deterministic).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from app.retrieval.types import Hit, StageScore

FusionMethod = Literal["rrf", "weighted"]


@dataclass(frozen=True)
class FusionConfig:
    method: FusionMethod = "rrf"
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
    # passage row -> [fused score, best single-retriever rank, first hit seen, stages so far]
    entries: dict[int, list[Any]] = {}
    for retriever, hits in rankings.items():
        if config.method == "rrf":
            contributions = [1.0 / (config.rrf_k + rank) for rank in range(1, len(hits) + 1)]
        else:
            normalised, weight = _minmax(hits), config.weights.get(retriever, 1.0)
            contributions = [weight * normalised[hit.idx] for hit in hits]
        for rank, (hit, contribution) in enumerate(zip(hits, contributions), start=1):
            entry = entries.get(hit.idx)
            if entry is None:
                entries[hit.idx] = [contribution, rank, hit, dict(hit.stages)]
            else:
                entry[0] += contribution
                entry[1] = min(entry[1], rank)
                entry[3].update(hit.stages)
    order = sorted(entries.items(), key=lambda item: (-item[1][0], item[1][1], item[0]))
    result = []
    for rank, (_, (score, _, hit, stages)) in enumerate(order, start=1):
        stages[name] = StageScore(score, rank)
        result.append(Hit(hit.idx, hit.passage_id, hit.doc_id, score, stages))
    return result
