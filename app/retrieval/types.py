"""`Hit` and `StageScore`: what every stage takes and returns. Both are immutable named tuples (a request
builds hundreds of them per retriever, and a tuple is a third of the cost of a frozen dataclass)."""

from __future__ import annotations

from typing import NamedTuple


class StageScore(NamedTuple):
    """A passage's score and 1-based rank in one stage; `note` says why a stage was skipped."""

    score: float | None
    rank: int | None
    note: str | None = None


class Hit(NamedTuple):
    """A passage in a ranking. `idx` is its row in the bundle; `stages` records every stage it went through
    (a ranking's hits never share a `stages` dict that a later stage mutates: stages copy it)."""

    idx: int
    passage_id: str
    doc_id: str
    score: float
    stages: dict[str, StageScore] = {}  # noqa: RUF012 - never mutated: `with_stage` and fusion copy it

    def with_stage(self, name: str, score: float | None, rank: int | None, note: str | None = None) -> Hit:
        """A copy with stage `name` recorded and, when `score` is not None, that score as the final one."""
        stages = {**self.stages, name: StageScore(score, rank, note)}
        return self._replace(stages=stages, score=self.score if score is None else float(score))


def ranked(name: str, scored: list[tuple[int, str, str, float]]) -> list[Hit]:
    """Hits from (idx, passage_id, doc_id, score) already in rank order, tagged with stage `name`."""
    return [
        Hit(idx, pid, did, value, {name: StageScore(value, rank)})
        for rank, (idx, pid, did, score) in enumerate(scored, start=1)
        for value in (float(score),)
    ]
