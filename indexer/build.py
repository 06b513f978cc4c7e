"""The build job: documents → passages → docstore, BM25 and dense index → manifest → atomic publish.

`build_bundle()` is what the CLI and a batch runner call; it holds no global state, so many builds may run
side by side (each writes its own temporary folder).
"""

from __future__ import annotations

import logging
import platform
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from indexer import __version__
from indexer.bm25 import build_bm25
from indexer.bundle import (
    BM25_DIR,
    CURRENT,
    DENSE_DIR,
    DOCSTORE,
    BundleError,
    BundleWriter,
    discard_build,
    now_iso,
    open_bundle,
    prune_builds,
    switch_current,
)
from indexer.chunking import Chunker
from indexer.config import IndexConfig
from indexer.dense import gpu_available, save_dense
from indexer.docstore import Docstore, DocstoreWriter
from indexer.encoders import encode_passages, load_encoder, pick_device, resolve_model_path
from indexer.models import passage_index_text
from indexer.shards import MAX_SHARDS, write_shards
from indexer.sources import ReadReport, SourceError, estimate_documents, read_documents
from indexer.tokens import TokenStore, TokenWriter

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


class LocalEncoding:
    """The default engine: passages are encoded in this process, by the configured runtime and device.

    An engine has `start(config)` (loads what encoding needs and returns the tokenizer chunking uses),
    `encode(texts, settings, progress, tokens)` (float32 vectors in input order; token vectors appended to
    `tokens` in the same order), `info` (for the manifest) and `close()`. `indexer.ray_engine.RayEncoding`
    is the other one."""

    name = "local"

    def __init__(self) -> None:
        self.encoder: Any = None

    def start(self, config: IndexConfig) -> Any:
        self.encoder = load_encoder(config.dense.model, config.dense.device, config.dense.runtime)
        return self.encoder.tokenizer

    def encode(self, texts: list[str], settings: Any, progress: bool, tokens: TokenWriter | None) -> np.ndarray:
        return encode_passages(self.encoder, texts, settings, progress, tokens)

    @property
    def info(self) -> dict[str, Any]:
        return {
            "engine": self.name,
            "max_seq_length": int(self.encoder.max_seq_length),
            "runtime": getattr(self.encoder, "sift_runtime", "torch"),
        }

    def close(self) -> None:
        self.encoder = None


def build_bundle(
    input_path: Path,
    out: Path,
    config: IndexConfig | None = None,
    *,
    skip_bad: bool = False,
    show_progress: bool = True,
    gate: GateFn | None = None,
    shards: int = 1,
    engine: Any = None,
) -> BuildResult:
    """Build a bundle from `input_path` and publish it under `out` (`out/current` → the new build). With a
    `gate`, the build is published beside `current` first and only made current when the gate passes.
    `shards` > 1 writes a sharded build (`indexer.shards`); `engine` encodes the passages (default
    `LocalEncoding`; `indexer.ray_engine.RayEncoding` on Ray). Everything else is the same for every engine."""
    config = config or IndexConfig()
    if not 1 <= shards <= MAX_SHARDS:
        raise ValueError(f"--shards must be between 1 and {MAX_SHARDS}, not {shards}")
    engine = engine or LocalEncoding()
    started = time.perf_counter()
    timings: dict[str, float] = {}
    writer = BundleWriter(out)
    # a sharded build first writes the unsharded docstore and token vectors here, then splits them
    stage = writer.root if shards == 1 else writer.root / ".unsharded"
    stage.mkdir(exist_ok=True)
    try:
        if config.dense.enabled:
            t = time.perf_counter()
            tokenizer = engine.start(config)
            timings["load_encoder"] = time.perf_counter() - t
        else:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(config.dense.model))

        chunker = Chunker(tokenizer, config.chunking)
        report = ReadReport()
        documents = read_documents(Path(input_path), skip_bad=skip_bad, csv_columns=config.csv, report=report)
        docstore = DocstoreWriter(stage / DOCSTORE)
        index_texts: list[str] = []
        t = time.perf_counter()
        total = estimate_documents(Path(input_path)) if show_progress else None
        with tqdm(desc="read+chunk", unit="doc", total=total, disable=not show_progress) as bar:
            for document, passages in chunker.chunk(documents):
                docstore.add(document, passages)
                index_texts.extend(passage_index_text(document.title, p.text) for p in passages)
                bar.update(1)
            bar.total = bar.n  # skipped records and over-counted CSV lines: end the bar where reading ended
            bar.refresh()
        docstore.close()
        timings["read_chunk"] = time.perf_counter() - t
        if docstore.document_count == 0:
            raise SourceError(f"{input_path}: no documents to index")
        vectors, token_info = None, None
        if config.dense.enabled:
            t = time.perf_counter()
            with token_writer(stage, config) as tokens:
                vectors = engine.encode(index_texts, config.dense, show_progress, tokens)
                token_info = tokens.close() if tokens is not None else None
            timings["encode"] = time.perf_counter() - t
        encoding = engine.info if config.dense.enabled else {"engine": engine.name}
        if shards == 1:
            dense_info = write_indexes(writer.root, index_texts, vectors, encoding, config, timings, show_progress)
            if token_info is not None:
                dense_info["token_vectors"] = token_info
            extra: dict[str, Any] = {}
        else:
            t = time.perf_counter()
            dense_info = dense_manifest(vectors, encoding, config)
            store = TokenStore.open(stage / DENSE_DIR, docstore.passage_count) if token_info else None
            extra = {
                "shards": write_shards(
                    writer.root,
                    Docstore(stage / DOCSTORE),
                    index_texts,
                    vectors,
                    store,
                    config,
                    shards,
                    {**dense_info, "token_vectors": token_info} if token_info else dense_info,
                    writer.build_id,
                    show_progress,
                )
            }
            del store
            shutil.rmtree(stage)
            timings["shards"] = time.perf_counter() - t
        seconds = time.perf_counter() - started
        manifest = make_manifest(
            str(input_path),
            docstore,
            len(report.skipped),
            dense_info,
            config,
            seconds,
            timings,
            engine=engine_record(engine, encoding),
            **extra,
        )
        path = publish(writer, out, manifest, config, gate)
    except BaseException:
        writer.abort()
        raise
    finally:
        engine.close()
    for reason in report.skipped:
        log.warning("skipped: %s", reason)
    return BuildResult(
        path=path,
        build_id=writer.build_id,
        documents=docstore.document_count,
        passages=docstore.passage_count,
        seconds=seconds,
        skipped=report.skipped,
        timings=timings,
    )


def engine_record(engine: Any, encoding: dict[str, Any]) -> dict[str, Any]:
    """The manifest's `engine` entry: which engine encoded the passages and with how many workers."""
    record = {"name": engine.name}
    record.update({k: v for k, v in encoding.items() if k in ("encoders", "gpus_per_encoder", "address")})
    return record


@contextmanager
def token_writer(root: Path, config: IndexConfig) -> Iterator[TokenWriter | None]:
    """The writer of the build's token vectors when `index.dense.token_vectors` asks for them, else None."""
    if not (config.dense.enabled and config.dense.token_vectors):
        yield None
        return
    with TokenWriter(root / DENSE_DIR, config.dense.token_vectors) as writer:
        yield writer


def make_manifest(
    source: str | None,
    docstore: DocstoreWriter,
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
        "counts": {"documents": docstore.document_count, "passages": docstore.passage_count, "skipped": skipped},
        "tokenizer": config.dense.model,
        "dense": dense_info,
        "config": config.model_dump(mode="json"),
        "build": {"seconds": round(seconds, 3), "timings": timings, "host": platform.node()},
    }


def write_indexes(
    root: Path,
    index_texts: list[str],
    vectors: np.ndarray | None,
    encoding: dict[str, Any],
    config: IndexConfig,
    timings: dict[str, float],
    show_progress: bool = False,
) -> dict[str, Any]:
    """BM25 over `index_texts` and (given vectors) the FAISS index into a build folder; returns the
    manifest's `dense` entry. Shared by a full build and an incremental update."""
    t = time.perf_counter()
    build_bm25(index_texts, config.bm25, root / BM25_DIR, show_progress=show_progress)
    timings["bm25"] = time.perf_counter() - t
    if vectors is None:
        return {"enabled": False}
    t = time.perf_counter()
    save_dense(vectors, config.dense, root / DENSE_DIR)
    timings["faiss"] = time.perf_counter() - t
    return dense_manifest(vectors, encoding, config)


def dense_manifest(vectors: np.ndarray | None, encoding: dict[str, Any], config: IndexConfig) -> dict[str, Any]:
    """The manifest's `dense` entry for passage `vectors` encoded as `encoding` (an engine's `info`) says."""
    if vectors is None:
        return {"enabled": False}
    return {
        "enabled": True,
        "model": config.dense.model,
        "dimension": int(vectors.shape[1]),
        "normalize": config.dense.normalize,
        "max_seq_length": encoding.get("max_seq_length"),
        "index_type": config.dense.index_type,
        "built_on": "gpu" if gpu_available() else "cpu",
        "encoded_on": encoding.get("device") or pick_device(config.dense.device),
        "runtime": encoding.get("runtime"),
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


def reshard_bundle(source: Path, out: Path, shards: int, show_progress: bool = True) -> BuildResult:
    """Split a published unsharded build into `shards` shards without re-encoding: passages and documents from
    its docstore, exact float32 vectors from its flat FAISS index (the float16 copy otherwise, logged), token
    vectors copied as stored; BM25 is recomputed per shard with corpus-wide statistics. The result is a new
    build under `out`, published atomically (its manifest names the source build)."""
    from indexer.update import stored_vectors

    parent = open_bundle(source, verify=True)
    if parent.manifest.get("shards"):
        raise BundleError(f"{parent.root} is already sharded; reshard its unsharded source instead")
    config = IndexConfig.model_validate(parent.manifest["config"])
    dense_info = dict(parent.manifest.get("dense") or {"enabled": False})
    started = time.perf_counter()
    writer = BundleWriter(out)
    store = Docstore(parent.path(DOCSTORE))
    try:
        index_texts = [passage_index_text(title, text) for _, title, text in store.passage_texts()]
        vectors = None
        if dense_info.get("enabled"):
            if config.dense.index_type != "flat":
                log.warning(
                    "%s: %s index; shards get the float16 copy of the vectors", parent.root, config.dense.index_type
                )
            vectors = stored_vectors(parent.root, config.dense.index_type)
        tokens = TokenStore.open(parent.path(DENSE_DIR), len(index_texts)) if dense_info.get("token_vectors") else None
        t = time.perf_counter()
        shard_info = write_shards(
            writer.root, store, index_texts, vectors, tokens, config, shards, dense_info, writer.build_id, show_progress
        )
        timings = {"shards": time.perf_counter() - t}
        seconds = time.perf_counter() - started
        counts = parent.manifest["counts"]
        manifest = {
            "sift_version": __version__,
            "created_at": now_iso(),
            "source": parent.manifest.get("source"),
            "parent": parent.build_id,
            "counts": counts,
            "tokenizer": parent.manifest.get("tokenizer"),
            "dense": {k: v for k, v in dense_info.items() if k != "token_vectors"},
            "config": parent.manifest["config"],
            "engine": {"name": "reshard"},
            "shards": shard_info,
            "build": {"seconds": round(seconds, 3), "timings": timings, "host": platform.node(), "kind": "reshard"},
        }
        path = publish(writer, out, manifest, config, None)
    except BaseException:
        writer.abort()
        raise
    finally:
        store.close()
    return BuildResult(path, writer.build_id, counts["documents"], counts["passages"], seconds, timings=timings)


def ensure_bundle(
    corpus: Path, out: Path, config: IndexConfig | None = None, rebuild: bool = False, show_progress: bool = False
) -> Path:
    """`out` as an index folder holding a bundle of `corpus`: opened as it is when it opens (checksums are
    not re-hashed), else (or with `rebuild`) built from `corpus` first. Used by `sift eval`, the benches and
    the tests, so "build unless it is there" is written once."""
    if not rebuild:
        try:
            open_bundle(out, verify=False)
            return Path(out)
        except BundleError:
            pass
    build_bundle(corpus, out, config, show_progress=show_progress)
    return Path(out)
