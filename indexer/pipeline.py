"""The one build pipeline behind `sift index build`, `update` and `reshard`:

    read ─► chunk ─► [tag] ─► encode ─► write ─► manifest ─► publish
    `Corpus`          engine     `BundleSink` (one bundle) or `ShardWriter` (N shards, indexer/shards.py)

- read/chunk: a `Corpus` yields `Entry`s (a document and its passages) in row order. A build's
  (`SourceCorpus`) reads an input and chunks it; an update's (indexer/update.py) yields the parent build's kept
  documents with their stored passages, then the added/changed ones chunked; a reshard's (`ParentCorpus`)
  yields the parent's documents as stored. An entry kept from a parent carries its parent `rows`.
- encode: entries flow in blocks of about `engine.block_passages` passages. Passages without parent rows go
  through the engine (`LocalEncoding` in this process, `indexer.ray_engine.RayEncoding` on Ray), which
  appends their token vectors to the sink's token writer; kept ones take the parent's vectors and token
  vectors as stored (`Stored`), never re-encoded.
- tag (`index.tagging.enabled`, `sift index build --tag`): passages chunked anew get zero-shot labels in their
  metadata (indexer/tagging.py); kept ones keep the metadata stored with them.
- write: each block goes to the sink as it is produced. One bundle (`BundleSink`) writes the docstore and
  token vectors as it goes, then BM25 and FAISS over the whole corpus; N shards (`ShardWriter`) stream each
  document to its shard (the plan needs every document's passage count first: `Corpus.sizes`, a counting
  pass), so a sharded build never holds more than one shard's vectors.
- manifest/publish: `make_manifest`, `publish` (quality gate, `index.keep_builds`).

Invariants: rows are assigned in the order entries arrive, and the docstore, BM25, FAISS and token vectors
of a bundle or shard all use them; a build, an update and a reshard of the same corpus write the same
passages in the same rows (tests/test_update_gate.py, tests/test_shards.py).
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from tqdm.auto import tqdm

from indexer import __version__
from indexer.bm25 import build_bm25
from indexer.bundle import (
    BM25_DIR,
    CURRENT,
    DENSE_DIR,
    DOCSTORE,
    BundleWriter,
    discard_build,
    now_iso,
    prune_builds,
    switch_current,
)
from indexer.chunking import Chunker
from indexer.config import DenseSettings, IndexConfig
from indexer.dense import EMBEDDINGS_FILE, INDEX_FILE, gpu_available, save_dense
from indexer.docstore import Docstore, DocstoreWriter
from indexer.encoders import encode_passages, load_encoder, pick_device, resolve_model_path
from indexer.models import Document, Passage, passage_index_text
from indexer.runtime import return_freed_memory
from indexer.shards import MAX_SHARDS, ShardWriter
from indexer.sources import ReadReport, SourceError, estimate_documents, read_documents
from indexer.tokens import BuildTokens, TokenForm, TokenStore, TokenWriter

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from indexer.tagging import Tagger

log = logging.getLogger(__name__)


@dataclass
class BuildResult:
    """What a build produced, for the summary line and for callers."""

    path: Path
    build_id: str
    documents: int
    passages: int
    seconds: float
    skipped: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def passages_per_second(self) -> float:
        return self.passages / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        return (
            f"built {self.documents} documents, {self.passages} passages in {self.seconds:.1f} s "
            f"({self.passages_per_second:.1f} passages/s), skipped {len(self.skipped)} → {self.path}"
        )


class GateRefused(RuntimeError):
    """The quality gate refused a build; `current` still points at the published one."""


GateFn = Callable[[Path, "Path | None"], tuple[bool, str]]


# -- encode: the engines -----------------------------------------------------------------------------------


class EncodingEngine(Protocol):
    """What encodes a build's passages: `LocalEncoding` (this process) or `indexer.ray_engine.RayEncoding`."""

    name: str  # recorded in the manifest
    block_passages: int  # about how many passages the pipeline hands `encode` per call

    def start(self, config: IndexConfig) -> Any:
        """Load what encoding needs; returns the tokenizer chunking uses (a Hugging Face tokenizer)."""
        ...

    def encode(
        self, texts: list[str], settings: DenseSettings, progress: bool, tokens: BuildTokens | None
    ) -> np.ndarray:
        """float32 passage vectors in input order; with `tokens`, their token vectors appended in that order."""
        ...

    @property
    def info(self) -> dict[str, Any]:
        """What encoded the passages (model length, runtime, device, workers), for the manifest."""
        ...

    def close(self) -> None: ...


class LocalEncoding(EncodingEngine):
    """The default engine: passages are encoded in this process, by the configured runtime and device."""

    name = "local"
    block_passages = 4096  # a multiple of encoders.TOKEN_SLICE; bounds what one block holds in memory

    def __init__(self, keep: bool = False, threads: int | None = None) -> None:
        """`keep`: the model stays loaded after `close()` for the next job with the same model, device and
        runtime (a long-lived applier of ingested batches: one load, many updates); `threads`: intra-op threads
        of a non-torch runtime (torch's are the process's)."""
        self.encoder: SentenceTransformer | None = None
        self.keep, self.threads = keep, threads
        self._key: tuple[Any, ...] | None = None

    def _loaded(self) -> SentenceTransformer:
        if self.encoder is None:
            raise RuntimeError("the engine is not started (call start first)")
        return self.encoder

    def start(self, config: IndexConfig) -> Any:
        key = (config.dense.model, config.dense.device, config.dense.runtime)
        if self.encoder is None or key != self._key:
            self.encoder = load_encoder(config.dense.model, config.dense.device, config.dense.runtime, self.threads)
            self._key = key
        return self.encoder.tokenizer

    def encode(
        self, texts: list[str], settings: DenseSettings, progress: bool, tokens: BuildTokens | None
    ) -> np.ndarray:
        return encode_passages(self._loaded(), texts, settings, progress, tokens)

    @property
    def info(self) -> dict[str, Any]:
        encoder = self._loaded()
        return {
            "engine": self.name,
            "max_seq_length": int(encoder.max_seq_length) if encoder.max_seq_length is not None else None,
            "runtime": getattr(encoder, "sift_runtime", "torch"),
        }

    def close(self) -> None:
        if not self.keep:
            self.encoder, self._key = None, None


def engine_record(engine: EncodingEngine, encoding: dict[str, Any]) -> dict[str, Any]:
    """The manifest's `engine` entry: which engine encoded the passages and with how many workers."""
    record = {"name": engine.name}
    record.update({k: v for k, v in encoding.items() if k in ("encoders", "gpus_per_encoder", "address")})
    return record


# -- read and chunk: corpora -------------------------------------------------------------------------------


@dataclass
class Entry:
    """One document in row order with its passages; `rows`: the parent build's rows of these passages when
    they are kept as stored (vectors and token vectors reused), None when they are to be encoded."""

    document: Document
    passages: list[Passage]
    rows: list[int] | None = None


@dataclass
class Stored:
    """A parent build's passage vectors (row order) and token vectors, for the entries it keeps."""

    vectors: np.ndarray | None = None
    tokens: TokenStore | None = None


class Corpus(Protocol):
    """What the pipeline reads. `entries` may be iterated more than once and yields the same entries each
    time (a sharded write counts them first); `chunks`: whether `entries` needs a chunker."""

    chunks: bool

    @property
    def documents(self) -> int | None:
        """About how many entries, for the progress bar (None: unknown)."""
        ...

    def entries(self, chunker: Chunker | None) -> Iterator[Entry]: ...

    def sizes(self, chunker: Chunker | None) -> list[int]: ...


class SourceCorpus:
    """A build's corpus: documents read from an input file or folder, chunked."""

    chunks = True

    def __init__(self, path: Path, config: IndexConfig, skip_bad: bool = False, count: bool = False) -> None:
        self.path = Path(path)
        self.config = config
        self.skip_bad = skip_bad
        self.report = ReadReport()  # of the pass that is written (not of the counting pass)
        self.documents = estimate_documents(self.path) if count else None

    def _read(self, report: ReadReport) -> Iterator[Document]:
        return read_documents(self.path, skip_bad=self.skip_bad, csv_columns=self.config.csv, report=report)

    def entries(self, chunker: Chunker | None) -> Iterator[Entry]:
        assert chunker is not None
        self.report = ReadReport()
        for document, passages in chunker.chunk(self._read(self.report)):
            yield Entry(document, passages)

    def sizes(self, chunker: Chunker | None) -> list[int]:
        assert chunker is not None
        return [len(passages) for _, passages in chunker.chunk(self._read(ReadReport()))]


class ParentCorpus:
    """A published build's documents and passages as stored, every one kept (a reshard)."""

    chunks = False

    def __init__(self, store: Docstore) -> None:
        self.store = store
        self.documents = store.num_documents

    def entries(self, chunker: Chunker | None = None) -> Iterator[Entry]:
        next_row = 0
        for document, passages, rows in self.store.documents():
            if rows != list(range(next_row, next_row + len(rows))):
                raise ValueError("the docstore's passages are not contiguous per document; rebuild the bundle")
            next_row += len(rows)
            yield Entry(document, passages, rows)

    def sizes(self, chunker: Chunker | None = None) -> list[int]:
        return self.store.passage_counts()


def stored_vectors(root: Path, index_type: str) -> np.ndarray:
    """A published build's passage vectors: exact float32 from a flat FAISS index, else the float16 copy."""
    import faiss

    if index_type == "flat":
        index = faiss.read_index(str(root / DENSE_DIR / INDEX_FILE))
        vectors = np.asarray(index.reconstruct_n(0, index.ntotal), dtype=np.float32)
    else:
        vectors = np.load(root / DENSE_DIR / EMBEDDINGS_FILE).astype(np.float32)
    return vectors


# -- write: sinks ------------------------------------------------------------------------------------------


class BundleSink:
    """Writes one (unsharded) bundle at `root`: docstore rows and token vectors as blocks arrive; BM25 and
    FAISS over the whole corpus in `finish` (both need every passage)."""

    def __init__(self, root: Path, config: IndexConfig, token_form: TokenForm | None) -> None:
        self.root = root
        self.config = config
        self.docstore = DocstoreWriter(root / DOCSTORE)
        self.tokens = TokenWriter(root / DENSE_DIR, token_form) if token_form else None
        self.texts: list[str] = []
        self.vectors: list[np.ndarray] = []
        self.timings: dict[str, float] = {}

    @property
    def documents(self) -> int:
        return self.docstore.document_count

    @property
    def passages(self) -> int:
        return self.docstore.passage_count

    def add(self, documents: Iterable[tuple[Document, list[Passage]]], texts: list[str], vectors: Any) -> None:
        for document, passages in documents:
            self.docstore.add(document, passages)
        self.texts.extend(texts)
        if vectors is not None:
            self.vectors.append(vectors)

    def finish(self, dense_info: dict[str, Any], show_progress: bool = False) -> dict[str, Any]:
        """Close the docstore and token vectors, write BM25 and FAISS; returns the manifest's `dense` entry."""
        self.docstore.close()
        token_info = self.tokens.close() if self.tokens is not None else None
        t = time.perf_counter()
        build_bm25(self.texts, self.config.bm25, self.root / BM25_DIR, show_progress=show_progress)
        self.timings["bm25"] = time.perf_counter() - t
        self.texts = []
        if self.vectors:
            t = time.perf_counter()
            save_dense(np.concatenate(self.vectors), self.config.dense, self.root / DENSE_DIR)
            self.timings["faiss"] = time.perf_counter() - t
            self.vectors = []
        return {**dense_info, "token_vectors": token_info} if token_info is not None else dict(dense_info)


def dense_manifest(dimension: int | None, encoding: dict[str, Any], config: IndexConfig) -> dict[str, Any]:
    """The manifest's `dense` entry for passage vectors of `dimension` (None: no dense index) encoded as
    `encoding` (an engine's `info`) says."""
    if dimension is None:
        return {"enabled": False}
    return {
        "enabled": True,
        "model": config.dense.model,
        "dimension": int(dimension),
        "normalize": config.dense.normalize,
        "max_seq_length": encoding.get("max_seq_length"),
        "index_type": config.dense.index_type,
        "built_on": "gpu" if gpu_available() else "cpu",
        "encoded_on": encoding.get("device") or pick_device(config.dense.device),
        "runtime": encoding.get("runtime"),
    }


# -- the pipeline ------------------------------------------------------------------------------------------


@dataclass
class Written:
    """What `run_pipeline` wrote: counts, the manifest's `dense` entry, its `shards` entry (sharded only) and
    what the engine reported (`encoding`: its `info`, or `unencoded` when it did not run), and how many
    passages were chunked anew (`encoded`: by the engine, for a dense build) and kept from a parent
    (`reused`)."""

    documents: int
    passages: int
    dense: dict[str, Any]
    shards: dict[str, Any] | None
    encoding: dict[str, Any]
    encoded: int
    reused: int


def _blocks(entries: Iterable[Entry], passages: int) -> Iterator[list[Entry]]:
    """Entries in blocks of whole documents holding about `passages` passages each."""
    block: list[Entry] = []
    size = 0
    for entry in entries:
        block.append(entry)
        size += len(entry.passages)
        if size >= passages:
            yield block
            block, size = [], 0
    if block:
        yield block


def run_pipeline(
    root: Path,
    corpus: Corpus,
    config: IndexConfig,
    engine: EncodingEngine,
    *,
    build_id: str,
    shards: int = 1,
    dense: bool | None = None,
    token_form: TokenForm | None = None,
    stored: Stored | None = None,
    dense_info: dict[str, Any] | None = None,
    unencoded: dict[str, Any] | None = None,
    timings: dict[str, float] | None = None,
    show_progress: bool = False,
    empty: str = "no documents to index",
) -> Written:
    """Read → chunk → encode → write `corpus` into the build folder `root` (one bundle, or `shards` shards).

    `dense` (default `config.dense.enabled`): whether there are vectors; `token_form`: keep token vectors in
    that form; `stored`: the parent's vectors and token vectors for kept entries; `dense_info`: the manifest's
    `dense` entry to write as it is (a reshard keeps its parent's), else it is made from what the engine
    reports (`unencoded`: what to record instead when the engine did not run, e.g. an update that only
    deletes). The engine is started only when the corpus needs chunking and is always closed. Raises
    `SourceError(empty)` when the corpus has no documents. Manifest and publish are the caller's."""
    if not 1 <= shards <= MAX_SHARDS:
        raise ValueError(f"--shards must be between 1 and {MAX_SHARDS}, not {shards}")
    dense = config.dense.enabled if dense is None else dense
    timings = timings if timings is not None else {}
    stored = stored or Stored()
    tagger: Tagger | None = None
    try:
        chunker, started = None, False
        if corpus.chunks and config.tagging.enabled:
            from indexer.tagging import Tagger

            t = time.perf_counter()
            tagger = Tagger.load(config.tagging)
            for label_set in config.tagging.label_sets.values():
                tagger.check(label_set)  # a set the model cannot tell apart stops the job before any work
            timings["load_tagger"] = time.perf_counter() - t
        if corpus.chunks:
            t = time.perf_counter()
            if dense:
                tokenizer, started = engine.start(config), True
                timings["load_encoder"] = time.perf_counter() - t
            else:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(config.dense.model))
            chunker = Chunker(tokenizer, config.chunking)
        if shards == 1:
            sink: BundleSink | ShardWriter = BundleSink(root, config, token_form if dense else None)
        else:
            t = time.perf_counter()
            sizes = corpus.sizes(chunker)
            if not sizes:
                raise SourceError(empty)
            timings["plan"] = time.perf_counter() - t
            sink = ShardWriter(root, sizes, shards, config, build_id, token_form if dense else None)
        dimension: int | None = None
        encoded = reused = 0
        spent = dict.fromkeys(("read_chunk", "tag", "encode", "reuse", "write"), 0.0)
        blocks = _blocks(corpus.entries(chunker), engine.block_passages)
        with tqdm(desc="index", unit="doc", total=corpus.documents, disable=not show_progress) as bar:
            while True:
                t = time.perf_counter()
                block = next(blocks, None)
                spent["read_chunk"] += time.perf_counter() - t
                if block is None:
                    break
                if tagger is not None:
                    t = time.perf_counter()
                    block = _tagged(block, tagger, config, show_progress)
                    spent["tag"] += time.perf_counter() - t
                texts = [passage_index_text(e.document.title, p.text) for e in block for p in e.passages]
                kept = sum(len(e.passages) for e in block if e.rows is not None)
                reused, encoded = reused + kept, encoded + len(texts) - kept
                vectors = _vectors(block, texts, config, engine, stored, sink.tokens, spent) if dense else None
                if vectors is not None:
                    dimension = int(vectors.shape[1])
                t = time.perf_counter()
                sink.add([(e.document, e.passages) for e in block], texts, vectors)
                spent["write"] += time.perf_counter() - t
                bar.update(len(block))
            bar.total = bar.n  # skipped records and over-counted lines: end the bar where reading ended
            bar.refresh()
        timings.update({k: v for k, v in spent.items() if v or k == "read_chunk"})
        if sink.documents == 0:
            raise SourceError(empty)
        encoding = engine.info if started else dict(unencoded or {})
        engine.close()  # the encoder is done: its memory goes back before BM25, FAISS and the token codebook
        return_freed_memory()
        if dense_info is None:
            dense_info = dense_manifest(dimension if dense else None, encoding, config)
        documents, passages = sink.documents, sink.passages
        if isinstance(sink, BundleSink):
            written_dense, shard_info = sink.finish(dense_info, show_progress), None
        else:
            written_dense, shard_info = dense_info, sink.finish(dense_info, show_progress)
        timings.update(sink.timings)
    finally:
        engine.close()
    return Written(documents, passages, written_dense, shard_info, encoding, encoded, reused)


def _tagged(block: list[Entry], tagger: Tagger, config: IndexConfig, progress: bool = False) -> list[Entry]:
    """The block with every passage to be encoded (no parent rows) tagged by each of `index.tagging`'s label
    sets (its metadata gets the labels over what it had); kept entries as they are."""
    new = [(i, p) for i, e in enumerate(block) if e.rows is None for p in e.passages]
    if not new:
        return block
    texts = [passage_index_text(block[i].document.title, p.text) for i, p in new]
    tags = iter(tagger.tag(texts, config.tagging.label_sets, progress))
    return [
        e
        if e.rows is not None
        else replace(e, passages=[replace(p, metadata={**p.metadata, **next(tags)}) for p in e.passages])
        for e in block
    ]


def _vectors(
    block: list[Entry],
    texts: list[str],
    config: IndexConfig,
    engine: EncodingEngine,
    stored: Stored,
    tokens: BuildTokens | None,
    spent: dict[str, float],
) -> np.ndarray:
    """The block's passage vectors in row order, its token vectors appended to `tokens`: runs of kept entries
    take the parent's as stored, runs of new ones go through the engine."""
    parts = []
    start = 0
    for kept, entries in groupby(block, key=lambda e: e.rows is not None):
        t = time.perf_counter()
        run = list(entries)
        count = sum(len(e.passages) for e in run)
        if kept:
            rows = [r for e in run for r in e.rows or ()]
            if stored.vectors is None or (tokens is not None and stored.tokens is None):
                raise ValueError("passages kept from a parent build without its stored vectors or token vectors")
            parts.append(stored.vectors[np.asarray(rows, dtype=np.int64)])
            if tokens is not None and stored.tokens is not None:
                tokens.add_stored(stored.tokens, rows)
            spent["reuse"] += time.perf_counter() - t
        else:
            parts.append(engine.encode(texts[start : start + count], config.dense, False, tokens))
            spent["encode"] += time.perf_counter() - t
        start += count
    return np.concatenate(parts).astype(np.float32, copy=False)


# -- manifest and publish ----------------------------------------------------------------------------------


# manifest records made for a collection after its build (`indexer.build.annotate_bundle`), which its updates,
# reshards and token conversions keep: they describe the collection, not one build's files
CARRIED = ("second_stage",)


def carried(parent_manifest: dict[str, Any]) -> dict[str, Any]:
    """The `CARRIED` records of a parent build's manifest, for its child's."""
    return {key: parent_manifest[key] for key in CARRIED if parent_manifest.get(key) is not None}


def make_manifest(
    source: str | None,
    documents: int,
    passages: int,
    skipped: int,
    dense_info: dict[str, Any],
    config: IndexConfig,
    seconds: float,
    timings: dict[str, float],
    **extra: Any,
) -> dict[str, Any]:
    """The manifest of a build or an update (`extra`: e.g. the parent build); checksums are added on publish."""
    return {
        "sift_version": __version__,
        "created_at": now_iso(),
        "source": source,
        **extra,
        "counts": {"documents": documents, "passages": passages, "skipped": skipped},
        "tokenizer": config.dense.model,
        "dense": dense_info,
        "config": config.model_dump(mode="json"),
        "build": {"seconds": round(seconds, 3), "timings": timings, "host": platform.node()},
    }


def publish(
    writer: BundleWriter, out: Path, manifest: dict[str, Any], config: IndexConfig, gate: GateFn | None
) -> Path:
    """Publish a finished build folder; with a gate, switch `current` only if it passes (else the build is
    discarded and `GateRefused` raised). Then apply `index.keep_builds`."""
    if gate is None:
        path = writer.publish(manifest)
    else:
        current = Path(out) / CURRENT
        published = current.resolve() if current.exists() else None
        path = writer.publish(manifest, switch=False)
        passed, message = gate(path, published)
        if not passed:
            discard_build(out, writer.build_id)
            raise GateRefused(message)
        log.info("quality gate passed: %s", message)
        switch_current(out, writer.build_id)
    pruned, in_use = prune_builds(out, config.keep_builds)
    if pruned or in_use:
        log.info("pruned builds %s (kept %s: in use by a server)", pruned, in_use)
    return path
