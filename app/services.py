"""The composition root: the one place that builds what Sift serves from settings.

    Models.load(settings)            warm-up: reranker, generator, reader (once per process, shared)
    load_pipeline(settings, bundle)  one build's stages: docstore, BM25, dense (bi-encoder reused), reranker
    Collection                       one named index folder; holds the served build, reloads the next one
    Services                         every collection + the shared models; what the HTTP layer is handed

`create_app`, `sift serve`, `sift eval`, `bench/` and the tests all get their parts from here; nothing else
constructs stages.

Reload invariants (a `Collection`):
- a new build is loaded *beside* the served one and swapped in with one assignment on the event loop;
- a request holds the build it started on (`use()`) until it ends, streamed responses included;
- a replaced build is closed (and its lease released) once its last request ends;
- a build that fails to load (missing or corrupt file, checksum mismatch, another model or dimension)
  leaves the served build in place; the error is kept for `/readyz` and `/v1/info` and counted;
- every served build holds a `BuildLease`, so `sift index prune` never deletes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.answering import Answerer
from app.classifying import Classifier
from app.engine import Engine
from app.generation import load_generator
from app.generation.pool import GenerationPool
from app.ingesting import Ingestor
from app.pipeline import Pipeline
from app.retrieval import BM25Searcher, DenseSearcher
from app.retrieval.cache import QueryCache
from app.retrieval.calibration import SharedCalibrations, calibrate
from app.retrieval.dense import query_encoder
from app.retrieval.maxsim import LateInteraction, MaxSimReranker, is_maxsim
from app.retrieval.protocols import (
    DenseRetriever,
    DocstoreReader,
    Retriever,
    TextReranker,
    TokenStoreReader,
    VectorIndex,
)
from app.retrieval.reranker import MicroBatcher, Reranker, model_name
from app.retrieval.shards import ShardedDenseSearcher, ShardedDocstore, ShardedSearcher, ShardedTokenStore, ShardFanout
from app.settings import Settings
from app.threads import release_sessions, share_cores
from app.tracing import Tracer
from indexer.bundle import (
    CURRENT,
    DENSE_DIR,
    DOCSTORE,
    BuildLease,
    BundleError,
    BundleInfo,
    open_bundle,
    resolve_bundle,
)
from indexer.docstore import Docstore
from indexer.shards import shard_map
from indexer.tokens import TokenStore, TokenStoreError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from app.serving_ray import RemoteShards

log = logging.getLogger("sift.services")

DEFAULT_COLLECTION = "default"


class UnknownCollection(LookupError):
    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"unknown collection {name!r}; known collections: {known}")
        self.name, self.known = name, known


class NotReady(RuntimeError):
    pass


@dataclass
class Models:
    """Bundle-independent parts, loaded once per process and shared by every build and collection: the
    models, and the tracer every pipeline reports its stages to."""

    reranker: TextReranker | None = None  # Reranker | MaxSimReranker | None
    generator: Any = None  # Generator | None
    reader: Any = None  # ExtractiveReader | None
    encoders: dict[str, SentenceTransformer] = field(default_factory=dict)  # bi-encoders by model name
    tracer: Tracer = field(default_factory=Tracer)  # off unless settings.tracing (or a test) says otherwise
    generation: GenerationPool = field(default_factory=lambda: GenerationPool(4))  # answers' own threads
    queries: QueryCache | None = None  # query embeddings, shared by every build and collection
    loaded_in: int | None = None  # pid of the process that loaded the models (a pre-fork master, or this one)
    spin_wait: bool | None = None  # ONNX Runtime's spin-wait policy once `warm_up` set it (app/threads.py)
    shards: RemoteShards | None = None  # where a sharded build's shards live: None = this process
    # pre-fork workers: one second-stage calibration per build, measured by the first worker that loads it
    calibrations: SharedCalibrations | None = None
    # one micro-batcher per reranker model: every build and collection of the process queues its pairs there
    batchers: dict[int, MicroBatcher] = field(default_factory=dict)

    def batcher(self, reranker: TextReranker | None, settings: Settings) -> MicroBatcher | None:
        """The process's micro-batcher of `reranker` (made on first use; None without a reranker), so that
        `reranker.max_queued_pairs` bounds the model, not each build's queue."""
        if reranker is None:
            return None
        batcher = self.batchers.get(id(reranker))
        if batcher is None:
            rs = settings.reranker
            batcher = MicroBatcher(reranker, rs.max_batch_size, rs.max_wait_ms, rs.max_queued_pairs)
            self.batchers[id(reranker)] = batcher
        return batcher

    async def close(self) -> None:
        """Stop the micro-batchers (after every pipeline using them closed) and the answer threads."""
        for batcher in self.batchers.values():
            await batcher.close()
        self.batchers.clear()

    def query_cache(self, settings: Settings) -> QueryCache:
        """The process's query-embedding cache (`runtime.query_cache_size` vectors; 0: none kept, though the
        queries' token vectors still pass from a search's first stage to its MaxSim through it)."""
        if self.queries is None:
            self.queries = QueryCache(settings.runtime.query_cache_size)
        return self.queries

    @classmethod
    def load(cls, settings: Settings, generator: bool = True, reader: bool = True) -> Models:
        """Warm-up: load the configured reranker, generator and reader (MaxSim's encoder is shared with the
        bundle's bi-encoder when it is the same model; see `encoder`)."""
        return cls().warm_up(settings, generator, reader)

    def warm_up(
        self, settings: Settings, generator: bool = True, reader: bool = True, fork_safe: bool = False
    ) -> Models:
        """Load the configured models into this instance (which collections already hold). `fork_safe`: this
        is a pre-fork master; torch runs single-threaded here (a child cannot use an OpenMP pool its parent
        started: it hangs), and each worker sets its own threads in `after_fork`."""
        import torch

        if fork_safe:
            torch.set_num_threads(1)
        elif settings.runtime.threads:  # torch's intra-op threads, set once per process before any model runs
            torch.set_num_threads(settings.runtime.threads)
        self.loaded_in = os.getpid()
        spec, device = settings.reranker.model, settings.reranker.device or settings.device
        if spec:
            if is_maxsim(spec):
                name = MaxSimReranker.model_name(spec)
                self.reranker = MaxSimReranker.load(
                    spec, settings.reranker.max_length, device, encoder=self.encoder(name, settings)
                )
            else:
                runtime = settings.runtime
                self.reranker = Reranker.load(
                    spec,
                    settings.reranker.max_length,
                    device,
                    runtime=runtime.reranker,
                    cache_dir=runtime.cache_dir,
                    threads=runtime.threads,
                )
        if generator and settings.answer.mode != "extractive":  # extractive answers need no generator
            self.generator = load_generator(settings.generator, settings.device)
        if reader and settings.answer.mode != "generative" and settings.answer.reader:
            from app.generation.reader import ExtractiveReader

            runtime = settings.runtime
            self.reader = ExtractiveReader.load(
                settings.answer.reader,
                settings.device,
                runtime=runtime.reader,
                cache_dir=runtime.cache_dir,
                threads=runtime.threads,
            )
        # one thread policy for the runtimes sharing these cores (app/threads.py), before any request runs;
        # bi-encoders loaded later (`encoder`) get it as they load
        self.spin_wait = settings.runtime.spin_wait
        applied = share_cores(self.loaded(), settings.runtime.spin_wait, settings.runtime.blas_threads)
        log.info("thread policy", extra=applied)
        return self

    def loaded(self) -> list[Any]:
        """Every model this process holds (those that may run on ONNX Runtime)."""
        return [self.reranker, self.reader, *self.encoders.values()]

    def release_sessions(self) -> int:
        """Free the models' ONNX Runtime sessions (a pre-fork master, before forking); each reopens on use."""
        return release_sessions(self.loaded())

    def after_fork(self, settings: Settings) -> None:
        """In a worker forked from the master that loaded the models: its own torch threads, `runtime.threads`
        (the pre-fork server sets it per worker; ONNX Runtime sessions reopen themselves on first use)."""
        import torch

        torch.set_num_threads(settings.runtime.threads or os.cpu_count() or 1)

    def encoder(self, name: str, settings: Settings) -> SentenceTransformer:
        """The bi-encoder `name`, loaded once per process with the query runtime of `settings`."""
        if name not in self.encoders:
            from indexer.encoders import load_encoder

            runtime = settings.runtime
            self.encoders[name] = load_encoder(
                name, settings.device, runtime.queries, runtime.threads, runtime.cache_dir
            )
            if self.spin_wait is not None:  # the process's thread policy, once set by `warm_up`
                share_cores([self.encoders[name]], self.spin_wait, None)
        return self.encoders[name]


def load_pipeline(
    settings: Settings, bundle: Path | None = None, models: Models | None = None, verify: bool = True
) -> Pipeline:
    """Open and verify a bundle (default `settings.bundle`) and build its pipeline. Models in `models` are
    reused (the bi-encoder when the bundle names the same model); without it the configured reranker is
    loaded for this pipeline alone. A sharded build gets the same pipeline over the fan-out of
    `app.retrieval.shards` (the same stages and results as the unsharded build; see `indexer.shards`)."""
    t = time.perf_counter()
    models = models if models is not None else Models.load(settings, generator=False, reader=False)
    info = open_bundle(bundle or settings.bundle, verify=verify)
    tokens = bool(settings.reranker.maxsim and settings.reranker.model)  # `model: null` turns the second stage off
    dense_info = info.manifest.get("dense") or {}
    encoder = models.encoder(dense_info["model"], settings) if dense_info.get("enabled") else None
    docstore: DocstoreReader
    bm25: Retriever
    dense: DenseRetriever | None
    store: TokenStoreReader | None
    if info.manifest.get("shards"):
        docstore, bm25, dense, store = _sharded(settings, info, models, encoder, tokens)
    else:
        parts = open_parts(info, encoder, models.query_cache(settings), tokens)
        docstore, bm25, dense, store = parts.docstore, parts.bm25, parts.dense, parts.tokens
    searchers = {"bm25": bm25, **({"dense": dense} if dense is not None else {})}
    late = late_interaction(info.build_id, dense, store) if tokens else None
    reranker = models.reranker
    if late is not None and is_maxsim(settings.reranker.model):
        reranker = None  # `model: maxsim` with `maxsim: true`: the bundle's MaxSim stage replaces re-encoding
    choice = collection_second_stage(info, settings)
    if choice is not None:  # the collection's own depth and weights (a stage weighed 0 still scores: its score
        # is what /v1/rerank, explain and the answer gate read, but it moves no hit)
        rs = settings.reranker
        chosen = {"depth": min(int(choice["depth"]), rs.max_depth), "weights": dict(choice["weights"])}
        settings = settings.model_copy(update={"reranker": rs.model_copy(update=chosen)})
    log.info(
        "pipeline ready",
        extra={"build": info.build_id, "searchers": list(searchers), "seconds": round(time.perf_counter() - t, 3)},
    )
    batcher = models.batcher(reranker, settings)
    pipeline = Pipeline(info, docstore, searchers, reranker, settings, models.tracer, late, batcher)
    pipeline.collection_choice = choice
    return pipeline


def collection_second_stage(info: BundleInfo, settings: Settings) -> dict[str, Any] | None:
    """The second stage chosen for this collection (`sift reranker choose`, the build manifest's
    `second_stage`) when it applies here: `reranker.per_collection` on, chosen with the configured cross-encoder
    (by name) and MaxSim configured to run if it weighs MaxSim above 0; else None (logged), and the configured
    `reranker.depth` and `reranker.weights` serve the collection."""
    record = info.manifest.get("second_stage")
    rs = settings.reranker
    if not record or not rs.per_collection:
        return None
    if rs.model is None or is_maxsim(rs.model) or record.get("reranker") != model_name(rs.model):
        log.warning(
            "second stage chosen for the collection is not applied: chosen with another reranker",
            extra={"build": info.build_id, "chosen_with": record.get("reranker"), "configured": rs.model},
        )
        return None
    if (record.get("weights") or {}).get("maxsim", 0) > 0 and not rs.maxsim:
        log.warning(
            "second stage chosen for the collection is not applied: it uses MaxSim, which reranker.maxsim turns off",
            extra={"build": info.build_id},
        )
        return None
    return dict(record)


@dataclass(frozen=True)
class LocalParts:
    """One bundle (a whole build, or one shard of a sharded one) opened in this process: its docstore, BM25 and
    dense searchers (rows are the bundle's own) and its token vectors (None: not stored or not asked for)."""

    docstore: Docstore
    bm25: BM25Searcher
    dense: DenseSearcher | None = None
    tokens: TokenStore | None = None


@dataclass(frozen=True)
class BundleParts:
    """What the fan-out of a sharded build reads from one shard, opened in this process (`LocalParts`) or
    behind a Ray Serve deployment (`app.serving_ray.RemoteShards`): the stage interfaces only."""

    docstore: DocstoreReader
    bm25: Retriever
    dense: VectorIndex | None = None
    tokens: TokenStoreReader | None = None


def open_parts(
    info: BundleInfo,
    encoder: SentenceTransformer | None = None,
    cache: QueryCache | None = None,
    tokens: bool = True,
) -> LocalParts:
    """Open a bundle's parts in this process (BM25 and FAISS memory-mapped, the docstore read-only). Without
    an `encoder` the dense searcher only searches vectors (a shard behind a fan-out). With `tokens`, the
    stored token vectors are opened and checked (a corrupt or mismatched store refuses the bundle)."""
    store = Docstore(info.path(DOCSTORE))
    rows = store.passage_rows()
    pids, dids = [r[0] for r in rows], [r[1] for r in rows]
    bm25 = BM25Searcher.from_bundle(info, pids, dids)
    if not (info.manifest.get("dense") or {}).get("enabled"):
        return LocalParts(store, bm25)
    if encoder is None:
        dense = DenseSearcher.vectors_only(info, pids, dids)
    else:
        dense = DenseSearcher.from_bundle(info, pids, dids, encoder=encoder, cache=cache, query_tokens=tokens)
    directory = info.path(DENSE_DIR)
    stored = None
    if tokens and TokenStore.exists(directory):
        try:
            stored = TokenStore.of_bundle(info, len(pids))
        except TokenStoreError as exc:
            raise BundleError(f"{info.root}: {exc}") from exc
    return LocalParts(store, bm25, dense, stored)


def _sharded(
    settings: Settings, info: BundleInfo, models: Models, encoder: SentenceTransformer | None, tokens: bool
) -> tuple[ShardedDocstore, ShardedSearcher, ShardedDenseSearcher | None, ShardedTokenStore | None]:
    """A sharded build's docstore, retrievers (BM25, dense) and token store behind one fan-out. Shards are
    opened in this process, or reached through `models.shards` (Ray Serve deployments). Queries are encoded
    once, here, by the build's bi-encoder; only vectors go to the shards."""
    entries = shard_map(info.manifest)
    offsets = [int(e["offset"]) for e in entries]
    if models.shards is not None:
        parts = models.shards.open(info, entries)
    else:  # each shard's files were checked by the parent's manifest; vectors only: queries are encoded here
        local = [open_parts(open_bundle(info.root / e["name"], verify=False), None, None, tokens) for e in entries]
        parts = [BundleParts(p.docstore, p.bm25, p.dense, p.tokens) for p in local]
    fanout = ShardFanout([e["name"] for e in entries])
    bm25 = ShardedSearcher("bm25", [p.bm25 for p in parts], offsets, fanout)
    dense = None
    if encoder is not None:
        indexes = [p.dense for p in parts if p.dense is not None]
        if len(indexes) != len(parts):
            missing = [e["name"] for e, p in zip(entries, parts) if p.dense is None]
            raise BundleError(f"{info.root}: the build is dense but {missing} hold no dense index; rebuild it")
        queries = query_encoder(info, encoder, models.query_cache(settings), tokens)
        dense = ShardedDenseSearcher(indexes, offsets, fanout, queries)
    stores = [p.tokens for p in parts if p.tokens is not None]
    store = ShardedTokenStore(stores, offsets) if len(stores) == len(parts) else None
    return ShardedDocstore([p.docstore for p in parts], offsets, fanout), bm25, dense, store


def late_interaction(
    build_id: str, dense: DenseRetriever | None, store: TokenStoreReader | None
) -> LateInteraction | None:
    """MaxSim for the combined second stage (when `reranker.maxsim` asks for it): over the build's stored
    token vectors `store`, else re-encoding candidates (logged, since it costs an encoder pass per
    candidate). None without a dense index."""
    if dense is None:
        log.warning("reranker.maxsim is on but build %s has no dense index: MaxSim is skipped", build_id)
        return None
    if store is None:
        log.warning(
            "build %s stores no token vectors: MaxSim re-encodes every candidate (slow); rebuild with "
            "index.dense.token_vectors: int8",
            build_id,
        )
    return LateInteraction(dense, store)


_SAME = object()


def derive_pipeline(
    base: Pipeline, settings: Settings | None = None, reranker: Any = _SAME, late: Any = _SAME
) -> Pipeline:
    """A pipeline over `base`'s already loaded build (docstore, searchers) with other settings and/or another
    reranker or MaxSim stage (tests and benches that compare configurations without reloading the bundle)."""
    reranker = base.reranker if reranker is _SAME else reranker
    # the process's batcher is shared when the reranker and its settings are the same; a batcher the base made
    # for itself is not (it closes with the base)
    same_batcher = (
        reranker is base.reranker
        and not base.owns_batcher
        and (settings is None or settings.reranker == base.settings.reranker)
    )
    derived = Pipeline(
        base.bundle,
        base.docstore,
        base.searchers,
        reranker,
        settings or base.settings,
        base.tracer,
        base.late if late is _SAME else late,
        base.batcher if same_batcher else None,  # None: the derived pipeline makes (and closes) its own
    )
    if settings is None or settings.reranker == base.settings.reranker:  # the same second stage: its choice
        derived.collection_choice = base.collection_choice
    return derived


def build_answerer(pipeline: Pipeline, models: Models) -> Answerer | None:
    """The answer path for a pipeline: generator and/or reader, as `answer.mode` says (None: no backend)."""
    mode = pipeline.settings.answer.mode
    if mode == "generative" and models.generator is None:
        return None
    if mode != "generative" and models.reader is None:
        return None
    return Answerer(pipeline, models.generator, pipeline.settings.answer, reader=models.reader, pool=models.generation)


@dataclass(eq=False)  # identity: a build is a set member while it drains
class Build:
    """One loaded build of a collection and the requests using it."""

    pipeline: Pipeline
    answerer: Answerer | None
    lease: BuildLease | None
    loaded_at: float = field(default_factory=time.time)
    in_flight: int = 0
    retired: bool = False
    engine: Engine = field(init=False)  # what the HTTP layer calls: the pipeline and answerer behind one interface

    def __post_init__(self) -> None:
        self.engine = Engine(self.pipeline, self.answerer)

    @property
    def build_id(self) -> str:
        return self.pipeline.bundle.build_id

    async def close(self) -> None:
        await self.pipeline.close()
        if self.lease is not None:
            self.lease.release()


class Collection:
    """A named index folder (or bundle folder) and the build of it being served."""

    def __init__(
        self,
        name: str,
        root: Path,
        settings: Settings,
        models: Models,
        on_reload: Callable[[str, str], None] | None = None,
    ) -> None:
        self.name, self.root, self.settings, self.models = name, Path(root), settings, models
        self.current: Build | None = None
        self.error: str | None = None  # last failed load, kept until a later load succeeds
        self.failed_target: str | None = None
        self.reloads = {"ok": 0, "failed": 0}
        self._on_reload = on_reload or (lambda collection, outcome: None)
        self._lock = asyncio.Lock()
        self._draining: set[Build] = set()

    # -- loading ------------------------------------------------------------------------------------------

    def target(self) -> Path:
        """The build folder that should be served now (what `current` points at)."""
        return resolve_bundle(self.root)

    def _load(self, target: Path) -> Build:
        lease = BuildLease(target)
        try:
            pipeline = load_pipeline(self.settings, target, self.models, verify=True)
            self._check_compatible(pipeline)
            return Build(pipeline, build_answerer(pipeline, self.models), lease)
        except BaseException:
            lease.release()
            raise

    def _check_compatible(self, pipeline: Pipeline) -> None:
        """A new build must use the bi-encoder and dimension the served one does (queries are encoded
        by the shared model), else it is refused."""
        if self.current is None:
            return
        old = self.current.pipeline.bundle.manifest.get("dense") or {}
        new = pipeline.bundle.manifest.get("dense") or {}
        for key in ("enabled", "model", "dimension", "normalize"):
            if old.get(key) != new.get(key):
                raise BundleError(
                    f"build {pipeline.bundle.build_id}: dense {key} is {new.get(key)!r} but the served build has "
                    f"{old.get(key)!r}; restart the server to change models"
                )

    def needs_reload(self) -> bool:
        """Cheap check (no hashing): does `current` point somewhere else, or has the served build vanished?"""
        if self.current is None:
            return True
        served = self.current.pipeline.bundle.root
        if not served.exists():
            return True
        link = self.root / CURRENT
        if link.is_symlink():
            return os.readlink(link) != served.name
        return False

    async def reload(self) -> dict[str, Any]:
        """Load the build `current` points at if it differs from the served one. Never raises:
        the outcome is returned and kept in `error`."""
        async with self._lock:
            try:
                target = self.target()
            except BundleError as exc:
                return self._failed(str(exc), None)
            current = self.current
            served = current.pipeline.bundle.root if current is not None else None
            if current is not None and served is not None and served.exists() and target == served:
                return {"collection": self.name, "outcome": "unchanged", "build": current.build_id}
            if self.failed_target == str(target) and served is not None and served.exists():
                return {"collection": self.name, "outcome": "unchanged", "error": self.error}
            started = time.perf_counter()
            try:
                build = await asyncio.to_thread(self._load, target)
            except Exception as exc:  # noqa: BLE001 - any load failure keeps the old build
                return self._failed(f"{type(exc).__name__}: {exc}", str(target))
            await self._calibrate(build.pipeline)
            old, self.current = self.current, build
            self.error = self.failed_target = None
            self.reloads["ok"] += 1
            self._on_reload(self.name, "ok")
            log.info(
                json.dumps(
                    {
                        "event": "build_loaded",
                        "collection": self.name,
                        "build": build.build_id,
                        "previous": old.build_id if old else None,
                        "seconds": round(time.perf_counter() - started, 3),
                    }
                )
            )
            if old is not None:
                old.retired = True
                self._draining.add(old)
                await self._close_if_drained(old)
            return {"collection": self.name, "outcome": "loaded", "build": build.build_id}

    async def _calibrate(self, pipeline: Pipeline) -> None:
        """Before a build is served: time its second stage on this machine and cap its default depth within
        `reranker.latency_budget_ms` (app.retrieval.calibration), on this event loop as requests run it. The
        workers of a pre-fork server share one measurement per build, and an update of the served build (the
        ingest applier publishes one every few seconds under load) keeps the served build's. A failed
        calibration is logged and leaves the configured depth; it never refuses a build."""
        if not pipeline.second_stage or not self.settings.reranker.latency_budget_ms:
            return
        build = pipeline.bundle.build_id
        served = self.current
        if (
            served is not None
            and pipeline.bundle.manifest.get("parent") == served.build_id
            and served.pipeline.calibration is not None
            and served.pipeline.settings.reranker == pipeline.settings.reranker
        ):  # an update of the served build (ingested documents): same models, second stage and machine, the same
            # measurement (a build that records a new choice of depth or weights is measured again)
            pipeline.calibration = served.pipeline.calibration
            return
        try:
            if self.models.calibrations is None:
                pipeline.calibration = await calibrate(pipeline)
            else:
                key = f"{self.name}\0{build}\0{self.settings.reranker.model_dump_json()}"
                pipeline.calibration = await self.models.calibrations.get(key, lambda: calibrate(pipeline))
        except Exception as exc:  # noqa: BLE001 - a measurement must not cost the build
            event = {"event": "second_stage_calibration_failed", "collection": self.name, "build": build}
            log.warning(json.dumps({**event, "error": f"{type(exc).__name__}: {exc}"}))
            return
        event = {"event": "second_stage_calibrated", "collection": self.name, "build": build}
        log.info(json.dumps({**event, **(pipeline.second_stage_report() or {})}))

    def _failed(self, error: str, target: str | None) -> dict[str, Any]:
        repeated = error == self.error
        self.error, self.failed_target = error, target
        if not repeated:  # a folder still without a build is polled: count and log each new error once
            self.reloads["failed"] += 1
            self._on_reload(self.name, "failed")
            log.error(json.dumps({"event": "build_load_failed", "collection": self.name, "error": error}))
        return {"collection": self.name, "outcome": "failed", "error": error}

    # -- serving ------------------------------------------------------------------------------------------

    def acquire(self) -> Build:
        """The served build, held until `release` (call both on the event loop)."""
        build = self.current
        if build is None:
            raise NotReady(self.error or "still loading")
        build.in_flight += 1
        return build

    async def release(self, build: Build) -> None:
        build.in_flight -= 1
        if build.retired:
            await self._close_if_drained(build)

    @contextlib.asynccontextmanager
    async def use(self) -> AsyncIterator[Build]:
        build = self.acquire()
        try:
            yield build
        finally:
            await self.release(build)

    async def _close_if_drained(self, build: Build) -> None:
        if build.in_flight == 0 and build in self._draining:
            self._draining.discard(build)
            await build.close()
            log.info(json.dumps({"event": "build_released", "collection": self.name, "build": build.build_id}))

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ready": self.current is not None,
            "build": self.current.build_id if self.current else None,
            "modes": self.current.pipeline.available_modes() if self.current else [],
            "documents": self.current.pipeline.docstore.num_documents if self.current else None,
            "passages": self.current.pipeline.docstore.num_passages if self.current else None,
            "reload_error": self.error,
            "reloads": dict(self.reloads),
            "draining": sorted(b.build_id for b in self._draining),
        }

    async def close(self) -> None:
        for build in [self.current, *self._draining]:
            if build is not None:
                await build.close()
        self.current = None
        self._draining.clear()


class Services:
    """Everything a server needs: the shared models and each collection's served build."""

    def __init__(self, settings: Settings, models: Models, collections: dict[str, Collection]) -> None:
        self.settings, self.models, self.collections = settings, models, collections
        self.load_error: str | None = None
        self._ingestors: dict[str, Ingestor] = {}
        self._ingest_listener: Callable[[str, str, float], None] | None = None
        self.classifier = Classifier(settings)  # /v1/classify; its model loads on the first call

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        tracer: Tracer | None = None,
    ) -> Services:
        """Unloaded services for `settings` (call `start()` to warm up and load every collection; `on_reload`
        to be told of reloads). The tracer is built from `settings.tracing` unless one is given."""
        roots = dict(settings.collections) or {DEFAULT_COLLECTION: settings.bundle}
        models = Models(
            tracer=tracer or Tracer.from_settings(settings.tracing),
            generation=GenerationPool(settings.server.max_concurrent_generations),
        )
        services = cls(settings, models, {})
        services.collections = {
            name: Collection(name, Path(root), settings, services.models) for name, root in roots.items()
        }
        return services

    def ingestor(self, name: str | None) -> Ingestor:
        """The ingest side of collection `name` (default: the first), made on first use."""
        collection = self.collection(name)
        if collection.name not in self._ingestors:
            self._ingestors[collection.name] = Ingestor(collection, self.settings.ingest, self._ingest_listener)
        return self._ingestors[collection.name]

    def on_ingest(self, listener: Callable[[str, str, float], None]) -> None:
        """Call `listener(collection, event, value)` for accepted batches, applies and times to searchable."""
        self._ingest_listener = listener
        for ingestor in self._ingestors.values():
            ingestor.listener = listener

    def ingest_statuses(self) -> dict[str, dict[str, Any]]:
        """Each collection's ingest state (`Ingestor.status`; none when ingestion is off)."""
        if not self.settings.ingest.enabled:
            return {}
        return {name: self.ingestor(name).status() for name in self.collections}

    async def run_appliers(self) -> None:
        """Every collection's ingest applier (runs until cancelled; see `app.ingesting`)."""
        if self.settings.ingest.enabled:
            await asyncio.gather(*(self.ingestor(name).run() for name in self.collections))

    def on_reload(self, listener: Callable[[str, str], None]) -> None:
        """Call `listener(collection, outcome)` after every reload attempt that loads or fails."""
        for collection in self.collections.values():
            collection._on_reload = listener

    def preload(self) -> None:
        """Pre-fork master (`server.workers` > 1): load the models, and the bi-encoder each collection's
        newest build names, in this process before the workers are forked, so that every worker shares them
        copy-on-write instead of loading its own. Builds are not loaded here: each worker opens them itself
        (BM25 memory-mapped, the docstore read-only), so reloads stay per worker. A failure is kept for
        `/readyz`, as in `start`."""
        try:
            self.models.warm_up(self.settings, fork_safe=True)
            self.models.calibrations = SharedCalibrations.create()
            for collection in self.collections.values():
                with contextlib.suppress(BundleError):
                    dense = open_bundle(collection.root, False).manifest.get("dense") or {}
                    if dense.get("enabled"):
                        self.models.encoder(dense["model"], self.settings)
        except Exception as exc:  # noqa: BLE001 - reported on /readyz by every worker
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error(json.dumps({"event": "load_failed", "error": self.load_error}), exc_info=True)

    async def start(self) -> None:
        """Warm-up (models, off the event loop; in a forked worker, only its threads), then the first build of
        every collection. A collection whose folder has no build yet reports why at once (`/readyz`) and is
        loaded by the watcher once one is published. Once everything is loaded, calling it again does nothing
        (a Ray Serve replica starts its services before the app's lifespan runs)."""
        if self.ready:
            return
        for collection in self.collections.values():
            try:
                await asyncio.to_thread(open_bundle, collection.root, False)
            except BundleError as exc:
                collection.error = str(exc)
        if self.load_error is not None:
            return
        try:
            if self.models.loaded_in is None:
                await asyncio.to_thread(self.models.warm_up, self.settings)
            elif self.models.loaded_in != os.getpid():
                self.models.after_fork(self.settings)
        except Exception as exc:  # noqa: BLE001 - reported on /readyz
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error(json.dumps({"event": "load_failed", "error": self.load_error}), exc_info=True)
            return
        for collection in self.collections.values():
            await collection.reload()

    async def watch(self, interval_s: float) -> None:
        """Poll every collection's `current` and reload the ones that changed (runs until cancelled)."""
        while True:
            await asyncio.sleep(interval_s)
            for collection in self.collections.values():
                try:
                    if collection.needs_reload():
                        await collection.reload()
                except Exception:  # noqa: BLE001 - the watcher must survive anything
                    log.exception("reload check failed")

    async def reload(self, name: str | None = None) -> list[dict[str, Any]]:
        targets = [self.collection(name)] if name else list(self.collections.values())
        return [await c.reload() for c in targets]

    def collection(self, name: str | None) -> Collection:
        if name is None:
            return next(iter(self.collections.values()))
        try:
            return self.collections[name]
        except KeyError:
            raise UnknownCollection(name, list(self.collections)) from None

    @property
    def ready(self) -> bool:
        return self.load_error is None and all(c.current is not None for c in self.collections.values())

    def second_stages(self) -> dict[str, dict[str, Any]]:
        """Each collection's served second stage: its default depth and calibration (`/metrics`); collections
        without a build or without a second stage are absent."""
        reports = {name: c.current.pipeline.second_stage_report() for name, c in self.collections.items() if c.current}
        return {name: report for name, report in reports.items() if report is not None}

    def unavailable_shards(self) -> list[str]:
        """Shards of the served sharded builds that do not answer now (`/readyz` is ready only when none)."""
        down: list[str] = []
        for collection in self.collections.values():
            if collection.current is not None:
                down.extend(collection.current.pipeline.docstore.unavailable())
        return down

    @property
    def tracer(self) -> Tracer:
        return self.models.tracer

    async def close(self) -> None:
        for collection in self.collections.values():
            await collection.close()
        await self.models.close()
        self.classifier.close()
        self.models.generation.shutdown()
        self.models.tracer.shutdown()
