"""Late-interaction token vectors stored in a bundle, so that MaxSim at query time is a dot product, not an
encoder pass over every candidate.

A build that sets `index.dense.token_vectors` keeps, for every passage, the bi-encoder's per-token output
(the same forward pass that gives the pooled passage vector, so storing them costs no extra encoding):

    dense/tokens.json          {"format", "dtype", "dimension", "tokens", "passages"}
    dense/tokens.<dtype>.bin   all token vectors, row after row, passage after passage (raw, C order)
    dense/tokens.offsets.npy   int64 [passages + 1]: passage i owns rows offsets[i]:offsets[i+1]
    dense/tokens.scales.npy    float32 [tokens] (int8 only): row r is int8[r] * scales[r]
    dense/tokens.codebook.npy  float32 [m, 256, dimension / m] (pq only): product quantisation's centroids
    dense/tokens.rotation.npy  float32 [dimension, dimension] (pq with a rotation): OPQ's orthonormal rotation

`pq` stores each token as `m` one-byte codes (by default 32 bytes for 384 dimensions, against int8's 388 with
its scale): the token vector is rotated (optimised product quantisation: a learned orthonormal rotation that
balances the sub-spaces; faiss's `OPQMatrix`), cut into `m` sub-vectors, and each is replaced by the nearest of
256 k-means centroids of its sub-space (faiss's `ProductQuantizer`). MaxSim scores the codes as they are stored, by
asymmetric distance computation: each query token's inner products with every centroid are computed once
per query (`m × 256` per token) and a stored token's similarity is the sum of `m` table look-ups, so no
passage is decompressed. A fresh store trains its codebook at `close()` on a sample of its own tokens (spilled
as int8 until then, so memory stays bounded); an update or a reshard of a `pq` build keeps the parent's
codebook (`TokenForm.of`), so copied codes stay valid and copying them is a byte copy.

Invariants: every stored row is a unit-length token vector (quantisation aside), in the order the tokenizer
produced the tokens (special tokens included, padding excluded, truncated at the encoder's max length),
so `maxsim` over stored rows equals MaxSim over a fresh encoding of the same passage text. `TokenStore.open`
refuses files whose sizes, offsets or metadata disagree with each other or with the bundle's passage count.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from indexer.bundle import BundleInfo
    from indexer.config import DenseSettings

TokenDtype = Literal["float16", "int8", "pq"]
IntakeDtype = Literal["float16", "int8"]
DTYPES = ("float16", "int8", "pq")
META_FILE = "tokens.json"
OFFSETS_FILE = "tokens.offsets.npy"
SCALES_FILE = "tokens.scales.npy"
CODEBOOK_FILE = "tokens.codebook.npy"
ROTATION_FILE = "tokens.rotation.npy"
SPILL_FILE = "tokens.spill.int8"  # a pq writer's tokens until its codebook is trained (deleted at close)
FORMAT = 1
COPY_CHUNK = 8 << 20  # bytes read at once when copying stored token vectors
ENCODE_CHUNK = 1 << 16  # token rows quantised at once when a pq writer encodes its spill
CENTROIDS = 256  # per sub-space: one byte per code
PQ_SEED = 1234
OPQ_ITERATIONS = 20  # rotation updates while training OPQ
OPQ_TRAIN_POINTS = 65536  # tokens the rotation is learned on (the codebook's k-means uses the whole sample)
OPQ_SUBSAMPLE_SEED = 1234  # faiss's seed when OPQ subsamples a larger training set (`ProductQuantizer.opq_rows`)
# The recipe (a sample of 262,144 tokens, all of them in k-means; OPQ 20 iterations on 65,536) was chosen on
# SciFact train (opq32, seeds 1234 / 1 / 2): default second stage nDCG@10 0.7412 / 0.7412 / 0.7393, mean 0.7406,
# against 0.7400 / 0.7378 / 0.7429, mean 0.7402, with 65,536 tokens (faiss's cap of 256 a centroid) and OPQ 10 on
# 32,768 (int8: 0.7424). The codebook k-means finds moves that figure by ±0.002 either way.


def data_file(dtype: str) -> str:
    return f"tokens.{dtype}.bin"


def row_width(dtype: str, dimension: int, m: int | None) -> tuple[int, np.dtype]:
    """(items per stored token row, their numpy dtype): `dimension` values, or `m` one-byte codes for pq."""
    if dtype == "pq":
        return int(m or 0), np.dtype(np.uint8)
    return dimension, np.dtype(dtype)


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


class ProductQuantizer:
    """Product quantisation of unit token vectors: an optional orthonormal `rotation` (OPQ), then `m`
    sub-spaces of `dimension / m` values, 256 centroids each (trained and applied by faiss's `OPQMatrix` and
    `ProductQuantizer`; scored here with look-up tables). Inner products are kept by the rotation, so a query
    is rotated once and compared with the codes in the rotated space."""

    def __init__(self, codebook: np.ndarray, rotation: np.ndarray | None = None) -> None:
        codebook = np.ascontiguousarray(codebook, dtype=np.float32)
        if codebook.ndim != 3 or codebook.shape[1] != CENTROIDS or codebook.shape[0] < 1:
            raise TokenStoreError(f"a pq codebook is m × {CENTROIDS} × sub-dimension, not {codebook.shape}")
        self.codebook = codebook
        self.m, _, self.sub = (int(n) for n in codebook.shape)
        self.dimension = self.m * self.sub
        if rotation is not None:
            rotation = np.ascontiguousarray(rotation, dtype=np.float32)
            if rotation.shape != (self.dimension, self.dimension):
                raise TokenStoreError(f"a pq rotation is {self.dimension} × {self.dimension}, not {rotation.shape}")
        self.rotation = rotation
        self._faiss: Any = None
        self._column_offsets = (np.arange(self.m, dtype=np.int32) * CENTROIDS)[None, :]

    @classmethod
    def train(
        cls,
        sample: np.ndarray,
        m: int,
        rotate: bool | np.ndarray = True,
        overwrite: bool = False,
    ) -> ProductQuantizer:
        """Train on `sample` (tokens × dimension, float32, unit rows): with `rotate`, OPQ's rotation first,
        learned here (True), or the rotation given (an array: the caller learned it on `opq_rows` of the sample,
        which gives the same rotation). With fewer than 256 tokens, the sample's own sub-vectors are the
        centroids (exact for them; no rotation). `overwrite`: the caller's float32 sample may be rotated in place
        (no copy of it)."""
        import faiss

        sample = np.ascontiguousarray(sample, dtype=np.float32) if overwrite else np.array(sample, dtype=np.float32)
        n, dimension = sample.shape
        if m < 1 or dimension % m:
            raise ValueError(f"token_pq_m must divide the token dimension {dimension}, not {m}")
        sub = dimension // m
        if n < CENTROIDS:
            codebook = np.zeros((m, CENTROIDS, sub), dtype=np.float32)
            codebook[:, :n] = sample.reshape(n, m, sub).transpose(1, 0, 2)
            return cls(codebook)
        rotation = rotate if isinstance(rotate, np.ndarray) else cls.learn_rotation(sample, m) if rotate else None
        if rotation is not None:
            for start in range(0, n, ENCODE_CHUNK):  # rotated in place: no second copy of the sample
                sample[start : start + ENCODE_CHUNK] = sample[start : start + ENCODE_CHUNK] @ rotation.T
        pq = faiss.ProductQuantizer(dimension, m, 8)
        pq.cp.seed = PQ_SEED
        pq.cp.min_points_per_centroid = 1  # small corpora train on what they have, without faiss's warning
        pq.cp.max_points_per_centroid = -(-n // CENTROIDS)  # k-means sees the whole sample (faiss: 256 a centroid)
        pq.verbose = False
        pq.train(sample)
        return cls(faiss.vector_to_array(pq.centroids).reshape(m, CENTROIDS, sub), rotation)

    @staticmethod
    def opq_rows(n: int) -> np.ndarray:
        """The rows of an `n`-token training sample OPQ learns its rotation on: all of them up to
        `OPQ_TRAIN_POINTS`, else faiss's own subsample (`rand_perm(n, 1234)`'s first rows, in that order). A
        caller that reads only these rows and passes them to `learn_rotation` gets the rotation `train` would
        learn on the whole sample, without the whole sample and OPQ's working set in memory at once."""
        import faiss

        if n <= OPQ_TRAIN_POINTS:
            return np.arange(n, dtype=np.int64)
        perm = np.empty(n, dtype=np.int32)  # faiss's rand_perm fills an int array
        faiss.rand_perm(faiss.swig_ptr(perm), n, OPQ_SUBSAMPLE_SEED)  # type: ignore[attr-defined]
        return perm[:OPQ_TRAIN_POINTS].astype(np.int64)

    @staticmethod
    def learn_rotation(sample: np.ndarray, m: int) -> np.ndarray:
        """OPQ's orthonormal rotation (dimension × dimension) for `m` sub-spaces, learned on `sample` (faiss
        subsamples more than `OPQ_TRAIN_POINTS` rows itself: see `opq_rows`)."""
        import faiss

        sample = np.ascontiguousarray(sample, dtype=np.float32)
        dimension = int(sample.shape[1])
        opq = faiss.OPQMatrix(dimension, m)
        opq.verbose = False
        opq.niter = OPQ_ITERATIONS
        opq.max_train_points = OPQ_TRAIN_POINTS
        inner = faiss.ProductQuantizer(dimension, m, 8)  # OPQ's own, told not to warn on small corpora
        inner.cp.min_points_per_centroid = 1
        inner.cp.seed = PQ_SEED
        opq.pq = inner
        opq.train(sample)
        rotation: np.ndarray = faiss.vector_to_array(opq.A).reshape(dimension, dimension)
        return rotation

    def _rotated(self, vectors: np.ndarray) -> np.ndarray:
        vectors = np.asarray(vectors, dtype=np.float32)
        return np.ascontiguousarray(vectors @ self.rotation.T) if self.rotation is not None else vectors

    def _quantizer(self) -> Any:
        if self._faiss is None:
            import faiss

            pq = faiss.ProductQuantizer(self.dimension, self.m, 8)
            faiss.copy_array_to_vector(self.codebook.ravel(), pq.centroids)
            self._faiss = pq
        return self._faiss

    def encode(self, vectors: np.ndarray) -> np.ndarray:
        """Codes (tokens × m, uint8) of float token rows: the nearest centroid of each sub-vector."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape[0] == 0:
            return np.zeros((0, self.m), dtype=np.uint8)
        if vectors.shape[1] != self.dimension:
            raise TokenStoreError(f"token vectors of dimension {vectors.shape[1]}, expected {self.dimension}")
        codes: np.ndarray = self._quantizer().compute_codes(self._rotated(vectors))
        return codes.reshape(-1, self.m)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """The float32 token rows `codes` stand for (tokens × dimension)."""
        codes = np.asarray(codes, dtype=np.intp)
        out: np.ndarray = self.codebook[np.arange(self.m), codes].reshape(len(codes), self.dimension)
        return out @ self.rotation if self.rotation is not None else out

    def tables(self, query: np.ndarray) -> np.ndarray:
        """Inner products of each query token with every centroid, sub-space by sub-space: (m · 256) × q, row
        `j · 256 + c` for centroid `c` of sub-space `j`."""
        query = self._rotated(query)
        q = query.shape[0]
        parts = query.reshape(q, self.m, self.sub).transpose(1, 2, 0)  # m × sub × q
        return np.ascontiguousarray(np.matmul(self.codebook, parts).reshape(self.m * CENTROIDS, q))

    def inner_products(self, tables: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """Inner products (tokens × q) of the tokens `codes` stand for with the query of `tables`, by look-up
        (asymmetric distance computation): the sum over sub-spaces of the code's row of that sub-space's table,
        done as one sparse product (each token a row with a one in each sub-space's column of its code)."""
        import scipy.sparse as sp

        n = codes.shape[0]
        columns = (np.asarray(codes, dtype=np.int32) + self._column_offsets).ravel()
        rows = np.arange(0, n * self.m + 1, self.m, dtype=np.int32)
        picks = sp.csr_matrix((np.ones(n * self.m, dtype=np.float32), columns, rows), shape=(n, self.m * CENTROIDS))
        out: np.ndarray = np.asarray(picks @ tables, dtype=np.float32)
        return out

    def same(self, other: ProductQuantizer | None) -> bool:
        """The same codebook and rotation (codes of one are codes of the other)."""
        if other is self:
            return True
        if other is None or not np.array_equal(self.codebook, other.codebook):
            return False
        if self.rotation is None or other.rotation is None:
            return self.rotation is None and other.rotation is None
        return np.array_equal(self.rotation, other.rotation)


@dataclass(frozen=True)
class TokenForm:
    """How a build stores token vectors: `dtype`, and for pq the sub-space count `m`, whether an OPQ rotation
    is learned (`rotate`), the tokens its codebook trains on (`sample`) and a `codebook` to keep instead (an
    update or reshard of a pq build)."""

    dtype: TokenDtype
    m: int = 32
    sample: int = 262144
    rotate: bool = True
    codebook: ProductQuantizer | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"token vector dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")

    @classmethod
    def planned(cls, dense: DenseSettings, parent: TokenStore | None = None) -> TokenForm | None:
        """The form a build writes for its `index.dense` settings (`token_vectors` None or dense disabled: no
        token vectors; `token_pq_m`, `token_pq_sample`, `token_pq_rotate`): a pq parent's codebook is kept when
        it has the configured `m` and rotation (an update's copied codes stay valid)."""
        dtype, m, rotate = dense.token_vectors, dense.token_pq_m, dense.token_pq_rotate
        if dtype is None or not dense.enabled:
            return None
        pq = parent.pq if parent is not None else None
        if dtype == "pq" and pq is not None and pq.m == m and (pq.rotation is not None) == rotate:
            return cls("pq", m, dense.token_pq_sample, rotate, pq)
        return cls(dtype, m, dense.token_pq_sample, rotate)

    @classmethod
    def of(cls, store: TokenStore) -> TokenForm:
        """The form of an existing store (its codebook kept)."""
        if store.pq is not None:
            return cls("pq", store.pq.m, rotate=store.pq.rotation is not None, codebook=store.pq)
        return cls(store.dtype)

    @property
    def intake(self) -> IntakeDtype:
        """The stored form an encoding engine's workers hand in (`add_quantized`): pq takes int8 rows."""
        return "int8" if self.dtype == "pq" else self.dtype


class TokenSink(Protocol):
    """Where an encoder appends each passage's float token vectors, in passage order (`add`: stored
    unit-normalised in the sink's dtype)."""

    def add(self, vectors: np.ndarray) -> None: ...


class BuildTokens(TokenSink, Protocol):
    """Where a build writes its token vectors, passage after passage: a `TokenWriter`, or a sharded build's
    router to its shards' writers (`indexer.shards`). An encoding engine appends new passages (`add`, or
    `add_quantized` in the `intake` form when its workers quantised them already); the build pipeline copies
    kept ones from the parent build's store (`add_stored`)."""

    form: TokenForm

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
    manager, or call `close()`; `add_stored` copies rows from a store of the same form as stored (bytes, not
    re-quantised), and converts rows of a store of another form (decoded, then stored in this one's).

    A pq writer without a codebook (`form.codebook`) spills every token as int8 to `tokens.spill.int8` and, at
    `close()`, trains the codebook on `form.sample` tokens spread evenly over the spill and encodes the spill in
    chunks of `ENCODE_CHUNK` rows: memory stays bounded whatever the corpus size."""

    def __init__(self, directory: Path, form: TokenForm | TokenDtype, dimension: int | None = None) -> None:
        self.form = form if isinstance(form, TokenForm) else TokenForm(form)
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.dimension = dimension
        self.pq = self.form.codebook
        if self.pq is not None:
            self._check_dimension(self.pq.dimension)
        self._spilling = self.form.dtype == "pq" and self.pq is None
        target = SPILL_FILE if self._spilling else data_file(self.form.dtype)
        self._data = open(self.directory / target, "wb")  # noqa: SIM115 - closed in close()
        self._lengths: list[int] = []
        self._scales: list[np.ndarray] = []  # int8 rows' (and a pq spill's) scales

    @property
    def dtype(self) -> TokenDtype:
        return self.form.dtype

    def _check_dimension(self, dimension: int) -> None:
        if self.dimension is None:
            if self.form.dtype == "pq" and dimension % self.form.m:
                raise TokenStoreError(
                    f"index.dense.token_pq_m ({self.form.m}) must divide the token dimension ({dimension})"
                )
            self.dimension = dimension
        elif dimension != self.dimension:
            raise TokenStoreError(f"token vectors of dimension {dimension}, expected {self.dimension}")

    def add(self, vectors: np.ndarray) -> None:
        """One passage: float (tokens × dimension); stored unit-normalised in the store's form."""
        if self.form.dtype == "pq" and not self._spilling:
            assert self.pq is not None
            self._check_dimension(int(vectors.shape[1]))
            self._write(self.pq.encode(unit_tokens(vectors)), None)
        else:
            self.add_quantized(*stored_form(vectors, self.form.intake))

    def add_quantized(self, rows: np.ndarray, scales: np.ndarray | None) -> None:
        """One passage already in the `form.intake` form (as `stored_form` gives it: unit-normalised, int8 with
        per-token scales or float16), e.g. from a Ray encoder actor."""
        self._check_dimension(int(rows.shape[1]))
        intake = self.form.intake
        if rows.dtype != np.dtype(intake) or (intake == "int8") != (scales is not None):
            raise TokenStoreError(f"{rows.dtype} token rows cannot go into a {self.form.dtype} store")
        if scales is not None and scales.shape != (rows.shape[0],):
            raise TokenStoreError(f"{scales.shape[0]} scales for {rows.shape[0]} token rows")
        if self.form.dtype == "pq" and not self._spilling:
            assert self.pq is not None and scales is not None
            self._write(self.pq.encode(rows.astype(np.float32) * scales[:, None]), None)
        else:
            self._write(rows, scales)

    def _write(self, rows: np.ndarray, scales: np.ndarray | None) -> None:
        if scales is not None:
            self._scales.append(np.asarray(scales, dtype=np.float32))
        self._data.write(np.ascontiguousarray(rows).tobytes())
        self._lengths.append(int(rows.shape[0]))

    def add_stored(self, store: TokenStore, rows: Sequence[int]) -> None:
        """Passages `rows` of another store. Same form (dtype, and for pq the same codebook; or int8 into a pq
        writer's int8 spill, so a converted build trains the codebook a fresh build would): copied as stored,
        read from the store's file (runs of consecutive passages at once, in bounded chunks), not through its
        memory map, so copying a large store (an update, a reshard) does not make the whole of it resident in
        this process. Another form: each passage decoded to float and added (a conversion; no model runs)."""
        self._check_dimension(store.dimension)
        picked = np.asarray(rows, dtype=np.int64)
        if picked.size == 0:
            return
        if self._spilling:  # a fresh pq writer's spill is int8 rows and scales: an int8 store's are copied
            copy = store.dtype == "int8"
        else:
            copy = store.dtype == self.form.dtype and (
                store.dtype != "pq" or (store.pq is not None and store.pq.same(self.pq))
            )
        if not copy:
            for row in picked.tolist():
                self.add(store.vectors(row))
            return
        starts = np.asarray(store.offsets[picked], dtype=np.int64)
        ends = np.asarray(store.offsets[picked + 1], dtype=np.int64)
        self._lengths.extend((ends - starts).tolist())
        row_bytes = store.row_bytes
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

    @property
    def spilled_tokens(self) -> int:
        """Tokens in a fresh pq writer's spill so far."""
        return int(sum(self._lengths))

    def spill_rows(self, which: np.ndarray, out: np.ndarray | None = None, at: np.ndarray | None = None) -> np.ndarray:
        """Spilled token rows `which` (any order) as float32, written into rows `at` of `out` when given (default:
        a new which.size × dimension array, filled in order), so a caller gathering a sample from several spills
        never holds it twice: the spill read once, in order, a chunk at a time (one read per chunk, not one per
        row, never memory-mapped, so it never becomes resident), each chunk's picked rows scaled into place."""
        if not self._spilling:
            raise TokenStoreError("only a fresh pq writer's spilled tokens can be read back")
        if not self._data.closed:
            self._data.flush()
        dimension, tokens = int(self.dimension or 0), self.spilled_tokens
        scales = np.concatenate(self._scales) if self._scales else np.zeros(0, dtype=np.float32)
        if out is None:
            out = np.empty((which.size, dimension), dtype=np.float32)
        rows = which.size if at is None else len(out)  # `at` picks rows of a larger `out`
        if out.shape != (rows, dimension) or out.dtype != np.float32 or (at is not None and at.shape != which.shape):
            raise ValueError(f"spill_rows: out must be float32 {(rows, dimension)}, not {out.dtype} {out.shape}")
        at = np.arange(which.size) if at is None else at
        order = np.argsort(which, kind="stable")
        ordered = which[order]
        spill_path = self.directory / SPILL_FILE
        with open(spill_path, "rb") as spill:
            for start in range(0, tokens, ENCODE_CHUNK):
                end = min(start + ENCODE_CHUNK, tokens)
                lo, hi = (int(i) for i in np.searchsorted(ordered, [start, end]))
                if lo == hi:
                    continue
                data = os.pread(spill.fileno(), (end - start) * dimension, start * dimension)
                if len(data) != (end - start) * dimension:
                    raise TokenStoreError(f"{spill_path}: ends before token row {end}")
                chunk = np.frombuffer(data, dtype=np.int8).reshape(end - start, dimension)
                picked = ordered[lo:hi]
                out[at[order[lo:hi]]] = chunk[picked - start] * scales[picked, None]
        return out

    def _encode_spill(self, tokens: int, codebook: ProductQuantizer | None) -> None:
        """Write the codes of the spilled int8 tokens chunk by chunk, with `codebook`, or one trained on a sample
        of this spill (`train_on_spills`). The spill is read with `os.pread`, so it never becomes resident."""
        dimension, m = int(self.dimension or 0), self.form.m
        spill_path = self.directory / SPILL_FILE
        scales = np.concatenate(self._scales) if self._scales else np.zeros(0, dtype=np.float32)
        if tokens == 0:
            self.pq = codebook or ProductQuantizer(np.zeros((m, CENTROIDS, max(dimension // m, 1)), dtype=np.float32))
            self._scales = []
            (self.directory / data_file("pq")).write_bytes(b"")
            spill_path.unlink()
            return
        self.pq = codebook or train_on_spills([self], self.form)
        self._scales = []
        with open(spill_path, "rb") as spill, open(self.directory / data_file("pq"), "wb") as out:
            for start in range(0, tokens, ENCODE_CHUNK):
                end = min(start + ENCODE_CHUNK, tokens)
                data = os.pread(spill.fileno(), (end - start) * dimension, start * dimension)
                if len(data) != (end - start) * dimension:
                    raise TokenStoreError(f"{spill_path}: ends before token row {end}")
                rows = np.frombuffer(data, dtype=np.int8).reshape(end - start, dimension) * scales[start:end, None]
                out.write(self.pq.encode(rows).tobytes())
        spill_path.unlink()

    def close(self, codebook: ProductQuantizer | None = None) -> dict[str, object]:
        """Finish the files; returns the metadata (also written to tokens.json). A fresh pq writer encodes its
        spill with `codebook` when given (trained over several writers' spills by `train_on_spills`: a sharded
        build's one codebook), else with one trained on its own."""
        self._data.close()
        offsets = np.zeros(len(self._lengths) + 1, dtype=np.int64)
        np.cumsum(self._lengths, out=offsets[1:])
        if self._spilling:
            self._encode_spill(int(offsets[-1]), codebook)
            self._spilling = False
        np.save(self.directory / OFFSETS_FILE, offsets)
        if self.form.dtype == "int8":
            scales = np.concatenate(self._scales) if self._scales else np.zeros(0, dtype=np.float32)
            np.save(self.directory / SCALES_FILE, scales.astype(np.float32))
        meta: dict[str, object] = {
            "format": FORMAT,
            "dtype": self.form.dtype,
            "dimension": int(self.dimension or 0),
            "tokens": int(offsets[-1]),
            "passages": len(self._lengths),
        }
        if self.form.dtype == "pq":
            assert self.pq is not None
            np.save(self.directory / CODEBOOK_FILE, self.pq.codebook)
            if self.pq.rotation is not None:
                np.save(self.directory / ROTATION_FILE, self.pq.rotation)
            rotation = "opq" if self.pq.rotation is not None else None
            meta["pq"] = {"m": self.pq.m, "centroids": CENTROIDS, "rotation": rotation, "bytes_per_token": self.pq.m}
        (self.directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return meta

    def __enter__(self) -> TokenWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._data.closed:
            self._data.close()


def train_on_spills(writers: Sequence[TokenWriter], form: TokenForm) -> ProductQuantizer:
    """One codebook for the tokens spilled by `writers` (fresh pq writers of one form), as if their spills were
    one, in order: `form.sample` tokens spread evenly over the whole (OPQ's rotation first, on its own rows of
    that sample, then k-means on all of it). With one writer it is that writer's own codebook; a sharded build
    trains over its shards' writers in shard order and gets the codebook the unsharded build of the same
    corpus gets (the same tokens picked, in the same order)."""
    sizes = np.array([w.spilled_tokens for w in writers], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    total = int(starts[-1])
    dimension = int(next((w.dimension for w in writers if w.dimension), 0))

    def gather(which: np.ndarray) -> np.ndarray:
        """The rows `which` of the writers' spills as one, each writer's read straight into its rows of the
        result (the sample is held once)."""
        out = np.empty((which.size, dimension), dtype=np.float32)
        for writer, lo, hi in zip(writers, starts[:-1], starts[1:], strict=True):
            at = np.flatnonzero((which >= lo) & (which < hi))
            if at.size:
                writer.spill_rows(which[at] - lo, out, at)
        return out

    picks = np.unique(np.linspace(0, total - 1, min(form.sample, total)).astype(np.int64))
    rotate: bool | np.ndarray = form.rotate
    if form.rotate and picks.size >= CENTROIDS:  # OPQ first, on its own rows: one working set at a time
        rotate = ProductQuantizer.learn_rotation(gather(picks[ProductQuantizer.opq_rows(picks.size)]), form.m)
    return ProductQuantizer.train(gather(picks), form.m, rotate, overwrite=True)


class TokenStore(TokenStoreReader):
    """Read-only, memory-mapped token vectors of one bundle (see the module docstring)."""

    def __init__(
        self,
        directory: Path,
        meta: dict[str, Any],
        data: np.ndarray,
        offsets: np.ndarray,
        scales: np.ndarray | None,
        pq: ProductQuantizer | None = None,
    ) -> None:
        if meta["dtype"] not in DTYPES:
            raise TokenStoreError(f"token vector dtype must be one of {', '.join(DTYPES)}, not {meta['dtype']!r}")
        self.directory = directory
        self.meta = meta
        self.dtype: TokenDtype = meta["dtype"]
        self.dimension: int = int(meta["dimension"])
        self.data = data
        self.offsets = offsets
        self.scales = scales
        self.pq = pq

    @classmethod
    def of_bundle(cls, info: BundleInfo, passages: int | None = None) -> TokenStore:
        """A bundle's token store, checked against its manifest: the form `dense.token_vectors` records and
        `passages` rows (default: the manifest's passage count; serving passes its docstore's)."""
        count = passages if passages is not None else int(info.manifest["counts"]["passages"])
        return cls.open(info.path("dense"), count, (info.manifest.get("dense") or {}).get("token_vectors"))

    @staticmethod
    def exists(directory: Path) -> bool:
        return (Path(directory) / META_FILE).is_file()

    @property
    def row_bytes(self) -> int:
        """Bytes of one stored token row in the data file."""
        width, dtype = row_width(self.dtype, self.dimension, self.pq.m if self.pq else None)
        return width * dtype.itemsize

    @classmethod
    def open(cls, directory: Path, passages: int | None = None, expect: dict[str, Any] | None = None) -> TokenStore:
        """Open and check the store in `directory` (a bundle's dense folder) for a bundle of `passages`; with
        `expect` (the manifest's `dense.token_vectors`), its form must be the one the manifest records."""
        directory = Path(directory)
        try:
            meta = json.loads((directory / META_FILE).read_text())
            dtype, dim, tokens, count = (
                meta["dtype"],
                int(meta["dimension"]),
                int(meta["tokens"]),
                int(meta["passages"]),
            )
            m = int(meta["pq"]["m"]) if dtype == "pq" else None
            rotated = dtype == "pq" and meta["pq"].get("rotation") == "opq"
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise TokenStoreError(f"{directory / META_FILE}: unreadable token-vector metadata ({exc})") from exc
        if meta.get("format") != FORMAT or dtype not in DTYPES or dim <= 0 or (m is not None and (m <= 0 or dim % m)):
            raise TokenStoreError(f"{directory / META_FILE}: unsupported token-vector format {meta}")
        if expect is not None and any(meta.get(key) != expect.get(key) for key in ("dtype", "dimension", "pq")):
            raise TokenStoreError(
                f"{directory / META_FILE}: token vectors stored as {meta.get('dtype')} {meta.get('pq') or ''}, but "
                f"the manifest records {expect.get('dtype')} {expect.get('pq') or ''}: the bundle is inconsistent, "
                "rebuild it"
            )
        if passages is not None and count != passages:
            raise TokenStoreError(f"token vectors cover {count} passages, the bundle has {passages}")
        path = directory / data_file(dtype)
        width, item = row_width(dtype, dim, m)
        size = path.stat().st_size if path.is_file() else -1
        if size != tokens * width * item.itemsize:
            raise TokenStoreError(
                f"{path}: {size} bytes, expected {tokens * width * item.itemsize} ({tokens} tokens × {width} × "
                f"{item.itemsize}); the file is truncated or corrupt: rebuild the bundle"
            )
        pq = None
        try:
            offsets = np.load(directory / OFFSETS_FILE, mmap_mode="r")
            scales = np.load(directory / SCALES_FILE, mmap_mode="r") if dtype == "int8" else None
            if m is not None:
                rotation = np.load(directory / ROTATION_FILE) if rotated else None
                pq = ProductQuantizer(np.load(directory / CODEBOOK_FILE), rotation)
        except (OSError, ValueError) as exc:
            raise TokenStoreError(f"{directory}: unreadable token offsets, scales or codebook ({exc})") from exc
        if pq is not None and (pq.m != m or pq.dimension != dim or not np.isfinite(pq.codebook).all()):
            raise TokenStoreError(
                f"{directory / CODEBOOK_FILE}: a codebook of {pq.m} × {pq.sub}, expected {m} × {dim // (m or 1)}"
            )
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
            np.memmap(path, dtype=item, mode="r", shape=(tokens, width)) if tokens else np.zeros((0, width), dtype=item)
        )
        return cls(directory, meta, data, offsets, scales, pq)

    @property
    def nbytes(self) -> int:
        """Bytes on disk: vectors (or codes), offsets, scales and codebook."""
        return sum(
            p.stat().st_size
            for p in (
                self.directory / data_file(self.dtype),
                self.directory / OFFSETS_FILE,
                self.directory / SCALES_FILE,
                self.directory / CODEBOOK_FILE,
                self.directory / ROTATION_FILE,
            )
            if p.is_file()
        )

    def vectors(self, row: int) -> np.ndarray:
        """Passage `row`'s token vectors as float32 (tokens × dimension); pq codes decoded."""
        start, end = int(self.offsets[row]), int(self.offsets[row + 1])
        if self.pq is not None:
            return self.pq.decode(self.data[start:end])
        out = np.asarray(self.data[start:end], dtype=np.float32)
        if self.scales is not None:
            out *= np.asarray(self.scales[start:end], dtype=np.float32)[:, None]
        return out

    def maxsim(self, query: np.ndarray, rows: list[int]) -> np.ndarray:
        """MaxSim of unit-normalised query token vectors (q × dimension) against each passage in `rows`:
        the mean over query tokens of the best cosine among the passage's tokens (pq: by table look-up, the
        codes never decoded)."""
        query = np.asarray(query, dtype=np.float32)
        out = np.zeros(len(rows), dtype=np.float32)
        spans = [(i, int(self.offsets[r]), int(self.offsets[r + 1])) for i, r in enumerate(rows)]
        spans = [(i, start, end) for i, start, end in spans if end > start]  # an empty passage scores 0
        if not spans:
            return out
        stored = np.concatenate([self.data[start:end] for _, start, end in spans])
        if self.pq is not None:  # tokens × q, from the codes
            sims = self.pq.inner_products(self.pq.tables(query), stored)
        else:  # one matrix product over all candidates' tokens
            tokens = stored.astype(np.float32)
            if self.scales is not None:
                tokens *= np.concatenate([self.scales[start:end] for _, start, end in spans]).astype(np.float32)[
                    :, None
                ]
            sims = tokens @ query.T
        # then the best match per passage segment (rows: the candidates' tokens, one run per passage)
        bounds = np.cumsum([0] + [end - start for _, start, end in spans[:-1]])
        best = np.maximum.reduceat(sims, bounds, axis=0)
        out[[i for i, _, _ in spans]] = best.mean(axis=1)
        return out
