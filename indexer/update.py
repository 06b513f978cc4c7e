"""`sift index update`: a new build from the current one, re-encoding only what changed.

    parent build ──► documents kept as they are (stored passages and vectors reused)
                 ──► deleted ids dropped; added or changed documents chunked and encoded
                 ──► docstore written anew from both, BM25 rebuilt over the whole corpus (its statistics are
                     corpus-wide), FAISS rebuilt from the vectors ──► manifest (parent, counts) ──► publish

Invariants: the parent's index config (chunking, BM25, dense model) is used, never the caller's, so the
result equals a full build of the same final corpus with the parent's config (same passages, same BM25
scores, dense scores equal up to float rounding); kept documents keep their order, added ones follow in
input order; publishing is atomic and goes through the same quality gate and retention as a build.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from indexer.build import BuildResult, GateFn, make_manifest, publish, token_writer, write_indexes
from indexer.bundle import DENSE_DIR, DOCSTORE, BundleError, BundleWriter, open_bundle
from indexer.chunking import Chunker
from indexer.config import recorded_config
from indexer.dense import EMBEDDINGS_FILE, INDEX_FILE
from indexer.docstore import Docstore, DocstoreWriter
from indexer.encoders import encode_passages, load_encoder, resolve_model_path
from indexer.models import Document, passage_index_text
from indexer.sources import ReadReport, SourceError, read_documents
from indexer.tokens import TokenStore

log = logging.getLogger(__name__)


def read_delete_ids(path: Path) -> set[str]:
    """One document id per line; blank lines and `#` comments ignored."""
    ids = set()
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            ids.add(line)
    return ids


def stored_vectors(root: Path, index_type: str) -> np.ndarray:
    """The parent's passage vectors: exact float32 from a flat FAISS index, else the float16 copy."""
    import faiss

    if index_type == "flat":
        index = faiss.read_index(str(root / DENSE_DIR / INDEX_FILE))
        return index.reconstruct_n(0, index.ntotal).astype(np.float32)
    return np.load(root / DENSE_DIR / EMBEDDINGS_FILE).astype(np.float32)


def update_bundle(
    out: Path,
    add: Path | None = None,
    delete: Path | None = None,
    *,
    skip_bad: bool = False,
    show_progress: bool = True,
    gate: GateFn | None = None,
) -> BuildResult:
    """Write and publish a new build of `out` from its current one plus `add` (new or changed documents, any
    input format) minus the ids listed in `delete`."""
    if add is None and delete is None:
        raise SourceError("nothing to do: pass --add FILE and/or --delete IDS_FILE")
    started = time.perf_counter()
    parent = open_bundle(out, verify=True)
    if parent.manifest.get("shards"):
        raise BundleError(
            f"{parent.root} is a sharded build: `sift index update` works on unsharded builds; build the new corpus "
            "with `sift index build --shards N`, or update an unsharded build and `sift index reshard` it"
        )
    config = recorded_config(parent.manifest)
    timings: dict[str, float] = {}
    report = ReadReport()
    incoming: dict[str, Document] = {}
    if add is not None:
        for document in read_documents(Path(add), skip_bad=skip_bad, csv_columns=config.csv, report=report):
            incoming[document.id] = document
    deleted = read_delete_ids(delete) if delete is not None else set()
    parent_store = Docstore(parent.path(DOCSTORE), connections=1)
    unknown = sorted(deleted - parent_store.document_ids())
    if unknown:
        raise SourceError(f"{delete}: {len(unknown)} id(s) not in build {parent.build_id}, e.g. {unknown[:3]}")
    both = sorted(deleted & incoming.keys())
    if both:
        raise SourceError(f"ids both added and deleted: {both[:3]}; an added document replaces an existing one")

    dense = config.dense.enabled and (parent.manifest.get("dense") or {}).get("enabled")
    old_vectors = stored_vectors(parent.root, config.dense.index_type) if dense else None
    writer = BundleWriter(out)
    try:
        docstore = DocstoreWriter(writer.root / DOCSTORE)
        index_texts: list[str] = []
        kept_rows: list[int] = []
        counts = {"kept": 0, "changed": 0, "added": 0, "deleted": len(deleted), "unchanged_resent": 0}
        t = time.perf_counter()
        for document, passages, rows in parent_store.documents():
            if document.id in deleted:
                continue
            new = incoming.get(document.id)
            if new is not None and new != document:
                counts["changed"] += 1
                continue  # re-chunked below, with the added documents
            if new is not None:
                counts["unchanged_resent"] += 1
                del incoming[document.id]
            docstore.add(document, passages)
            index_texts.extend(passage_index_text(document.title, p.text) for p in passages)
            kept_rows.extend(rows)
            counts["kept"] += 1
        counts["added"] = len(incoming) - counts["changed"]
        encoder = load_encoder(config.dense.model, config.dense.device, config.dense.runtime) if dense else None
        if encoder is not None:
            tokenizer = encoder.tokenizer
        else:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(config.dense.model))
        new_texts: list[str] = []
        with tqdm(total=len(incoming), desc="chunk new", unit="doc", disable=not show_progress) as bar:
            for document, passages in Chunker(tokenizer, config.chunking).chunk(incoming.values()):
                docstore.add(document, passages)
                new_texts.extend(passage_index_text(document.title, p.text) for p in passages)
                bar.update(1)
        docstore.close()
        timings["copy_chunk"] = time.perf_counter() - t
        if docstore.document_count == 0:
            raise SourceError("the update would leave no documents; refusing to publish an empty build")
        vectors, token_info = None, None
        if encoder is not None:
            t = time.perf_counter()
            with token_writer(writer.root, config) as tokens:
                if tokens is not None:  # kept passages' token vectors are copied as stored, new ones follow
                    tokens.add_stored(
                        TokenStore.open(parent.path(DENSE_DIR), parent.manifest["counts"]["passages"]), kept_rows
                    )
                fresh = encode_passages(encoder, new_texts, config.dense, show_progress, tokens) if new_texts else None
                token_info = tokens.close() if tokens is not None else None
            timings["encode"] = time.perf_counter() - t
            kept = old_vectors[np.asarray(kept_rows, dtype=np.int64)] if kept_rows else None
            vectors = np.concatenate([v for v in (kept, fresh) if v is not None]).astype(np.float32)
        encoding = (
            {"max_seq_length": int(encoder.max_seq_length), "runtime": getattr(encoder, "sift_runtime", "torch")}
            if encoder is not None
            else {}
        )
        dense_info = write_indexes(
            writer.root, index_texts + new_texts, vectors, encoding, config, timings, show_progress
        )
        if token_info is not None:
            dense_info["token_vectors"] = token_info
        seconds = time.perf_counter() - started
        manifest = make_manifest(
            str(add) if add else parent.manifest.get("source"),
            docstore,
            len(report.skipped),
            dense_info,
            config,
            seconds,
            timings,
            parent=parent.build_id,
            update={**counts, "passages_encoded": len(new_texts), "passages_reused": len(kept_rows)},
        )
        manifest["build"]["kind"] = "update"
        path = publish(writer, out, manifest, config, gate)
    except BaseException:
        writer.abort()
        raise
    finally:
        parent_store.close()
    log.info("update %s", json.dumps(manifest["update"]))
    return BuildResult(
        path=path,
        build_id=writer.build_id,
        documents=docstore.document_count,
        passages=docstore.passage_count,
        seconds=seconds,
        skipped=report.skipped,
        timings=timings,
    )


__all__ = ["BundleError", "read_delete_ids", "update_bundle"]
