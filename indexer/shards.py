"""Sharded bundles: one published build holding S shard bundles and the shard map.

Layout (one build id, published atomically like any build)::

    <out>/<build-id>/manifest.json          counts, config, dense info, `shards` (the shard map), checksums
    <out>/<build-id>/shard-000/             a complete bundle: manifest.json, docstore.sqlite, bm25/, dense/
    <out>/<build-id>/shard-001/ ...

Invariants:
- Shards are contiguous ranges of documents (a document is never split) in the unsharded row order, balanced
  by passage count: global row = shard offset + local row, so merging shard rankings by (score desc, global
  row asc) gives exactly the unsharded order, ties included.
- BM25 uses corpus-wide statistics: document frequencies, the document count and the average length are
  reduced over all shards (`BM25Stats.merge`) before any shard is scored, so a passage's BM25 score in its
  shard equals its score in the unsharded index up to float32 rounding (≤ 1e-6 measured on the example corpus;
  tests/test_shards.py checks ≤ 1e-5, and SciFact over HTTP within 1e-4).
- Dense vectors are the same float32 rows as the unsharded build; each shard has the configured FAISS index.
- Each shard opens on its own (`open_bundle(<build>/shard-000)`), so one server or Ray Serve replica can hold
  one shard; the shard's manifest names its place (`shard`: index, count, offset, parent build).
- Writes stream (`ShardWriter`): the plan is made from every document's passage count (a counting pass),
  then documents go to their shard as the build pipeline (indexer/pipeline.py) produces them; a build, an
  update's corpus and a reshard all write shards this way, and the same corpus gives the same shard files.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bm25s
import numpy as np
import scipy.sparse as sp
from bm25s.scoring import (
    _build_idf_array,
    _build_nonoccurrence_array,
    _build_scores_and_indices_for_matrix,
    _select_idf_scorer,
    _select_tfc_scorer,
)
from tqdm.auto import tqdm

from indexer.bm25 import tokenize
from indexer.bundle import BM25_DIR, DENSE_DIR, DOCSTORE, seal_folder
from indexer.config import BM25Settings, IndexConfig
from indexer.dense import save_dense
from indexer.docstore import DocstoreWriter
from indexer.models import Document, Passage
from indexer.tokens import BuildTokens, ProductQuantizer, TokenForm, TokenStore, TokenWriter, train_on_spills

log = logging.getLogger(__name__)

MAX_SHARDS = 256


def shard_name(index: int) -> str:
    return f"shard-{index:03d}"


@dataclass(frozen=True)
class BM25Stats:
    """The corpus statistics BM25 needs, for a part of the corpus or (merged) the whole of it."""

    documents: int
    tokens: int
    doc_freqs: dict[str, int]

    @classmethod
    def of(cls, token_lists: Iterable[Sequence[str]]) -> BM25Stats:
        """Statistics of one part (a shard, or the passages one worker tokenised)."""
        freqs: Counter[str] = Counter()
        documents = tokens = 0
        for passage in token_lists:
            documents += 1
            tokens += len(passage)
            freqs.update(set(passage))
        return cls(documents, tokens, dict(freqs))

    @classmethod
    def merge(cls, parts: Iterable[BM25Stats]) -> BM25Stats:
        """The whole corpus's statistics from its parts (a reduce: order does not matter)."""
        freqs: Counter[str] = Counter()
        documents = tokens = 0
        for part in parts:
            documents += part.documents
            tokens += part.tokens
            freqs.update(part.doc_freqs)
        return cls(documents, tokens, dict(freqs))

    @property
    def avg_length(self) -> float:
        return self.tokens / self.documents if self.documents else 0.0

    def vocabulary(self) -> dict[str, int]:
        """Token → column, sorted by token (the same for every shard, whatever order the parts came in)."""
        return {token: i for i, token in enumerate(sorted(self.doc_freqs))}


class CorpusBM25:
    """Scores shards of a corpus with the corpus-wide statistics (see the module docstring)."""

    def __init__(self, stats: BM25Stats, settings: BM25Settings) -> None:
        self.stats = stats
        self.settings = settings
        self.vocab = stats.vocabulary()
        model = bm25s.BM25(method=settings.method, k1=settings.k1, b=settings.b)  # for its scoring parameters
        df_by_id = {self.vocab[t]: df for t, df in stats.doc_freqs.items()}
        self.idf = _build_idf_array(df_by_id, stats.documents, _select_idf_scorer(model.idf_method), model.dtype)
        self.nonoccurrence = (
            _build_nonoccurrence_array(
                doc_frequencies=df_by_id,
                n_docs=stats.documents,
                compute_idf_fn=_select_idf_scorer(model.idf_method),
                calculate_tfc_fn=_select_tfc_scorer(model.method),
                l_d=stats.avg_length,
                l_avg=stats.avg_length,
                k1=model.k1,
                b=model.b,
                delta=model.delta,
                dtype=model.dtype,
            )
            if model.method in model.methods_requiring_nonoccurrence
            else None
        )

    def shard_model(self, token_lists: Sequence[Sequence[str]]) -> bm25s.BM25:
        """A bm25s model over one shard's passages (rows in shard order), scored with corpus-wide statistics."""
        ids = [[self.vocab[t] for t in passage] for passage in token_lists]
        return self.shard_model_ids(ids, len(ids), sum(len(set(passage)) for passage in ids))

    def shard_model_ids(self, ids: Iterable[Sequence[int]], passages: int, pairs: int) -> bm25s.BM25:
        """`shard_model` over `passages` passages given as columns of the corpus vocabulary, in row order
        (`pairs`: their distinct (passage, token) pairs, which only size bm25s's scratch arrays)."""
        model = bm25s.BM25(method=self.settings.method, k1=self.settings.k1, b=self.settings.b)
        scores, doc_idx, vocab_idx = _build_scores_and_indices_for_matrix(
            corpus_token_ids=ids,
            idf_array=self.idf,
            avg_doc_len=self.stats.avg_length,
            doc_frequencies={0: pairs},
            k1=model.k1,
            b=model.b,
            delta=model.delta,
            nonoccurrence_array=self.nonoccurrence,
            method=model.method,
            dtype=model.dtype,
            int_dtype=model.int_dtype,
            show_progress=False,
        )
        matrix = sp.csc_matrix((scores, (doc_idx, vocab_idx)), shape=(passages, len(self.vocab)), dtype=model.dtype)
        model.scores = {
            "data": matrix.data,
            "indices": matrix.indices,
            "indptr": matrix.indptr,
            "num_docs": passages,
        }
        model.vocab_dict = dict(self.vocab)
        model.nonoccurrence_array = self.nonoccurrence
        return model


def plan_shards(doc_sizes: Sequence[int] | np.ndarray, shards: int) -> list[tuple[int, int]]:
    """Contiguous document ranges [start, end) for `shards` shards, balanced by passage count (`doc_sizes`:
    passages per document, in row order). Every shard gets at least one document."""
    if not 1 <= shards <= MAX_SHARDS:
        raise ValueError(f"--shards must be between 1 and {MAX_SHARDS}, not {shards}")
    if shards > len(doc_sizes):
        raise ValueError(f"--shards {shards} is more than the {len(doc_sizes)} documents; use fewer shards")
    cumulative = np.cumsum(doc_sizes)
    total = int(cumulative[-1])
    cuts = [0]
    for i in range(1, shards):
        target = total * i / shards
        above = int(np.searchsorted(cumulative, target, side="left"))  # first document reaching the target
        below = cumulative[above - 1] if above > 0 else 0
        cut = above + 1 if cumulative[above] - target <= target - below else above  # the nearer boundary
        cut = min(max(cut, cuts[-1] + 1), len(doc_sizes) - (shards - i))  # keep ≥ 1 document per shard
        cuts.append(cut)
    cuts.append(len(doc_sizes))
    return list(zip(cuts[:-1], cuts[1:], strict=True))


class ShardWriter:
    """Writes a corpus into `shards` shard bundles under `root` as it streams past, in row order.

    The plan (`plan_shards` over `doc_sizes`, the passages of every document: a first, cheap counting pass) is
    fixed up front. Then each block of documents goes to its shard's docstore as it arrives (`add`), its
    vectors to that shard, and its token vectors to that shard's token store (`tokens`: the writer an encoder
    appends to, routed by passage row); a shard's docstore, token vectors and FAISS index are finished as
    soon as its last passage has arrived. BM25 needs corpus-wide statistics, so each passage's BM25 tokens
    are kept only as int32 ids (4 bytes a token) with running document frequencies, and `finish` scores and
    seals every shard once all are in. Nothing holds the corpus's texts, token strings, vectors or token
    vectors beyond the shard being written."""

    def __init__(
        self,
        root: Path,
        doc_sizes: Sequence[int],
        shards: int,
        config: IndexConfig,
        build_id: str,
        token_form: TokenForm | None = None,
    ) -> None:
        self.root = Path(root)
        self.config = config
        self.build_id = build_id
        self.count = shards
        self.sizes = np.asarray(doc_sizes, dtype=np.int64)
        self.ranges = plan_shards(self.sizes, shards)
        first_rows = np.concatenate([[0], np.cumsum(self.sizes)])
        self.bounds = [(int(first_rows[a]), int(first_rows[b])) for a, b in self.ranges]  # passage rows
        self.documents = 0  # documents written so far (= the next document's index in the plan)
        self.passages = 0
        self.vocab: dict[str, int] = {}  # BM25 token → provisional id (in order of first appearance)
        self.doc_freqs = np.zeros(0, dtype=np.int64)  # by provisional id, over the whole corpus
        self._open: dict[int, _Shard] = {}
        self._done: list[_Shard] = []
        self._current = 0
        self.tokens = _RoutedTokens(self, token_form) if token_form else None
        self.timings: dict[str, float] = {"faiss": 0.0}

    def _shard(self, index: int) -> _Shard:
        if index >= self.count:
            raise ValueError(f"more passages than the shard plan holds ({self.bounds[-1][1]})")
        if index not in self._open:
            if any(s.index == index for s in self._done):
                raise ValueError(f"{shard_name(index)} is already written")
            self._open[index] = _Shard(index, self.root / shard_name(index), self.tokens.form if self.tokens else None)
        return self._open[index]

    def add(
        self,
        documents: Sequence[tuple[Document, Sequence[Passage]]],
        texts: Sequence[str],
        vectors: np.ndarray | None,
    ) -> None:
        """The next documents in row order with their passages, the passages' index texts and (dense builds)
        their vectors, one row per passage."""
        token_lists = tokenize(list(texts), self.config.bm25)
        row = 0
        for document, passages in documents:
            if self.documents >= len(self.sizes) or len(passages) != self.sizes[self.documents]:
                raise ValueError(
                    f"document {document.id!r} (#{self.documents}, {len(passages)} passages) is not the one the shard "
                    "plan counted: the input changed during the build; run it again"
                )
            while self.documents >= self.ranges[self._current][1]:
                self._current += 1
            shard = self._shard(self._current)
            shard.docstore.add(document, passages)
            n = len(passages)
            for tokens in token_lists[row : row + n]:
                ids = np.fromiter((self.vocab.setdefault(t, len(self.vocab)) for t in tokens), np.int32, len(tokens))
                unique = np.unique(ids)
                self._count(unique)
                shard.add_bm25(ids, unique.size)
            if vectors is not None:
                shard.vectors.append(np.asarray(vectors[row : row + n], dtype=np.float32))
            row += n
            self.documents += 1
            self.passages += n
            if self.documents == self.ranges[self._current][1]:
                self._finish_rows(self._current)
        if row != len(texts):
            raise ValueError(f"{len(texts)} index texts for {row} passages")

    def _count(self, unique: np.ndarray) -> None:
        """One passage's distinct tokens (provisional ids) into the corpus's document frequencies."""
        if len(self.vocab) > self.doc_freqs.size:
            grown = np.zeros(max(len(self.vocab), 2 * self.doc_freqs.size), dtype=np.int64)
            grown[: self.doc_freqs.size] = self.doc_freqs
            self.doc_freqs = grown
        self.doc_freqs[unique] += 1

    def _finish_rows(self, index: int) -> None:
        """Shard `index` has all its documents: finish its docstore and FAISS index (its vectors are freed)."""
        shard = self._open[index]
        shard.docstore.close()
        shard.compact()
        if shard.vectors:
            t = time.perf_counter()
            save_dense(np.concatenate(shard.vectors), self.config.dense, shard.folder / DENSE_DIR)
            self.timings["faiss"] += time.perf_counter() - t
            shard.vectors = []
        shard.rows_done = True
        self._retire(index)

    def _retire(self, index: int) -> None:
        shard = self._open[index]
        if shard.rows_done and (shard.token_writer is None or shard.token_info is not None):
            self._done.append(self._open.pop(index))

    def finish(self, dense_info: dict[str, Any], show_progress: bool = False) -> dict[str, Any]:
        """Score every shard's BM25 with the corpus-wide statistics, write the shard manifests and seal the
        shards. Returns the parent manifest's `shards` entry."""
        if self.documents != len(self.sizes):
            raise ValueError(f"{self.documents} of the {len(self.sizes)} planned documents arrived")
        if self.tokens is not None:
            self.tokens.close()
        if self._open:
            raise ValueError(f"shards {sorted(self._open)} were not completed")
        t = time.perf_counter()
        order = sorted(self.vocab)
        columns = np.empty(len(self.vocab), dtype=np.int32)  # provisional id → column of the sorted vocabulary
        columns[[self.vocab[token] for token in order]] = np.arange(len(order), dtype=np.int32)
        tokens = sum(s.tokens for s in self._done)
        doc_freqs = {token: int(self.doc_freqs[self.vocab[token]]) for token in order}
        stats = BM25Stats(self.passages, tokens, doc_freqs)
        corpus = CorpusBM25(stats, self.config.bm25)
        log.info("corpus-wide BM25 statistics over %d shards in %.1f s", self.count, time.perf_counter() - t)
        entries = []
        for shard in tqdm(sorted(self._done, key=lambda s: s.index), desc="seal shards", disable=not show_progress):
            (a, b), (lo, hi) = self.ranges[shard.index], self.bounds[shard.index]
            model = corpus.shard_model_ids(shard.bm25_ids(columns), hi - lo, shard.pairs)
            model.save(str(shard.folder / BM25_DIR), show_progress=False)
            shard_dense = dict(dense_info)
            if shard.token_info is not None:
                shard_dense["token_vectors"] = shard.token_info
            place = {"index": shard.index, "count": self.count, "offset": lo, "parent": self.build_id}
            manifest = {
                "counts": {"documents": b - a, "passages": hi - lo, "skipped": 0},
                "tokenizer": self.config.dense.model,
                "dense": shard_dense,
                "config": self.config.model_dump(mode="json"),
                "shard": place,
            }
            seal_folder(shard.folder, manifest, f"{self.build_id}.{shard_name(shard.index)}")
            entries.append({"name": shard_name(shard.index), "offset": lo, "passages": hi - lo, "documents": b - a})
        self.timings["bm25"] = time.perf_counter() - t
        return {
            "count": self.count,
            "map": entries,
            "bm25": {"documents": stats.documents, "avg_length": stats.avg_length, "vocabulary": len(corpus.vocab)},
        }


class _Shard:
    """One shard being written: its docstore and token writer open, its vectors and BM25 ids so far."""

    def __init__(self, index: int, folder: Path, token_form: TokenForm | None) -> None:
        self.index = index
        self.folder = folder
        folder.mkdir()
        self.docstore = DocstoreWriter(folder / DOCSTORE)
        self.token_writer = TokenWriter(folder / DENSE_DIR, token_form) if token_form else None
        self.token_info: dict[str, Any] | None = None
        self.vectors: list[np.ndarray] = []
        self.rows_done = False
        self._ids: list[np.ndarray] = []  # one array per passage while the shard fills; one flat array after
        self._offsets = np.zeros(1, dtype=np.int64)
        self.tokens = 0  # BM25 tokens
        self.pairs = 0  # distinct (passage, token) pairs: what sizes bm25s's scratch arrays

    def add_bm25(self, ids: np.ndarray, distinct: int) -> None:
        self._ids.append(ids)
        self.tokens += len(ids)
        self.pairs += distinct

    def compact(self) -> None:
        """The shard's BM25 ids as one flat int32 array and row offsets (no per-passage objects)."""
        self._offsets = np.concatenate([[0], np.cumsum([len(ids) for ids in self._ids], dtype=np.int64)])
        self._ids = [np.concatenate(self._ids) if self._ids else np.zeros(0, dtype=np.int32)]

    def bm25_ids(self, columns: np.ndarray) -> Iterator[list[int]]:
        """Each passage's BM25 tokens as columns of the corpus vocabulary, in row order."""
        flat = columns[self._ids[0]]
        for start, end in zip(self._offsets[:-1], self._offsets[1:]):
            yield flat[start:end].tolist()


class _RoutedTokens(BuildTokens):
    """The token writer an engine appends to for a sharded build: each passage's token vectors go to the
    token store of the shard that holds its row (rows arrive in order). A fresh pq build trains one codebook
    over every shard's spilled tokens at the end (`train_on_spills`: the codebook the unsharded build of the
    corpus trains), so that codes mean the same in every shard; each shard's spill waits on disk till then.
    Other forms, and a pq form with a given codebook (a reshard keeps its parent's), close shard by shard."""

    def __init__(self, writer: ShardWriter, form: TokenForm) -> None:
        self.writer = writer
        self.form = form
        self.row = 0
        self._index = 0
        self.shared_codebook = form.dtype == "pq" and form.codebook is None

    def _target(self) -> TokenWriter:
        bounds = self.writer.bounds
        while self._index < len(bounds) and self.row >= bounds[self._index][1]:
            if not self.shared_codebook:
                self._close(self._index)
            self._index += 1
        writer = self.writer._shard(self._index).token_writer
        if writer is None:
            raise ValueError("a shard without a token writer: the sharded build keeps no token vectors")
        return writer

    def _close(self, index: int, codebook: ProductQuantizer | None = None) -> None:
        shard = self.writer._open.get(index)
        if shard is not None and shard.token_info is None and shard.token_writer is not None:
            shard.token_info = shard.token_writer.close(codebook)
            self.writer._retire(index)

    def add(self, vectors: np.ndarray) -> None:
        self._target().add(vectors)
        self.row += 1

    def add_quantized(self, rows: np.ndarray, scales: np.ndarray | None) -> None:
        self._target().add_quantized(rows, scales)
        self.row += 1

    def add_stored(self, store: TokenStore, rows: Sequence[int]) -> None:
        """Passages `rows` of another store, copied as stored (split where a shard ends)."""
        rows = list(rows)
        while rows:
            target = self._target()
            take = min(len(rows), self.writer.bounds[self._index][1] - self.row)
            target.add_stored(store, rows[:take])
            self.row += take
            rows = rows[take:]

    def close(self) -> None:
        """All token vectors are in: finish every shard's (with the one codebook, for a fresh pq build)."""
        if self.row != self.writer.passages:
            raise ValueError(f"token vectors for {self.row} passages, {self.writer.passages} written")
        codebook = None
        if self.shared_codebook:
            open_writers = [
                shard.token_writer
                for _, shard in sorted(self.writer._open.items())
                if shard.token_writer is not None and shard.token_info is None
            ]
            if open_writers:
                codebook = train_on_spills(open_writers, self.form)
        for index in sorted(self.writer._open):
            self._close(index, codebook)


def shard_map(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The shard map of a sharded build's manifest ([] for an unsharded one)."""
    return list((manifest.get("shards") or {}).get("map") or [])
