"""`Hit` and `StageScore`: what every stage takes and returns."""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class StageScore:
    """A passage's score and 1-based rank in one stage; `note` says why a stage was skipped."""

    score: float | None
    rank: int | None
    note: str | None = None


@dataclass(frozen=True)
class Hit:
    """A passage in a ranking. `idx` is its row in the bundle; `stages` records every stage it went through."""

    idx: int
    passage_id: str
    doc_id: str
    score: float
    stages: dict[str, StageScore] = field(default_factory=dict)

    def with_stage(self, name: str, score: float | None, rank: int | None, note: str | None = None) -> Hit:
        """A copy with stage `name` recorded and, when `score` is not None, that score as the final one."""
        stages = {**self.stages, name: StageScore(score, rank, note)}
        return replace(self, stages=stages, score=self.score if score is None else float(score))


def ranked(name: str, scored: list[tuple[int, str, str, float]]) -> list[Hit]:
    """Hits from (idx, passage_id, doc_id, score) already in rank order, tagged with stage `name`."""
    return [
        Hit(idx, pid, did, float(score), {name: StageScore(float(score), rank)})
        for rank, (idx, pid, did, score) in enumerate(scored, start=1)
    ]
