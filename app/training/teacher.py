"""Sift's second stage as a teacher for the models it trains (`sift encoder train`, `sift reranker train
--teacher`): the fused second-stage score of every (query, text) pair of every training group, and its margins
(positive minus each negative) put on the student's own scale.

Invariants: the teacher scores each pair once, before training; each stage's raw scores are z-normalised over
all the pairs it is given (so the fused score is in z-units whatever the stages' native scales); a margin is
positive when the teacher prefers the group's positive to that negative.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from app.training.common import Group, Scored

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from app.settings import RerankerSettings

STAGES = ("cross_encoder", "maxsim")


class Teacher:
    """Cross-encoder and MaxSim scores of (query, text) pairs, each z-normalised over all the pairs it is
    given, fused with the configured weights (stages absent from `weights` or weighted 0 are not run)."""

    def __init__(
        self,
        cross_encoder: str | None,
        encoder: SentenceTransformer,
        weights: dict[str, float],
        max_length: int = 128,
        device: str | None = None,
    ) -> None:
        self.weights = {k: v for k, v in weights.items() if k in STAGES and v > 0}
        if cross_encoder is None:
            self.weights.pop("cross_encoder", None)
        if not self.weights:
            raise ValueError("the teacher needs a cross-encoder or MaxSim with a positive weight")
        self.cross_encoder_name = cross_encoder
        self.encoder = encoder
        self.max_length = max_length
        self.device = device

    @classmethod
    def from_settings(cls, second: RerankerSettings, encoder: SentenceTransformer, device: str | None) -> Teacher:
        """The configured second stage (`reranker.model` unless it names MaxSim, MaxSim when `reranker.maxsim`,
        weighted by `reranker.weights`) over `encoder`'s token vectors."""
        has_ce = bool(second.model) and second.model != "maxsim" and not str(second.model).startswith("maxsim:")
        weights = second.stage_weights(cross_encoder=has_ce, maxsim=second.maxsim)
        return cls(second.model if has_ce else None, encoder, weights, second.max_length, device)

    def describe(self) -> dict[str, Any]:
        return {"cross_encoder": self.cross_encoder_name, "max_length": self.max_length, "weights": self.weights}

    def stage_scores(self, pairs: list[tuple[str, str]], progress: bool = True) -> dict[str, np.ndarray]:
        """Each weighted stage's raw scores of `pairs`: the cross-encoder's logits (as the served second stage
        fuses them; before 2026-12-06 the teacher fused `predict`'s sigmoid probabilities) and MaxSim's sums."""
        raw: dict[str, np.ndarray] = {}
        if "cross_encoder" in self.weights:
            from app.training.common import load_cross_encoder, logits

            model = load_cross_encoder(str(self.cross_encoder_name), self.max_length, self.device)
            model.eval()
            raw["cross_encoder"] = logits(model, pairs, batch_size=32, progress=progress).astype(np.float64)
            del model
        if "maxsim" in self.weights:
            from app.retrieval.maxsim import MaxSimReranker

            scorer = MaxSimReranker(self.encoder)
            starts = _bar(range(0, len(pairs), 256), "teacher maxsim", progress)
            chunks = [scorer.score(pairs[i : i + 256]) for i in starts]
            raw["maxsim"] = np.concatenate(chunks).astype(np.float64) if chunks else np.zeros(0)
        return raw

    def fuse(self, raw: dict[str, np.ndarray]) -> np.ndarray:
        """The weighted sum of the stages' z-normalised scores."""
        n = len(next(iter(raw.values())))
        fused = np.zeros(n, dtype=np.float64)
        for stage, weight in self.weights.items():
            fused += weight * z(raw[stage])
        return fused

    def scores(self, pairs: list[tuple[str, str]], progress: bool = True) -> np.ndarray:
        return self.fuse(self.stage_scores(pairs, progress))


def margins_on_scale(groups: Sequence[Group], fused: np.ndarray, student: np.ndarray) -> list[Scored]:
    """Each group with the teacher's margins (`fused`, one score per pair of `pairs_of(groups)`) multiplied by
    the standard deviation of the student's own scores over the same pairs (`student`), so that teacher and
    student margins have the same spread (a least-squares fit would shrink the teacher's margins by its
    correlation with the student and pull every margin towards zero)."""
    slope = float(np.std(student))
    out, offset = [], 0
    for g in groups:
        n = 1 + len(g.negatives)
        block = fused[offset : offset + n]
        out.append(Scored(g, [float((block[0] - b) * slope) for b in block[1:]]))
        offset += n
    return out


def z(values: np.ndarray) -> np.ndarray:
    return (values - values.mean()) / max(float(values.std()), 1e-9)


def _bar(items: Any, desc: str, progress: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, disable=not progress)
