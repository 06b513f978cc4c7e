"""The build job: documents → passages → docstore, BM25 and dense index → manifest → atomic publish.

`build_bundle()` is what the CLI and a batch runner call; it holds no global state, so many builds may run
side by side (each writes its own temporary folder). It, `reshard_bundle()` here and `update_bundle()`
(indexer/update.py) are three uses of one pipeline (indexer/pipeline.py) that differ only in what they read.
`annotate_bundle()` republishes a build unchanged but for one manifest record (a per-collection choice made
after the build, e.g. `sift reranker choose`); updates and reshards carry such records forward
(`indexer.pipeline.CARRIED`).
"""

from __future__ import annotations

import logging
import platform
import time
from pathlib import Path
from typing import Any

from indexer import __version__
from indexer.bundle import CURRENT, DOCSTORE, BundleError, BundleWriter, link_tree, now_iso, open_bundle, update_lock
from indexer.config import IndexConfig, recorded_config
from indexer.docstore import Docstore
from indexer.pipeline import (
    CARRIED,
    BuildResult,
    GateFn,
    GateRefused,
    LocalEncoding,
    ParentCorpus,
    SourceCorpus,
    Stored,
    carried,
    engine_record,
    make_manifest,
    publish,
    run_pipeline,
    stored_vectors,
)
from indexer.shards import MAX_SHARDS
from indexer.tokens import TokenForm, TokenStore

log = logging.getLogger(__name__)

_SEALED = ("files", "build_id", "format_version")  # what sealing writes: never annotated

__all__ = [
    "BuildResult",
    "GateFn",
    "GateRefused",
    "LocalEncoding",
    "annotate_bundle",
    "build_bundle",
    "convert_tokens",
    "ensure_bundle",
    "reshard_bundle",
]


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
    `shards` > 1 writes a sharded build (`indexer.shards`), streamed shard by shard; `engine` encodes the
    passages (default `LocalEncoding`; `indexer.ray_engine.RayEncoding` on Ray). Everything else is the same
    for every engine."""
    config = config or IndexConfig()
    if not 1 <= shards <= MAX_SHARDS:
        raise ValueError(f"--shards must be between 1 and {MAX_SHARDS}, not {shards}")
    engine = engine or LocalEncoding()
    started = time.perf_counter()
    timings: dict[str, float] = {}
    corpus = SourceCorpus(Path(input_path), config, skip_bad=skip_bad, count=show_progress)
    writer = BundleWriter(out)
    try:
        written = run_pipeline(
            writer.root,
            corpus,
            config,
            engine,
            build_id=writer.build_id,
            shards=shards,
            token_form=TokenForm.planned(config.dense),
            timings=timings,
            show_progress=show_progress,
            empty=f"{input_path}: no documents to index",
        )
        seconds = time.perf_counter() - started
        encoding = written.encoding if config.dense.enabled else {"engine": engine.name}
        extra: dict[str, Any] = {"engine": engine_record(engine, encoding)}
        if written.shards is not None:
            extra["shards"] = written.shards
        manifest = make_manifest(
            str(input_path),
            written.documents,
            written.passages,
            len(corpus.report.skipped),
            written.dense,
            config,
            seconds,
            timings,
            **extra,
        )
        path = publish(writer, out, manifest, config, gate)
    except BaseException:
        engine.close()
        writer.abort()
        raise
    for reason in corpus.report.skipped:
        log.warning("skipped: %s", reason)
    return BuildResult(
        path=path,
        build_id=writer.build_id,
        documents=written.documents,
        passages=written.passages,
        seconds=seconds,
        skipped=corpus.report.skipped,
        timings=timings,
    )


def reshard_bundle(source: Path, out: Path, shards: int, show_progress: bool = True) -> BuildResult:
    """Split a published unsharded build into `shards` shards without re-encoding: passages and documents from
    its docstore, exact float32 vectors from its flat FAISS index (the float16 copy otherwise, logged), token
    vectors copied as stored (a pq codebook kept); BM25 is recomputed per shard with corpus-wide statistics.
    The result is a new build under `out`, published atomically (its manifest names the source build)."""
    return _rewrite(source, out, shards, None, show_progress)


def convert_tokens(source: Path, out: Path, form: TokenForm, show_progress: bool = True) -> BuildResult:
    """A copy of a published unsharded build whose token vectors are re-encoded from their stored form into
    `form` (e.g. int8 → pq) without running the model; everything else is copied as `reshard_bundle` copies it
    (one shard). The new build's recorded config names the new form, so later updates keep it."""
    return _rewrite(source, out, 1, form, show_progress)


def _rewrite(source: Path, out: Path, shards: int, form: TokenForm | None, show_progress: bool) -> BuildResult:
    """The job behind `reshard_bundle` and `convert_tokens`: the parent's entries through the build pipeline
    into `shards` shards, token vectors in `form` (None: the parent's own, codebook kept)."""
    parent = open_bundle(source, verify=True)
    if parent.manifest.get("shards"):
        raise BundleError(f"{parent.root} is already sharded; start from its unsharded source instead")
    config = recorded_config(parent.manifest)
    dense_info = dict(parent.manifest.get("dense") or {"enabled": False})
    dense = bool(dense_info.get("enabled"))
    token_dtype = (dense_info.get("token_vectors") or {}).get("dtype") if dense else None
    if form is not None and not token_dtype:
        raise BundleError(
            f"{parent.root} stores no token vectors to convert; rebuild it with index.dense.token_vectors"
        )
    recorded = dict(parent.manifest["config"])
    if form is not None:
        recorded["dense"] = {
            **recorded.get("dense", {}),
            "token_vectors": form.dtype,
            "token_pq_m": form.m,
            "token_pq_rotate": form.rotate,
        }
        config = IndexConfig.model_validate(recorded)
    kind = "reshard" if form is None else "convert"
    started = time.perf_counter()
    writer = BundleWriter(out)
    store = Docstore(parent.path(DOCSTORE), connections=1)
    try:
        vectors = None
        if dense:
            if config.dense.index_type != "flat":
                log.warning(
                    "%s: %s index; shards get the float16 copy of the vectors", parent.root, config.dense.index_type
                )
            vectors = stored_vectors(parent.root, config.dense.index_type)
        tokens = TokenStore.of_bundle(parent, store.num_passages) if token_dtype else None
        timings: dict[str, float] = {}
        t = time.perf_counter()
        written = run_pipeline(
            writer.root,
            ParentCorpus(store),
            config,
            LocalEncoding(),  # never started: every passage is kept
            build_id=writer.build_id,
            shards=shards,
            dense=dense,
            token_form=form or (TokenForm.of(tokens) if tokens is not None else None),
            stored=Stored(vectors, tokens),
            dense_info={k: v for k, v in dense_info.items() if k != "token_vectors"},
            timings=timings,
            show_progress=show_progress,
        )
        del vectors, tokens
        timings["convert" if form else "shards"] = time.perf_counter() - t
        seconds = time.perf_counter() - started
        counts = parent.manifest["counts"]
        manifest = {
            "sift_version": __version__,
            "created_at": now_iso(),
            "source": parent.manifest.get("source"),
            "parent": parent.build_id,
            "counts": counts,
            "tokenizer": parent.manifest.get("tokenizer"),
            "dense": written.dense,
            "config": recorded,
            "engine": {"name": kind},
            "build": {"seconds": round(seconds, 3), "timings": timings, "host": platform.node(), "kind": kind},
        }
        if written.shards is not None:
            manifest["shards"] = written.shards
        manifest.update(carried(parent.manifest))
        path = publish(writer, out, manifest, config, None)
    except BaseException:
        writer.abort()
        raise
    finally:
        store.close()
    return BuildResult(path, writer.build_id, counts["documents"], counts["passages"], seconds, timings=timings)


def annotate_bundle(out: Path, key: str, value: Any, expected: str | None = None) -> BuildResult:
    """Publish a new build of the index folder `out` that is its current build with `value` recorded as
    `manifest[key]` (a `CARRIED` key), and switch `current` to it. The data files are hard links to the current
    build's (published files are never written again; copied where the file system cannot link), the manifest
    is sealed afresh (checksums verified first), and the whole runs under the folder's update lock, so an
    update or an ingest lands before or after it, never across it. A running server reloads the new build as
    it does any other. `out` must be an index folder (with `current`); with `expected`, its current build must
    still be that one (a choice made on a build is not recorded on another that replaced it meanwhile)."""
    if key not in CARRIED:
        raise ValueError(f"manifest record {key!r} cannot be annotated; one of {CARRIED}")
    if not (Path(out) / CURRENT).exists():
        raise BundleError(f"{out} is not an index folder (no `{CURRENT}`): pass the folder `sift index build` wrote")
    started = time.perf_counter()
    with update_lock(out, on_wait=lambda: log.info("waiting for another update of %s to finish", out)):
        parent = open_bundle(out, verify=True)
        if expected is not None and parent.build_id != expected:
            raise BundleError(
                f"{out} now serves build {parent.build_id}, not {expected} that the record was made on "
                "(it was updated meanwhile): run the command again"
            )
        writer = BundleWriter(out)
        try:
            link_tree(parent.root, writer.root)  # the data files shared; the manifest is sealed afresh below
            manifest = {k: v for k, v in parent.manifest.items() if k not in _SEALED}
            manifest.update({key: value, "parent": parent.build_id, "created_at": now_iso()})
            manifest["build"] = {**(manifest.get("build") or {}), "kind": f"annotate:{key}"}
            path = publish(writer, out, manifest, recorded_config(parent.manifest), None)
        except BaseException:
            writer.abort()
            raise
    counts = parent.manifest["counts"]
    seconds = time.perf_counter() - started
    return BuildResult(path, writer.build_id, counts["documents"], counts["passages"], seconds, timings={})


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
