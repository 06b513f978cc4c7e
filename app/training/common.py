"""What every trainer shares: the training group, a teacher's margins on it, cross-encoder loading and logits,
seeding and batching."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import numpy as np

if TYPE_CHECKING:
    from sentence_transformers import CrossEncoder

T = TypeVar("T")


@dataclass
class Group:
    """One query with its positive passage and negative passages."""

    query: str
    positive: str
    negatives: list[str] = field(default_factory=list)
    source: str = ""


@dataclass
class Scored:
    """A group with its teacher margins (positive minus each negative, on the student's scale; empty without a
    teacher)."""

    group: Group
    margins: list[float]


def load_cross_encoder(name: str, max_length: int, device: str | None) -> CrossEncoder:
    from sentence_transformers import CrossEncoder

    from indexer.encoders import pick_device, resolve_model_path

    model = CrossEncoder(resolve_model_path(name), num_labels=1, max_length=max_length, device=pick_device(device))
    model.model.float()  # an fp16-saved checkpoint (Sift ships them) trains with fp32 master weights
    return model


def logits(
    model: CrossEncoder, pairs: list[tuple[str, str]], batch_size: int = 64, progress: bool = False
) -> np.ndarray:
    """The model's raw relevance logits of `pairs` (what Sift's second stage z-normalises; not `predict`'s
    default sigmoid, which squashes the margins of confident pairs)."""
    import torch

    out = model.predict(pairs, batch_size=batch_size, show_progress_bar=progress, activation_fn=torch.nn.Identity())
    return np.asarray(out, dtype=np.float32).reshape(-1)


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) for a reproducible run."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def epoch_batches(items: Sequence[T], batch_size: int, seed: int, epoch: int) -> list[list[T]]:
    """One epoch's batches: `items` shuffled by `seed + epoch` (so a resumed run sees the same order), cut into
    batches of `batch_size` (the last may be shorter)."""
    order = list(range(len(items)))
    random.Random(seed + epoch).shuffle(order)
    return [[items[i] for i in order[at : at + batch_size]] for at in range(0, len(order), batch_size)]


def describe_sources(groups: Sequence[object]) -> str:
    """ "N training groups: source n, ..." for groups carrying a `source`."""
    sources = [getattr(g, "source", "") for g in groups]
    return f"{len(groups)} training groups: " + ", ".join(f"{s} {sources.count(s)}" for s in sorted(set(sources)))


def pairs_of(groups: Sequence[Group]) -> list[tuple[str, str]]:
    """Every (query, text) pair of `groups`, group by group, the positive first."""
    return [(g.query, t) for g in groups for t in [g.positive, *g.negatives]]
