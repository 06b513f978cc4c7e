"""What every trainer shares."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")


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
