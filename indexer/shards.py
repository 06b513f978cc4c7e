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
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable, Sequence
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
from indexer.docstore import Docstore, DocstoreWriter
from indexer.tokens import TokenStore, TokenWriter

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
        model = bm25s.BM25(method=self.settings.method, k1=self.settings.k1, b=self.settings.b)
        ids = [[self.vocab[t] for t in passage] for passage in token_lists]
        sizing = Counter(t for passage in ids for t in set(passage))  # only sizes bm25s's scratch arrays
        scores, doc_idx, vocab_idx = _build_scores_and_indices_for_matrix(
            corpus_token_ids=ids,
            idf_array=self.idf,
            avg_doc_len=self.stats.avg_length,
            doc_frequencies=sizing,
            k1=model.k1,
            b=model.b,
            delta=model.delta,
            nonoccurrence_array=self.nonoccurrence,
            method=model.method,
            dtype=model.dtype,
            int_dtype=model.int_dtype,
            show_progress=False,
        )
        matrix = sp.csc_matrix((scores, (doc_idx, vocab_idx)), shape=(len(ids), len(self.vocab)), dtype=model.dtype)
        model.scores = {
            "data": matrix.data,
            "indices": matrix.indices,
            "indptr": matrix.indptr,
            "num_docs": len(ids),
        }
        model.vocab_dict = dict(self.vocab)
        model.nonoccurrence_array = self.nonoccurrence
        return model


def plan_shards(doc_sizes: Sequence[int], shards: int) -> list[tuple[int, int]]:
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


def write_shards(
    root: Path,
    docstore: Docstore,
    index_texts: Sequence[str],
    vectors: np.ndarray | None,
    tokens: TokenStore | None,
    config: IndexConfig,
    shards: int,
    dense_info: dict[str, Any],
    build_id: str,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Write `shards` shard bundles under `root` from an unsharded docstore, its passages' index texts, their
    vectors and (optionally) token vectors, all in row order. Returns the manifest's `shards` entry."""
    documents = list(docstore.documents())
    if any(rows != list(range(rows[0], rows[0] + len(rows))) for _, _, rows in documents):
        raise ValueError("the docstore's passages are not contiguous per document; rebuild the bundle")
    ranges = plan_shards([len(rows) for _, _, rows in documents], shards)
    t = time.perf_counter()
    token_lists = tokenize(list(index_texts), config.bm25, show_progress=show_progress)
    bounds = [(documents[a][2][0], documents[b - 1][2][-1] + 1) for a, b in ranges]
    stats = BM25Stats.merge(BM25Stats.of(token_lists[lo:hi]) for lo, hi in bounds)
    corpus = CorpusBM25(stats, config.bm25)
    log.info("corpus-wide BM25 statistics over %d shards in %.1f s", shards, time.perf_counter() - t)
    entries = []
    for i, ((a, b), (lo, hi)) in enumerate(
        tqdm(list(zip(ranges, bounds, strict=True)), desc="shards", unit="shard", disable=not show_progress)
    ):
        folder = root / shard_name(i)
        folder.mkdir()
        writer = DocstoreWriter(folder / DOCSTORE)
        for document, passages, _ in documents[a:b]:
            writer.add(document, passages)
        writer.close()
        corpus.shard_model(token_lists[lo:hi]).save(str(folder / BM25_DIR), show_progress=False)
        shard_dense: dict[str, Any] = dict(dense_info)
        if vectors is not None:
            save_dense(vectors[lo:hi], config.dense, folder / DENSE_DIR)
        if tokens is not None:
            with TokenWriter(folder / DENSE_DIR, tokens.dtype) as token_writer:
                token_writer.add_stored(tokens, list(range(lo, hi)))
                shard_dense["token_vectors"] = token_writer.close()
        place = {"index": i, "count": shards, "offset": lo, "parent": build_id}
        manifest = {
            "counts": {"documents": b - a, "passages": hi - lo, "skipped": 0},
            "tokenizer": config.dense.model,
            "dense": shard_dense,
            "config": config.model_dump(mode="json"),
            "shard": place,
        }
        seal_folder(folder, manifest, f"{build_id}.{shard_name(i)}")
        entries.append({"name": shard_name(i), "offset": lo, "passages": hi - lo, "documents": b - a})
    return {
        "count": shards,
        "map": entries,
        "bm25": {"documents": stats.documents, "avg_length": stats.avg_length, "vocabulary": len(corpus.vocab)},
    }


def shard_map(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The shard map of a sharded build's manifest ([] for an unsharded one)."""
    return list((manifest.get("shards") or {}).get("map") or [])
