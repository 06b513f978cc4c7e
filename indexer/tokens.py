"""Late-interaction token vectors stored in a bundle, so that MaxSim at query time is a dot product, not an
encoder pass over every candidate.

A build that sets `index.dense.token_vectors` keeps, for every passage, the bi-encoder's per-token output
(the same forward pass that gives the pooled passage vector, so storing them costs no extra encoding):

    dense/tokens.json          {"format", "dtype", "dimension", "tokens", "passages"}
    dense/tokens.<dtype>.bin   all token vectors, row after row, passage after passage (raw, C order)
    dense/tokens.offsets.npy   int64 [passages + 1]: passage i owns rows offsets[i]:offsets[i+1]
    dense/tokens.scales.npy    float32 [tokens] (int8 only): row r is int8[r] * scales[r]

Invariants: every stored row is a unit-length token vector (quantisation aside), in the order the tokenizer
produced the tokens (special tokens included, padding excluded, truncated at the encoder's max length),
so `maxsim` over stored rows equals MaxSim over a fresh encoding of the same passage text. `TokenStore.open`
refuses files whose sizes, offsets or metadata disagree with each other or with the bundle's passage count.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

TokenDtype = Literal["float16", "int8"]
META_FILE = "tokens.json"
OFFSETS_FILE = "tokens.offsets.npy"
SCALES_FILE = "tokens.scales.npy"
FORMAT = 1
COPY_CHUNK = 8 << 20  # bytes read at once when copying stored token vectors


def data_file(dtype: str) -> str:
    return f"tokens.{dtype}.bin"


class TokenStoreError(ValueError):
    """Stored token vectors that cannot be used as they are (missing, truncated or inconsistent files)."""


def unit_tokens(vectors: np.ndarray) -> np.ndarray:
    """Token rows scaled to unit L2 norm in float32 (zero rows stay zero)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    out: np.ndarray = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return out


def quantize_int8(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per token row: (int8 rows, float32 scales) with rows ≈ int8 * scale."""
    peak = np.abs(vectors).max(axis=1)
    scales = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    return np.clip(np.rint(vectors / scales[:, None]), -127, 127).astype(np.int8), scales


def stored_form(vectors: np.ndarray, dtype: TokenDtype) -> tuple[np.ndarray, np.ndarray | None]:
    """One passage's float token vectors as a store keeps them: unit-normalised, then int8 with per-token
    scales, or float16 (scales None)."""
    vectors = unit_tokens(vectors)
    if dtype == "int8":
        return quantize_int8(vectors)
    return vectors.astype(np.float16), None


class TokenSink(Protocol):
    """Where an encoder appends each passage's float token vectors, in passage order (`add`: stored
    unit-normalised in the sink's dtype)."""

    def add(self, vectors: np.ndarray) -> None: ...


class BuildTokens(TokenSink, Protocol):
    """Where a build writes its token vectors, passage after passage: a `TokenWriter`, or a sharded build's
    router to its shards' writers (`indexer.shards`). An encoding engine appends new passages (`add`, or
    `add_quantized` when its workers quantised them already); the build pipeline copies kept ones from the
    parent build's store (`add_stored`)."""

    dtype: TokenDtype

    def add_quantized(self, rows: np.ndarray, scales: np.ndarray | None) -> None: ...

    def add_stored(self, store: TokenStore, rows: Sequence[int]) -> None: ...


@runtime_checkable
class TokenStoreReader(Protocol):
    """What MaxSim reads from stored token vectors (`app.retrieval.maxsim.LateInteraction`). Declared by
    `TokenStore` (one bundle), `app.retrieval.shards.ShardedTokenStore` (global rows) and
    `app.serving_ray.RemoteShard` (a shard behind Ray Serve)."""

    def maxsim(self, query: np.ndarray, rows: list[int]) -> np.ndarray:
        """MaxSim of unit-normalised query token vectors (q × dimension) against each passage in `rows`."""
        ...


class TokenWriter(BuildTokens):
    """Appends passages' token vectors, in passage order, to a bundle's dense folder. Use as a context
    manager, or call `close()`; `add_stored` copies rows from another store without re-quantising them."""

    def __init__(self, directory: Path, dtype: TokenDtype, dimension: int | None = None) -> None:
        if dtype not in ("float16", "int8"):
            raise ValueError(f"token vector dtype must be float16 or int8, not {dtype!r}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.dtype = dtype
        self.dimension = dimension
        self._data = open(self.directory / data_file(dtype), "wb")  # noqa: SIM115 - closed in close()
        self._lengths: list[int] = []
        self._scales: list[np.ndarray] = []

    def _check_dimension(self, dimension: int) -> None:
        if self.dimension is None:
            self.dimension = dimension
        elif dimension != self.dimension:
            raise TokenStoreError(f"token vectors of dimension {dimension}, expected {self.dimension}")

    def add(self, vectors: np.ndarray) -> None:
        """One passage: float (tokens × dimension); stored unit-normalised in the store's dtype."""
        self.add_quantized(*stored_form(vectors, self.dtype))

    def add_quantized(self, rows: np.ndarray, scales: np.ndarray | None) -> None:
        """One passage already in stored form (as `add` writes it: unit-normalised, int8 with per-token scales
        or float16), e.g. from a Ray encoder actor."""
        self._check_dimension(int(rows.shape[1]))
        if rows.dtype != np.dtype(self.dtype) or (self.dtype == "int8") != (scales is not None):
            raise TokenStoreError(f"{rows.dtype} token rows cannot go into a {self.dtype} store")
        if scales is not None:
            if scales.shape != (rows.shape[0],):
                raise TokenStoreError(f"{scales.shape[0]} scales for {rows.shape[0]} token rows")
            self._scales.append(np.asarray(scales, dtype=np.float32))
        self._data.write(np.ascontiguousarray(rows).tobytes())
        self._lengths.append(int(rows.shape[0]))

    def add_stored(self, store: TokenStore, rows: Sequence[int]) -> None:
        """Passages `rows` of another store with the same dtype, copied as stored. The rows are read from the
        store's file (runs of consecutive passages at once, in bounded chunks), not through its memory map, so
        copying a large store (an update, a reshard) does not make the whole of it resident in this process."""
        if store.dtype != self.dtype:
            raise TokenStoreError(f"cannot copy {store.dtype} token vectors into a {self.dtype} store")
        self._check_dimension(store.dimension)
        picked = np.asarray(rows, dtype=np.int64)
        if picked.size == 0:
            return
        starts = np.asarray(store.offsets[picked], dtype=np.int64)
        ends = np.asarray(store.offsets[picked + 1], dtype=np.int64)
        self._lengths.extend((ends - starts).tolist())
        row_bytes = store.dimension * np.dtype(store.dtype).itemsize
        breaks = (np.flatnonzero(starts[1:] != ends[:-1]) + 1).tolist()  # where a run of adjacent passages ends
        with open(store.directory / data_file(store.dtype), "rb") as source:
            for first, last in zip([0, *breaks], [*breaks, picked.size], strict=True):
                start, end = int(starts[first]), int(ends[last - 1])
                position, stop = start * row_bytes, end * row_bytes
                while position < stop:
                    chunk = os.pread(source.fileno(), min(COPY_CHUNK, stop - position), position)
                    if not chunk:
                        raise TokenStoreError(f"{source.name}: ends before token row {position // row_bytes}")
                    self._data.write(chunk)
                    position += len(chunk)
                if store.scales is not None:
                    self._scales.append(np.array(store.scales[start:end], dtype=np.float32))

    def close(self) -> dict[str, object]:
        """Finish the files; returns the metadata (also written to tokens.json)."""
        self._data.close()
        offsets = np.zeros(len(self._lengths) + 1, dtype=np.int64)
        np.cumsum(self._lengths, out=offsets[1:])
        np.save(self.directory / OFFSETS_FILE, offsets)
        if self.dtype == "int8":
            scales = np.concatenate(self._scales) if self._scales else np.zeros(0, dtype=np.float32)
            np.save(self.directory / SCALES_FILE, scales.astype(np.float32))
        meta: dict[str, object] = {
            "format": FORMAT,
            "dtype": self.dtype,
            "dimension": int(self.dimension or 0),
            "tokens": int(offsets[-1]),
            "passages": len(self._lengths),
        }
        (self.directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return meta

    def __enter__(self) -> TokenWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._data.closed:
            self._data.close()


class TokenStore(TokenStoreReader):
    """Read-only, memory-mapped token vectors of one bundle (see the module docstring)."""

    def __init__(
        self,
        directory: Path,
        meta: dict[str, Any],
        data: np.ndarray,
        offsets: np.ndarray,
        scales: np.ndarray | None,
    ) -> None:
        if meta["dtype"] not in ("float16", "int8"):
            raise TokenStoreError(f"token vector dtype must be float16 or int8, not {meta['dtype']!r}")
        self.directory = directory
        self.meta = meta
        self.dtype: TokenDtype = meta["dtype"]
        self.dimension: int = int(meta["dimension"])
        self.data = data
        self.offsets = offsets
        self.scales = scales

    @staticmethod
    def exists(directory: Path) -> bool:
        return (Path(directory) / META_FILE).is_file()

    @classmethod
    def open(cls, directory: Path, passages: int | None = None) -> TokenStore:
        """Open and check the store in `directory` (a bundle's dense folder) for a bundle of `passages`."""
        directory = Path(directory)
        try:
            meta = json.loads((directory / META_FILE).read_text())
            dtype, dim, tokens, count = (
                meta["dtype"],
                int(meta["dimension"]),
                int(meta["tokens"]),
                int(meta["passages"]),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise TokenStoreError(f"{directory / META_FILE}: unreadable token-vector metadata ({exc})") from exc
        if meta.get("format") != FORMAT or dtype not in ("float16", "int8") or dim <= 0:
            raise TokenStoreError(f"{directory / META_FILE}: unsupported token-vector format {meta}")
        if passages is not None and count != passages:
            raise TokenStoreError(f"token vectors cover {count} passages, the bundle has {passages}")
        path = directory / data_file(dtype)
        itemsize = np.dtype(dtype).itemsize
        size = path.stat().st_size if path.is_file() else -1
        if size != tokens * dim * itemsize:
            raise TokenStoreError(
                f"{path}: {size} bytes, expected {tokens * dim * itemsize} ({tokens} tokens × {dim} × {itemsize}); "
                "the file is truncated or corrupt: rebuild the bundle"
            )
        try:
            offsets = np.load(directory / OFFSETS_FILE, mmap_mode="r")
            scales = np.load(directory / SCALES_FILE, mmap_mode="r") if dtype == "int8" else None
        except (OSError, ValueError) as exc:
            raise TokenStoreError(f"{directory}: unreadable token offsets or scales ({exc})") from exc
        if (
            offsets.shape != (count + 1,)
            or offsets.dtype != np.int64
            or offsets[0] != 0
            or offsets[-1] != tokens
            or bool(np.any(np.diff(offsets) < 0))
        ):
            raise TokenStoreError(
                f"{directory / OFFSETS_FILE}: offsets disagree with {count} passages, {tokens} tokens"
            )
        if scales is not None and scales.shape != (tokens,):
            raise TokenStoreError(f"{directory / SCALES_FILE}: {scales.shape[0]} scales for {tokens} token rows")
        data = (
            np.memmap(path, dtype=dtype, mode="r", shape=(tokens, dim)) if tokens else np.zeros((0, dim), dtype=dtype)
        )
        return cls(directory, meta, data, offsets, scales)

    @property
    def nbytes(self) -> int:
        """Bytes on disk: vectors, offsets and scales."""
        return sum(
            p.stat().st_size
            for p in (
                self.directory / data_file(self.dtype),
                self.directory / OFFSETS_FILE,
                self.directory / SCALES_FILE,
            )
            if p.is_file()
        )

    def vectors(self, row: int) -> np.ndarray:
        """Passage `row`'s token vectors as float32 (tokens × dimension)."""
        start, end = int(self.offsets[row]), int(self.offsets[row + 1])
        out = np.asarray(self.data[start:end], dtype=np.float32)
        if self.scales is not None:
            out *= np.asarray(self.scales[start:end], dtype=np.float32)[:, None]
        return out

    def maxsim(self, query: np.ndarray, rows: list[int]) -> np.ndarray:
        """MaxSim of unit-normalised query token vectors (q × dimension) against each passage in `rows`:
        the mean over query tokens of the best cosine among the passage's tokens."""
        query = np.asarray(query, dtype=np.float32)
        out = np.zeros(len(rows), dtype=np.float32)
        spans = [(i, int(self.offsets[r]), int(self.offsets[r + 1])) for i, r in enumerate(rows)]
        spans = [(i, start, end) for i, start, end in spans if end > start]  # an empty passage scores 0
        if not spans:
            return out
        # one matrix product over all candidates' tokens, then the best match per passage segment
        tokens = np.concatenate([self.data[start:end] for _, start, end in spans]).astype(np.float32)
        if self.scales is not None:
            tokens *= np.concatenate([self.scales[start:end] for _, start, end in spans]).astype(np.float32)[:, None]
        sims = query @ tokens.T
        bounds = np.cumsum([0] + [end - start for _, start, end in spans[:-1]])
        best = np.maximum.reduceat(sims, bounds, axis=1)
        out[[i for i, _, _ in spans]] = best.mean(axis=0)
        return out
