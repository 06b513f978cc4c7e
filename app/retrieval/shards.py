"""Fan-out over the shards of a sharded build (`indexer.shards`): one searcher, docstore and token store per
shard behind the same interfaces the pipeline uses for an unsharded bundle.

Invariants:
- A shard answers in its own rows; `offset + local row` is the global row, the same row the unsharded build
  gives that passage. Merging every shard's top k by (score desc, global row asc) is therefore exactly the
  unsharded top k, ties included (each shard's own top k already breaks ties by lower row).
- Shards are searched in parallel on a pool sized by the shard count; a shard that fails raises
  `ShardUnavailable` naming it, unless the request allows partial results (`partial_ok`), in which case its
  name is recorded in `ShardFanout.missing` of that call's `Partial` and the others' results are merged.
- Nothing here holds per-request state; a shard may be in this process or behind a Ray Serve handle
  (`app.serving_ray`), as long as it answers `search_many` / `search_vectors` in its own rows.
"""

from __future__ import annotations

import bisect
import contextvars
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from app.retrieval.protocols import BiEncoder, DenseRetriever, DocstoreReader, Retriever, TokenStoreReader, VectorIndex
from app.retrieval.types import Hit, StageScore

T = TypeVar("T")


class ShardUnavailable(RuntimeError):
    """A shard did not answer; `shard` names it (503, or partial results when the request allows them)."""

    def __init__(self, shard: str, reason: str) -> None:
        super().__init__(f"shard {shard} is unavailable: {reason}")
        self.shard = shard
        self.reason = reason


class Partial:
    """Which shards a request let go missing: set per request (a context variable), read by the response."""

    _current: contextvars.ContextVar[Partial | None] = contextvars.ContextVar("sift_partial", default=None)

    def __init__(self) -> None:
        self.missing: set[str] = set()
        self._lock = threading.Lock()

    def add(self, shard: str) -> None:
        with self._lock:
            self.missing.add(shard)

    @classmethod
    def current(cls) -> Partial | None:
        return cls._current.get()

    @classmethod
    def allow(cls) -> tuple[Partial, contextvars.Token[Partial | None]]:
        """Allow partial results in this context (the request's); returns the record and a reset token."""
        partial = cls()
        return partial, cls._current.set(partial)

    @classmethod
    def reset(cls, token: contextvars.Token[Partial | None]) -> None:
        cls._current.reset(token)


class ShardFanout:
    """Runs one call on every shard in parallel and gathers the answers in shard order."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(self.names)), thread_name_prefix="sift-shard")

    def map(self, call: Callable[[int], T]) -> list[T | None]:
        """`call(i)` for every shard i; a failed shard raises `ShardUnavailable`, or (when the current request
        allows partial results) gives None and is recorded as missing."""
        partial = Partial.current()
        context = contextvars.copy_context()
        futures = [self._pool.submit(context.copy().run, call, i) for i in range(len(self.names))]
        out: list[T | None] = []
        for name, future in zip(self.names, futures, strict=True):
            try:
                out.append(future.result())
            except ShardUnavailable as exc:
                if partial is None:
                    raise
                partial.add(exc.shard)
                out.append(None)
            except Exception as exc:  # noqa: BLE001 - any failure of a shard is that shard's unavailability
                if partial is None:
                    raise ShardUnavailable(name, f"{type(exc).__name__}: {exc}") from exc
                partial.add(name)
                out.append(None)
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def merge_hits(name: str, per_shard: Iterable[tuple[int, list[Hit] | None]], k: int) -> list[Hit]:
    """The top k of several shards' rankings (each in its own rows, shifted by its offset) by score, then
    lower global row; ranks renumbered for stage `name`."""
    pool = [(h.score, offset + h.idx, h) for offset, hits in per_shard if hits for h in hits]
    pool.sort(key=lambda item: (-item[0], item[1]))
    return [
        Hit(row, h.passage_id, h.doc_id, score, {name: StageScore(score, rank)})
        for rank, (score, row, h) in enumerate(pool[:k], start=1)
    ]


class _Sharded:
    """Rows of shard i start at `offsets[i]`; a mask over all rows is cut into each shard's part."""

    def __init__(self, name: str, offsets: Sequence[int], fanout: ShardFanout) -> None:
        self.name = name
        self.offsets = list(offsets)
        self.fanout = fanout

    def _slice(self, mask: np.ndarray | None, i: int) -> np.ndarray | None:
        if mask is None:
            return None
        end = self.offsets[i + 1] if i + 1 < len(self.offsets) else mask.shape[0]
        return mask[self.offsets[i] : end]

    def _merge(self, answers: list[list[list[Hit]] | None], n: int, k: int) -> list[list[Hit]]:
        return [
            merge_hits(
                self.name,
                ((offset, answer[q] if answer is not None else None) for offset, answer in zip(self.offsets, answers)),
                k,
            )
            for q in range(n)
        ]


class ShardedSearcher(_Sharded, Retriever):
    """One retriever over all shards: each shard's retriever of the same stage answers in its own rows,
    `merge_hits` merges."""

    def __init__(self, name: str, shards: Sequence[Retriever], offsets: Sequence[int], fanout: ShardFanout) -> None:
        super().__init__(name, offsets, fanout)
        self.shards = list(shards)

    def search(self, query: str, k: int, mask: np.ndarray | None = None) -> list[Hit]:
        return self.search_many([query], k, mask)[0]

    def search_many(self, queries: list[str], k: int, mask: np.ndarray | None = None) -> list[list[Hit]]:
        answers = self.fanout.map(lambda i: self.shards[i].search_many(queries, k, self._slice(mask, i)))
        return self._merge(answers, len(queries), k)


class ShardedDenseSearcher(_Sharded, DenseRetriever):
    """Dense over all shards: queries are encoded once here, by the build's bi-encoder (all shards share the
    bundle's model), and only vectors go to the shards' indexes."""

    def __init__(
        self, shards: Sequence[VectorIndex], offsets: Sequence[int], fanout: ShardFanout, encoder: BiEncoder
    ) -> None:
        super().__init__("dense", offsets, fanout)
        self.shards = list(shards)
        self.query_encoder = encoder  # in this process: only vectors go to the shards

    @property
    def encoder(self) -> Any:  # the SentenceTransformer behind the query encoder
        return self.query_encoder.encoder

    @property
    def runtime(self) -> str:
        return self.query_encoder.runtime

    def encode(self, queries: list[str]) -> np.ndarray:
        return self.query_encoder.encode(queries)

    def query_tokens(self, queries: list[str]) -> list[np.ndarray]:
        return self.query_encoder.query_tokens(queries)

    def token_vectors(self, texts: list[str]) -> list[np.ndarray]:
        return self.query_encoder.passage_tokens(texts)

    def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """Vectors for arbitrary texts and their token count (`/v1/embeddings`), by the same encoder as queries."""
        return self.query_encoder.embed(texts)

    def search_vectors(self, vectors: np.ndarray, k: int, mask: np.ndarray | None = None) -> list[list[Hit]]:
        answers = self.fanout.map(lambda i: self.shards[i].search_vectors(vectors, k, self._slice(mask, i)))
        return self._merge(answers, len(vectors), k)

    def search(self, query: str, k: int, mask: np.ndarray | None = None) -> list[Hit]:
        return self.search_many([query], k, mask)[0]

    def search_many(self, queries: list[str], k: int, mask: np.ndarray | None = None) -> list[list[Hit]]:
        return self.search_vectors(self.encode(queries), k, mask)


class ShardedDocstore(DocstoreReader):
    """The docstores of all shards as one: rows are global (offset + local row)."""

    def __init__(
        self, docstores: Sequence[DocstoreReader], offsets: Sequence[int], fanout: ShardFanout | None = None
    ) -> None:
        self.docstores = list(docstores)
        self.fanout = fanout  # closed with the docstores: both live as long as the build is served
        self.offsets = list(offsets)
        self.num_passages = sum(d.num_passages for d in self.docstores)
        self.num_documents = sum(d.num_documents for d in self.docstores)

    def _shard_of(self, row: int) -> int:
        return bisect.bisect_right(self.offsets, row) - 1

    def unavailable(self) -> list[str]:
        """Names of the shards that do not answer a ping now (shards in this process always answer)."""
        return [name for store in self.docstores for name in store.unavailable()]

    def passages(self, indices: Iterable[int]) -> dict[int, dict[str, Any]]:
        by_shard: dict[int, list[int]] = {}
        for row in indices:
            shard = self._shard_of(int(row))
            by_shard.setdefault(shard, []).append(int(row) - self.offsets[shard])
        out: dict[int, dict[str, Any]] = {}
        for shard, rows in by_shard.items():
            for local, item in self.docstores[shard].passages(rows).items():
                out[local + self.offsets[shard]] = {**item, "idx": local + self.offsets[shard]}
        return out

    def passages_by_id(self, passage_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        ids = list(dict.fromkeys(passage_ids))
        out: dict[str, dict[str, Any]] = {}
        for shard, store in enumerate(self.docstores):
            for pid, item in store.passages_by_id(ids).items():
                out[pid] = {**item, "idx": item["idx"] + self.offsets[shard]}
        return out

    def document(self, doc_id: str) -> dict[str, Any] | None:
        for shard, store in enumerate(self.docstores):
            document = store.document(doc_id)
            if document is not None:
                for passage in document.get("passages", []):
                    if "idx" in passage:
                        passage["idx"] += self.offsets[shard]
                return document
        return None

    def passage_rows(self) -> list[tuple[str, str]]:
        return [row for store in self.docstores for row in store.passage_rows()]

    def passage_texts(self) -> list[tuple[str, str, str]]:
        return [row for store in self.docstores for row in store.passage_texts()]

    def filter_mask(self, filters: dict[str, Any]) -> np.ndarray:
        return np.concatenate([store.filter_mask(filters) for store in self.docstores])

    def close(self) -> None:
        for store in self.docstores:
            store.close()
        if self.fanout is not None:
            self.fanout.close()


class ShardedTokenStore(TokenStoreReader):
    """The token stores of all shards as one (global rows), for MaxSim over a sharded build."""

    def __init__(self, stores: Sequence[TokenStoreReader], offsets: Sequence[int]) -> None:
        self.stores = list(stores)
        self.offsets = list(offsets)

    def maxsim(self, query: np.ndarray, rows: list[int]) -> np.ndarray:
        out = np.zeros(len(rows), dtype=np.float32)
        by_shard: dict[int, list[int]] = {}
        for position, row in enumerate(rows):
            by_shard.setdefault(bisect.bisect_right(self.offsets, row) - 1, []).append(position)
        for shard, positions in by_shard.items():
            local = [rows[p] - self.offsets[shard] for p in positions]
            out[positions] = self.stores[shard].maxsim(query, local)
        return out
