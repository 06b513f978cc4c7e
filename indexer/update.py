"""`sift index update`: a new build from the current one, re-encoding only what changed.

    parent build ──► documents kept as they are (stored passages and vectors reused)
                 ──► deleted ids dropped; added or changed documents chunked and encoded
                 ──► docstore written anew from both, BM25 rebuilt over the whole corpus (its statistics are
                     corpus-wide), FAISS rebuilt from the vectors ──► manifest (parent, counts) ──► publish

It is the build pipeline (indexer/pipeline.py) over another corpus: kept documents carry their parent rows,
and the added/changed ones go through the same engine as a build's (`engine=`: local or Ray).

Invariants: the parent's index config (chunking, BM25, dense model) is used, never the caller's, so the
result equals a full build of the same final corpus with the parent's config (same passages, same BM25
scores, dense scores equal up to float rounding); kept documents keep their order, added ones follow in
input order; publishing is atomic and goes through the same quality gate and retention as a build.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from indexer.bundle import DOCSTORE, BundleError, BundleInfo, BundleWriter, open_bundle, update_lock
from indexer.chunking import Chunker
from indexer.config import recorded_config
from indexer.docstore import Docstore
from indexer.models import Document
from indexer.pipeline import (
    BuildResult,
    Entry,
    GateFn,
    LocalEncoding,
    Stored,
    carried,
    engine_record,
    make_manifest,
    publish,
    run_pipeline,
    stored_vectors,
)
from indexer.sources import ReadReport, SourceError, read_documents, record_document
from indexer.tokens import TokenForm, TokenStore

log = logging.getLogger(__name__)


def read_delete_ids(path: Path) -> set[str]:
    """One document id per line; blank lines and `#` comments ignored."""
    ids = set()
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            ids.add(line)
    return ids


class UpdatedCorpus:
    """The corpus of an update: the parent's documents minus deleted and changed ones, as stored (their parent
    rows kept), then the added and changed documents in input order, to be chunked and encoded."""

    def __init__(self, parent: Docstore, deleted: set[str], incoming: dict[str, Document]) -> None:
        self.parent = parent
        self.deleted = deleted
        self.incoming = incoming
        # documents sent again unchanged are kept as stored; the others are (re-)chunked, in input order
        self.fresh = dict(incoming)
        self.counts = {"kept": 0, "changed": 0, "added": 0, "deleted": len(deleted), "unchanged_resent": 0}
        for doc_id, new in incoming.items():
            old = parent.document(doc_id)
            if old is None:
                continue
            if new == Document(old["id"], old["title"], old["text"], old["metadata"]):
                del self.fresh[doc_id]
                self.counts["unchanged_resent"] += 1
            else:
                self.counts["changed"] += 1
        self.counts["added"] = len(self.fresh) - self.counts["changed"]
        self.counts["kept"] = parent.num_documents - len(deleted) - self.counts["changed"]
        self.chunks = bool(self.fresh)
        self.documents = self.counts["kept"] + len(self.fresh)

    def entries(self, chunker: Chunker | None) -> Iterator[Entry]:
        for document, passages, rows in self.parent.documents():
            if document.id not in self.deleted and document.id not in self.fresh:
                yield Entry(document, passages, rows)
        if self.fresh:
            assert chunker is not None
            for document, passages in chunker.chunk(self.fresh.values()):
                yield Entry(document, passages)

    def sizes(self, chunker: Chunker | None) -> list[int]:
        return [len(entry.passages) for entry in self.entries(chunker)]


def update_bundle(
    out: Path,
    add: Path | None = None,
    delete: Path | None = None,
    *,
    skip_bad: bool = False,
    show_progress: bool = True,
    gate: GateFn | None = None,
    engine: Any = None,
) -> BuildResult:
    """Write and publish a new build of `out` from its current one plus `add` (new or changed documents, any
    input format) minus the ids listed in `delete`. Added and changed passages are encoded by `engine` (default
    `LocalEncoding`; `indexer.ray_engine.RayEncoding` on Ray), kept ones reuse the parent's vectors. Runs under
    the folder's update lock (another update, or the server applying ingested batches, finishes first)."""
    if add is None and delete is None:
        raise SourceError("nothing to do: pass --add FILE and/or --delete IDS_FILE")
    with update_lock(out, on_wait=lambda: log.info("waiting for another update of %s to finish", out)):
        parent = _parent(out)
        config = recorded_config(parent.manifest)
        report = ReadReport()
        incoming: dict[str, Document] = {}
        if add is not None:
            for document in read_documents(Path(add), skip_bad=skip_bad, csv_columns=config.csv, report=report):
                incoming[document.id] = document
        deleted = read_delete_ids(delete) if delete is not None else set()
        return _derive(
            out,
            parent,
            incoming,
            deleted,
            source=str(add) if add else parent.manifest.get("source"),
            unknown_deletes=f"{delete}",
            report=report,
            show_progress=show_progress,
            gate=gate,
            engine=engine,
        )


def apply_ingest(
    out: Path, max_documents: int | None = None, *, show_progress: bool = False, engine: Any = None
) -> BuildResult | None:
    """Apply the index folder's pending ingest batches (`indexer.ingest`) as one update: every batch numbered
    above the current build's `ingest.applied_seq`, whole batches up to `max_documents` items, folded (the
    last operation on an id wins), published with the highest number applied, then trimmed from the log.
    Deleting an id the build does not hold does nothing. None when nothing is pending. Runs under the update
    lock, so a concurrent `sift index update` or apply waits, and a replay after a crash between publish and
    trim finds nothing left to do (the numbers are in the published manifest)."""
    from indexer.ingest import IngestLog, applied_seq, fold

    log_ = IngestLog(out)
    with update_lock(out):
        parent = _parent(out)
        applied = applied_seq(parent.manifest)
        batches = log_.pending(applied, max_documents)
        if not batches:
            log_.trim(applied)
            return None
        changes = fold(batches)
        incoming: dict[str, Document] = {}
        for doc_id, record in changes.upserts.items():
            document = record_document(f"ingest batch (document {doc_id!r})", record)
            if isinstance(document, SourceError):  # validated when accepted: a batch changed on disk
                raise document
            incoming[document.id] = document
        ingest = {
            "applied_seq": changes.through,
            "batches": changes.batches,
            "oldest_accepted_at": changes.oldest_accepted_at,
            "applied_at": time.time(),
        }
        result = _derive(
            out,
            parent,
            incoming,
            changes.deletes,
            source=parent.manifest.get("source"),
            unknown_deletes=None,
            report=ReadReport(),
            show_progress=show_progress,
            gate=None,
            engine=engine,
            ingest=ingest,
        )
        log_.trim(changes.through)
        return result


def _parent(out: Path) -> BundleInfo:
    parent = open_bundle(out, verify=True)
    if parent.manifest.get("shards"):
        raise BundleError(
            f"{parent.root} is a sharded build: `sift index update` works on unsharded builds; build the new corpus "
            "with `sift index build --shards N`, or update an unsharded build and `sift index reshard` it"
        )
    return parent


def _derive(
    out: Path,
    parent: BundleInfo,
    incoming: dict[str, Document],
    deleted: set[str],
    *,
    source: str | None,
    unknown_deletes: str | None,
    report: ReadReport,
    show_progress: bool,
    gate: GateFn | None,
    engine: Any,
    ingest: dict[str, Any] | None = None,
) -> BuildResult:
    """The child build of `parent` with `incoming` added or replacing and `deleted` removed, published into
    `out`. Deleted ids the parent lacks are an error naming `unknown_deletes` (the ids file), or dropped when it
    is None. The manifest carries the parent's ingest record forward unless `ingest` replaces it."""
    engine = engine or LocalEncoding()
    started = time.perf_counter()
    config = recorded_config(parent.manifest)
    timings: dict[str, float] = {}
    parent_store = Docstore(parent.path(DOCSTORE), connections=1)
    try:
        known = parent_store.document_ids()
        unknown = sorted(deleted - known)
        if unknown and unknown_deletes is not None:
            raise SourceError(
                f"{unknown_deletes}: {len(unknown)} id(s) not in build {parent.build_id}, e.g. {unknown[:3]}"
            )
        deleted = deleted & known
        both = sorted(deleted & incoming.keys())
        if both:
            raise SourceError(f"ids both added and deleted: {both[:3]}; an added document replaces an existing one")
        parent_dense = parent.manifest.get("dense") or {}
        dense = bool(config.dense.enabled and parent_dense.get("enabled"))
        token_dtype = config.dense.token_vectors if dense else None
        parent_tokens = TokenStore.of_bundle(parent) if token_dtype else None
        stored = Stored(stored_vectors(parent.root, config.dense.index_type) if dense else None, parent_tokens)
        token_form = TokenForm.planned(config.dense, parent_tokens) if dense else None
        corpus = UpdatedCorpus(parent_store, deleted, incoming)
        writer = BundleWriter(out)
        try:
            written = run_pipeline(
                writer.root,
                corpus,
                config,
                engine,
                build_id=writer.build_id,
                dense=dense,
                token_form=token_form,
                stored=stored,
                # nothing to encode (only deletions, or documents sent again unchanged): the parent's encoding
                unencoded={
                    "max_seq_length": parent_dense.get("max_seq_length"),
                    "runtime": parent_dense.get("runtime"),
                    "device": parent_dense.get("encoded_on"),
                },
                timings=timings,
                show_progress=show_progress,
                empty="the update would leave no documents; refusing to publish an empty build",
            )
            seconds = time.perf_counter() - started
            update = {**corpus.counts, "passages_encoded": written.encoded, "passages_reused": written.reused}
            manifest = make_manifest(
                source,
                written.documents,
                written.passages,
                len(report.skipped),
                written.dense,
                config,
                seconds,
                timings,
                parent=parent.build_id,
                engine=engine_record(engine, written.encoding),
                update=update,
            )
            manifest["build"]["kind"] = "update" if ingest is None else "ingest"
            carried_ingest = ingest if ingest is not None else parent.manifest.get("ingest")
            if carried_ingest is not None:
                manifest["ingest"] = carried_ingest
            manifest.update(carried(parent.manifest))  # the collection's own choices (`indexer.build.CARRIED`)
            path = publish(writer, out, manifest, config, gate)
        except BaseException:
            writer.abort()
            raise
    finally:
        engine.close()
        parent_store.close()
    log.info("update %s", json.dumps(manifest["update"]))
    return BuildResult(
        path=path,
        build_id=writer.build_id,
        documents=written.documents,
        passages=written.passages,
        seconds=seconds,
        skipped=report.skipped,
        timings=timings,
    )


__all__ = ["BundleError", "apply_ingest", "read_delete_ids", "stored_vectors", "update_bundle"]
