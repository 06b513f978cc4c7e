"""The build job: documents → passages → docstore, BM25 and dense index → manifest → atomic publish.

`build_bundle()` is what the CLI and a batch runner call; it holds no global state, so many builds may run
side by side (each writes its own temporary folder).
"""

from __future__ import annotations

import logging
import platform
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
    BundleWriter,
    discard_build,
    now_iso,
    prune_builds,
    switch_current,
)
from indexer.chunking import Chunker
from indexer.config import IndexConfig
from indexer.dense import gpu_available, save_dense
from indexer.docstore import DocstoreWriter
from indexer.encoders import encode_passages, load_encoder, pick_device, resolve_model_path
from indexer.models import passage_index_text
from indexer.sources import ReadReport, SourceError, estimate_documents, read_documents
from indexer.tokens import TokenWriter

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


def build_bundle(
    input_path: Path,
    out: Path,
    config: IndexConfig | None = None,
    *,
    skip_bad: bool = False,
    show_progress: bool = True,
    gate: GateFn | None = None,
) -> BuildResult:
    """Build a bundle from `input_path` and publish it under `out` (`out/current` → the new build). With a
    `gate`, the build is published beside `current` first and only made current when the gate passes."""
    config = config or IndexConfig()
    started = time.perf_counter()
    timings: dict[str, float] = {}
    writer = BundleWriter(out)
    try:
        model_path = resolve_model_path(config.dense.model)
        encoder = None
        if config.dense.enabled:
            t = time.perf_counter()
            encoder = load_encoder(config.dense.model, config.dense.device, config.dense.runtime)
            timings["load_encoder"] = time.perf_counter() - t
            tokenizer = encoder.tokenizer
        else:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model_path)

        chunker = Chunker(tokenizer, config.chunking)
        report = ReadReport()
        documents = read_documents(Path(input_path), skip_bad=skip_bad, csv_columns=config.csv, report=report)
        docstore = DocstoreWriter(writer.root / DOCSTORE)
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
        if encoder is not None:
            t = time.perf_counter()
            with token_writer(writer.root, config) as tokens:
                vectors = encode_passages(encoder, index_texts, config.dense, show_progress, tokens)
                token_info = tokens.close() if tokens is not None else None
            timings["encode"] = time.perf_counter() - t
        dense_info = write_indexes(writer.root, index_texts, vectors, encoder, config, timings, show_progress)
        if token_info is not None:
            dense_info["token_vectors"] = token_info
        seconds = time.perf_counter() - started
        manifest = make_manifest(str(input_path), docstore, len(report.skipped), dense_info, config, seconds, timings)
        path = publish(writer, out, manifest, config, gate)
    except BaseException:
        writer.abort()
        raise
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
    encoder: Any,
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
    return {
        "enabled": True,
        "model": config.dense.model,
        "dimension": int(vectors.shape[1]),
        "normalize": config.dense.normalize,
        "max_seq_length": int(encoder.max_seq_length) if encoder is not None else None,
        "index_type": config.dense.index_type,
        "built_on": "gpu" if gpu_available() else "cpu",
        "encoded_on": pick_device(config.dense.device),
        "runtime": getattr(encoder, "sift_runtime", "torch") if encoder is not None else None,
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


def ensure_bundle(
    corpus: Path, out: Path, config: IndexConfig | None = None, rebuild: bool = False, show_progress: bool = False
) -> Path:
    """`out` as an index folder holding a bundle of `corpus`: opened as it is when it opens (checksums are
    not re-hashed), else (or with `rebuild`) built from `corpus` first. Used by `sift eval`, the benches and
    the tests, so "build unless it is there" is written once."""
    from indexer.bundle import BundleError, open_bundle

    if not rebuild:
        try:
            open_bundle(out, verify=False)
            return Path(out)
        except BundleError:
            pass
    build_bundle(corpus, out, config, show_progress=show_progress)
    return Path(out)
