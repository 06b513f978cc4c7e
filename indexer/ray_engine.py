"""`sift index build --engine ray`: passages encoded by a Ray Data actor pool (install `sift[ray]`).

    driver: read → chunk (the build pipeline, indexer/pipeline.py) ──► a block of passages (`block_passages`)
      ──► Ray Data dataset of (row, text)
      ──► map_batches(PassageEncoder, ActorPoolStrategy(size=N), num_gpus=G): each actor loads the encoder once
      ──► batches come back in input order ──► vectors (and token vectors, already in their stored form)
          assembled in row order ──► the pipeline writes them (docstore, BM25, FAISS, one bundle or shards),
          then manifest, atomic publish (as a local build)

The engine serves a build and an update alike (`update_bundle(..., engine=RayEncoding(...))` encodes the
added and changed passages on Ray; kept ones reuse the parent's vectors). Each block is one dataset, so the
actor pool starts once per block: blocks are large (default 200,000 passages) and bound what the driver holds.

Invariants:
- Every passage row comes back exactly once, in order: the driver checks the rows it receives against
  0..n-1 and refuses the build otherwise (a lost or duplicated passage is an error, never a silent gap).
- A failed or killed actor is restarted by Ray and its unfinished batch retried (`max_restarts`,
  `max_task_retries`); encoding is deterministic, so a retried batch gives the same vectors.
- Actors encode with `encode_passages`, the function a local build uses, so a Ray build's vectors equal a
  local build's (within float rounding of batch composition) and token vectors are byte-identical in form.
- Works on a local Ray (`ray.init()`, started here and shut down after) and on a cluster (`--address`),
  unchanged; only the driver reads the input and writes the bundle.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from indexer.config import DenseSettings, IndexConfig
from indexer.encoders import TOKEN_SLICE, encode_passages, load_encoder, pick_device
from indexer.tokens import BuildTokens, IntakeDtype, TokenSink, stored_form

log = logging.getLogger(__name__)


class _Collected(TokenSink):
    """Token vectors of a batch in their stored form (what `TokenWriter.add` would write)."""

    def __init__(self, dtype: IntakeDtype) -> None:
        self.dtype = dtype
        self.rows: list[np.ndarray] = []
        self.scales: list[np.ndarray] = []

    def add(self, vectors: np.ndarray) -> None:
        rows, scales = stored_form(vectors, self.dtype)
        self.rows.append(np.ascontiguousarray(rows))
        if scales is not None:
            self.scales.append(scales.astype(np.float32))


class PassageEncoder:
    """A Ray Data actor: loads the bi-encoder once, then encodes batches of (row, text)."""

    def __init__(self, settings: dict[str, Any], threads: int = 1) -> None:
        import torch

        torch.set_num_threads(max(1, threads))  # the CPUs Ray gave this actor (Ray's default would be one)
        self.settings = DenseSettings(**settings)
        self.encoder = load_encoder(self.settings.model, self.settings.device, self.settings.runtime)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        texts = [str(t) for t in batch["text"]]
        dtype: IntakeDtype | None = "int8" if self.settings.token_vectors == "pq" else self.settings.token_vectors
        collected = _Collected(dtype) if dtype else None
        vectors = encode_passages(self.encoder, texts, self.settings, False, collected)
        out: dict[str, Any] = {"row": np.asarray(batch["row"], dtype=np.int64), "vector": vectors}
        if collected is not None:
            out["tokens"] = np.array([r.tobytes() for r in collected.rows], dtype=object)
            out["length"] = np.array([r.shape[0] for r in collected.rows], dtype=np.int64)
            if dtype == "int8":
                out["scales"] = np.array([s.tobytes() for s in collected.scales], dtype=object)
        return out


class RayEncoding:
    """The Ray engine of the build pipeline, for `build_bundle` and `update_bundle` (see the module docstring)."""

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        encoders: int = 1,
        gpus_per_encoder: float = 0.0,
        max_restarts: int = 4,
        init_kwargs: dict[str, Any] | None = None,
        batch_size: int | None = None,
        on_batch: Any = None,
        cpus_per_encoder: float | None = None,
        block_passages: int = 200_000,
    ) -> None:
        """`batch_size`: passages per actor call (default: the slice a local build encodes at once);
        `on_batch(rows_done, total)` is called after each batch arrives, with the rows of the current block
        (progress, tests); `cpus_per_encoder` (default: the cluster's CPUs shared out between the encoders) is
        both what each actor reserves and its torch threads; `block_passages`: about how many passages the
        build pipeline hands one `encode` call (one Ray dataset)."""
        if encoders < 1:
            raise ValueError("--num-encoders must be at least 1")
        if gpus_per_encoder < 0:
            raise ValueError("--gpus-per-encoder must be 0 or more")
        if block_passages < 1:
            raise ValueError("block_passages must be at least 1")
        self.address = address
        self.encoders = encoders
        self.gpus_per_encoder = gpus_per_encoder
        self.max_restarts = max_restarts
        self.init_kwargs = init_kwargs or {}
        self.batch_size = batch_size
        self.on_batch = on_batch
        self.cpus_per_encoder = cpus_per_encoder
        self.block_passages = block_passages
        self._started_ray = False
        self._local: Any = None
        self.timings: dict[str, float] = {}

    def start(self, config: IndexConfig) -> Any:
        """Join (or start) Ray; the driver loads the tokenizer chunking needs (and nothing runs on its model)."""
        import ray

        t = time.perf_counter()
        if not ray.is_initialized():
            kwargs = {"include_dashboard": False, "log_to_driver": False, **self.init_kwargs}
            ray.init(address=self.address, **kwargs)
            self._started_ray = True
        self.timings["ray_init"] = time.perf_counter() - t
        self._local = load_encoder(config.dense.model, "cpu", "torch")
        self._runtime = config.dense.runtime
        return self._local.tokenizer

    def encode(
        self, texts: list[str], settings: DenseSettings, progress: bool, tokens: BuildTokens | None
    ) -> np.ndarray:
        import ray

        t = time.perf_counter()
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        context.enable_progress_bars = progress
        actor_settings = settings.model_dump(mode="json")
        actor_settings["token_vectors"] = tokens.form.intake if tokens is not None else None
        if self.gpus_per_encoder > 0 and settings.device in (None, "cpu"):
            actor_settings["device"] = "cuda"
        cpus = self.cpus_per_encoder or max(1, int(ray.cluster_resources().get("CPU", 1)) // self.encoders)
        rows = ray.data.from_items([{"row": i, "text": text} for i, text in enumerate(texts)])
        encoded = rows.map_batches(
            PassageEncoder,
            fn_constructor_kwargs={"settings": actor_settings, "threads": int(cpus)},
            batch_size=self.batch_size or max(settings.batch_size, TOKEN_SLICE),
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=self.encoders),
            num_gpus=self.gpus_per_encoder or None,
            num_cpus=cpus,
            ray_remote_args_fn=lambda: {"max_restarts": self.max_restarts, "max_task_retries": self.max_restarts},
        )
        vectors: list[np.ndarray] = []
        expected = 0
        for batch in encoded.iter_batches(batch_size=None, batch_format="numpy"):
            got = batch["row"]
            if got.size and not np.array_equal(got, np.arange(expected, expected + got.size)):
                raise RuntimeError(
                    f"Ray returned passages {int(got[0])}..{int(got[-1])} where {expected} was next: a passage was "
                    "lost or duplicated; the build is refused (nothing was published)"
                )
            expected += int(got.size)
            vectors.append(np.asarray(batch["vector"], dtype=np.float32))
            if tokens is not None:
                for i in range(got.size):
                    length = int(batch["length"][i])
                    data = np.frombuffer(batch["tokens"][i], dtype=tokens.form.intake).reshape(length, -1)
                    scales = (
                        np.frombuffer(batch["scales"][i], dtype=np.float32) if tokens.form.intake == "int8" else None
                    )
                    tokens.add_quantized(data, scales)
            if self.on_batch is not None:
                self.on_batch(expected, len(texts))
        if expected != len(texts):
            raise RuntimeError(f"Ray returned {expected} of {len(texts)} passages; the build is refused")
        self.timings["encode"] = time.perf_counter() - t
        return np.concatenate(vectors) if vectors else np.zeros((0, 0), dtype=np.float32)

    @property
    def info(self) -> dict[str, Any]:
        return {
            "engine": self.name,
            "max_seq_length": int(self._local.max_seq_length) if self._local is not None else None,
            "runtime": getattr(self, "_runtime", None),
            "device": "cuda" if self.gpus_per_encoder > 0 else pick_device(None),
            "encoders": self.encoders,
            "gpus_per_encoder": self.gpus_per_encoder,
            "address": self.address or "local",
        }

    def close(self) -> None:
        self._local = None
        if self._started_ray:
            import ray

            ray.shutdown()
            self._started_ray = False
