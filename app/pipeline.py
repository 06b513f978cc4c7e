"""The search pipeline: the only place that knows the order of the stages.

    retrievers (by mode) ─► fusion (when more than one) ─► reranker (when configured and asked) ─► top k

The stages to run are data (`RETRIEVERS_BY_MODE`, the options of a request), not branches in the API.
A `Pipeline` is built once from settings and a read-only bundle by the composition root
(`app.services.load_pipeline`); it holds no per-request state, so many requests (and many server replicas
over the same bundle) can use it at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

import numpy as np

from app.retrieval import FusionConfig, Hit, fuse
from app.retrieval.calibration import DepthCalibration
from app.retrieval.fusion import FusionMethod
from app.retrieval.maxsim import LateInteraction
from app.retrieval.protocols import DenseRetriever, DocstoreReader, Retriever, TextReranker
from app.retrieval.reranker import MicroBatcher, apply_rerank, combine_stages, stack_below
from app.retrieval.shards import Partial
from app.settings import Settings
from app.tracing import Tracer
from indexer.bundle import BundleInfo
from indexer.models import passage_index_text

log = logging.getLogger(__name__)

Mode = Literal["bm25", "dense", "hybrid"]
RETRIEVERS_BY_MODE: dict[str, tuple[str, ...]] = {"bm25": ("bm25",), "dense": ("dense",), "hybrid": ("bm25", "dense")}


# the stage interfaces are app.retrieval.protocols'; these names stay for code that imported them from here
Searcher = Retriever
VectorSearcher = DenseRetriever


@dataclass(frozen=True)
class SearchOptions:
    """Per-request choices; defaults come from settings."""

    k: int = 10
    mode: Mode = "hybrid"
    candidates: int = 100
    fusion: FusionConfig = field(default_factory=FusionConfig)
    rerank: bool = False
    rerank_depth: int = 50
    filters: dict[str, Any] | None = None
    collapse: bool = False
    offset: int = 0  # a page is ranking[offset : offset + k] of the ranking at depth `candidates`
    allow_partial: bool = False  # a sharded build's shard that does not answer is left out (`missing_shards`)
    facets: tuple[str, ...] = ()  # metadata fields whose values are counted over each query's whole ranking


@dataclass
class _Prepared:
    """What `Pipeline._prepare_rerank` hands to the model-bound part of the second stage."""

    heads: list[list[Hit]]
    pairs: list[tuple[str, str]]
    passages: dict[int, dict[str, Any]]
    late: list[np.ndarray] | None  # stored-vector MaxSim scores per head (None: not run yet, or no MaxSim)
    span: Any  # the open `sift.rerank` span (None when tracing is off)
    ms: float  # time spent so far
    ce: concurrent.futures.Future[Any] | None = None  # the cross-encoder's batch, queued as soon as pairs existed


@dataclass
class SearchResult:
    """Ranked hits, their passages (row → passage with title and metadata) and per-stage timings in ms."""

    hits: list[Hit]
    passages: dict[int, dict[str, Any]]
    timings_ms: dict[str, float]
    reranked: int = 0  # (query, passage) pairs the reranker scored for this query
    ranked: int = 0  # length of the whole ranking the page was cut from (pages end there)
    missing_shards: list[str] = field(default_factory=list)  # shards left out (only with `allow_partial`)
    facets: dict[str, dict[str, int]] | None = None  # field -> value -> candidates holding it (when asked)


class Pipeline:
    """Coarse retrieval, fusion and reranking over one loaded bundle."""

    def __init__(
        self,
        bundle: BundleInfo,
        docstore: DocstoreReader,
        searchers: Mapping[str, Retriever],
        reranker: TextReranker | None = None,
        settings: Settings | None = None,
        tracer: Tracer | None = None,
        late: LateInteraction | None = None,
        batcher: MicroBatcher | None = None,
    ) -> None:
        """`batcher`: the process's micro-batcher of `reranker` (`app.services.Models.batcher`: one per model,
        shared by every build and collection); without one, a pipeline with a reranker makes its own and
        closes it with itself (a pipeline derived for a bench or a test)."""
        self.bundle = bundle
        self.docstore = docstore
        self.searchers = dict(searchers)
        self.dense = dense_retriever(self.searchers)  # None: a build without a dense index
        self.reranker = reranker
        self.late = late
        self.settings = settings or Settings()
        self.tracer = tracer or Tracer()
        rs = self.settings.reranker
        self._owns_batcher = batcher is None and reranker is not None
        if batcher is not None and batcher.reranker is not reranker:
            raise ValueError("the micro-batcher given scores with another reranker than the pipeline's")
        self.batcher = batcher or (
            MicroBatcher(reranker, rs.max_batch_size, rs.max_wait_ms, rs.max_queued_pairs) if reranker else None
        )
        # the second stage's fusion weights, fixed here (None: one reranker interpolated as before)
        self.stage_weights = (
            rs.stage_weights(cross_encoder=reranker is not None, maxsim=late is not None)
            if late is not None or rs.weights is not None
            else None
        )
        # how deep the second stage goes by default on this machine: set once by the services when they load
        # the build for serving, before it is served (app.retrieval.calibration); None: `reranker.depth`
        self.calibration: DepthCalibration | None = None
        # the collection's own second stage (`app.services.collection_second_stage`: depth and weights are
        # already in `settings`); `rerank: false` in it turns reranking off by default for this collection
        self.collection_choice: dict[str, Any] | None = None

    @property
    def owns_batcher(self) -> bool:
        """True when this pipeline made its micro-batcher (and closes it), not the process's `Models`."""
        return self._owns_batcher

    @property
    def second_stage(self) -> bool:
        """True when a second stage is configured (a reranker model and/or MaxSim)."""
        return self.batcher is not None or self.late is not None

    @property
    def rerank_by_default(self) -> bool:
        """Whether a search reranks unless it says otherwise: a second stage is configured and the
        collection's own choice, if any, did not turn it down."""
        return self.second_stage and bool((self.collection_choice or {}).get("rerank", True))

    @property
    def default_depth(self) -> int:
        """The second stage's default depth: `reranker.depth`, capped by the calibration when there is one."""
        depth = self.settings.reranker.depth
        return min(self.calibration.depth, depth) if self.calibration is not None else depth

    def second_stage_report(self) -> dict[str, Any] | None:
        """The second stage's default depth and what it was chosen from (`/v1/info`, `/metrics`, the log);
        None without a second stage."""
        if not self.second_stage:
            return None
        rs = self.settings.reranker
        return {
            "depth": self.default_depth,
            "configured_depth": rs.depth,
            "max_depth": rs.max_depth,
            "latency_budget_ms": rs.latency_budget_ms or None,
            "calibration": self.calibration.as_dict() if self.calibration is not None else None,
            "rerank_by_default": self.rerank_by_default,
            "weights": self.stage_weights,
            "chosen_for_collection": self.collection_choice,
        }

    # -- stages ------------------------------------------------------------------------------------------

    def coarse(self, queries: list[str], options: SearchOptions) -> tuple[list[list[Hit]], dict[str, float]]:
        """First stage for many queries: every retriever of the mode, then fusion when there are several."""
        timings: dict[str, float] = {}
        mask = self.docstore.filter_mask(options.filters) if options.filters else None
        rankings: dict[str, list[list[Hit]]] = {}
        for name in RETRIEVERS_BY_MODE[options.mode]:
            searcher = self.searchers.get(name)
            if searcher is None:
                raise LookupError(f"mode {options.mode!r} needs the {name} index, which this bundle does not have")
            t = time.perf_counter()
            rankings[name] = self._retrieve(searcher, queries, options.candidates, mask)
            timings[name] = _ms(t)
        if len(rankings) == 1:
            return next(iter(rankings.values())), timings
        t = time.perf_counter()
        with self.tracer.span("sift.fusion", **{"sift.method": options.fusion.method, **self._trace_attrs(queries)}):
            fused = [
                fuse({name: lists[i] for name, lists in rankings.items()}, options.fusion) for i in range(len(queries))
            ]
        timings["fusion"] = _ms(t)
        return fused, timings

    def _retrieve(
        self, searcher: Retriever, queries: list[str], depth: int, mask: np.ndarray | None
    ) -> list[list[Hit]]:
        attrs = {"sift.candidates": depth, **self._trace_attrs(queries)}
        if self.tracer.enabled and isinstance(searcher, DenseRetriever):
            with self.tracer.span(f"sift.{searcher.name}.encode", **attrs):
                vectors = searcher.encode(queries)
            with self.tracer.span(f"sift.{searcher.name}.search", **attrs):
                return searcher.search_vectors(vectors, depth, mask)
        with self.tracer.span(f"sift.{searcher.name}", **attrs):
            return searcher.search_many(queries, depth, mask)

    def _trace_attrs(self, queries: list[str]) -> dict[str, Any]:
        return {"sift.queries": len(queries), "sift.build": self.bundle.build_id}

    def rerank_pairs(
        self, queries: list[str], heads: list[list[Hit]], also: set[int] | None = None
    ) -> tuple[list[tuple[str, str]], dict[int, dict[str, Any]]]:
        """The (query, title + passage text) pairs the reranker scores for each query's `heads`, in order,
        and the passages read for them (with the rows `also`, in the same docstore call)."""
        passages = self.docstore.passages({h.idx for hits in heads for h in hits} | (also or set()))
        pairs = [
            (query, passage_index_text(passages[h.idx]["title"], passages[h.idx]["text"]))
            for query, hits in zip(queries, heads)
            for h in hits
        ]
        return pairs, passages

    async def rerank(
        self, queries: list[str], ranked: list[list[Hit]], depth: int
    ) -> tuple[list[list[Hit]], float, dict[int, dict[str, Any]]]:
        """Second stage for many queries within the timeout; returns (rankings, ms, the passages it read).
        The reranker (micro-batched) and MaxSim score the first `depth` hits of each ranking side by side;
        one reranker alone is interpolated as `reranker.interpolation` says, otherwise the stages are fused
        with `stage_weights` (`combine_stages`). On timeout the rankings keep their order, each hit marked
        `skipped (timeout)`."""
        loop = asyncio.get_running_loop()
        prepared = await asyncio.to_thread(self._prepare_rerank, queries, ranked, depth, None, loop)
        return await self._second_stage(queries, ranked, prepared)

    def _prepare_rerank(
        self,
        queries: list[str],
        ranked: list[list[Hit]],
        depth: int,
        also: set[int] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> _Prepared:
        """The second stage's work that needs no model queue, on the calling (worker) thread: the heads'
        (query, passage) pairs with their passages (and the rows `also`, read in the same docstore call); then,
        with `loop`, the cross-encoder's batch is queued on it at once (a call into the loop, not a hand-off
        to another thread) and MaxSim over stored token vectors (a dot product per candidate; the query's
        token vectors come from the query cache, filled by the first stage's encode) runs here while the batch
        is scored. Opens the `sift.rerank` span."""
        t = time.perf_counter()
        heads = [hits[:depth] for hits in ranked]
        attrs = {"sift.depth": depth, **self._trace_attrs(queries)}
        if self.late is not None:
            attrs["sift.maxsim"] = "stored" if self.late.stored else "re-encoded"
        span = self.tracer.start("sift.rerank", **attrs)
        ce: concurrent.futures.Future[Any] | None = None
        try:
            pairs, passages = self.rerank_pairs(queries, heads, also)
            if loop is not None and self.batcher is not None:
                ce = asyncio.run_coroutine_threadsafe(self._cross_encoder(pairs), loop)
            late = None
            if self.late is not None and self.late.stored:
                late = self.late.score_many(queries, [[h.idx for h in head] for head in heads], [[]] * len(heads))
        except BaseException as exc:
            if ce is not None:
                ce.cancel()
            self.tracer.end(span, exc)
            raise
        return _Prepared(heads, pairs, passages, late, span, _ms(t), ce)

    async def _second_stage(
        self, queries: list[str], ranked: list[list[Hit]], prepared: _Prepared
    ) -> tuple[list[list[Hit]], float, dict[int, dict[str, Any]]]:
        """The model-bound part of `rerank`: the cross-encoder through the micro-batcher and, for a bundle
        without stored token vectors, MaxSim re-encoding the candidates, side by side, within the timeout."""
        t = time.perf_counter()
        heads, pairs, passages, span = prepared.heads, prepared.pairs, prepared.passages, prepared.span
        try:
            try:
                ce, late = await asyncio.wait_for(
                    self._score_heads(queries, heads, pairs, prepared.late, prepared.ce),
                    timeout=self.settings.reranker.timeout_ms / 1000.0,
                )
            except TimeoutError:
                if span is not None:
                    span.set_attribute("sift.rerank.timed_out", True)
                skipped = [[h.with_stage("rerank", None, None, "skipped (timeout)") for h in hits] for hits in ranked]
                return skipped, prepared.ms + _ms(t), passages
        finally:
            self.tracer.end(span)
        late_by_head: list[np.ndarray | None] = list(late) if late is not None else [None] * len(heads)
        out, offset = [], 0
        for hits, head, late_scores in zip(ranked, heads, late_by_head):
            head_ce = ce[offset : offset + len(head)] if ce is not None else None
            offset += len(head)
            tail = [h.with_stage("rerank", None, None, "below rerank_depth") for h in hits[len(head) :]]
            if late_scores is not None:
                tail = [h.with_stage("maxsim", None, None, "below rerank_depth") for h in tail]
            if self.stage_weights is None:  # one cross-encoder, interpolated (no MaxSim: see __init__)
                if head_ce is not None:
                    head = apply_rerank(head, head_ce, self.settings.reranker.interpolation)
            else:
                scores_by_stage = {"cross_encoder": head_ce, "maxsim": late_scores}
                head = combine_stages(
                    head, {k: v for k, v in scores_by_stage.items() if v is not None}, self.stage_weights
                )
            out.append(stack_below(head, tail))  # scores fall as rank falls, below the depth too
        return out, prepared.ms + _ms(t), passages

    async def _score_heads(
        self,
        queries: list[str],
        heads: list[list[Hit]],
        pairs: list[tuple[str, str]],
        late: list[np.ndarray] | None,
        queued: concurrent.futures.Future[Any] | None = None,
    ) -> tuple[np.ndarray | None, list[np.ndarray] | None]:
        """The cross-encoder's scores of `pairs` (from the batch `queued` already, else queued now) and
        MaxSim's per head: `late` when stored-vector MaxSim already ran, else re-encoding the candidates beside
        the cross-encoder (None: that stage is off)."""
        cross: Awaitable[np.ndarray | None] = (
            asyncio.wrap_future(queued) if queued is not None else self._cross_encoder(pairs)
        )
        if self.late is not None and late is None:
            ce, reencoded = await asyncio.gather(cross, self._late(queries, heads, pairs))
            return ce, reencoded
        return await cross, late

    async def _cross_encoder(self, pairs: list[tuple[str, str]]) -> np.ndarray | None:
        if self.batcher is None:
            return None
        # a lone reranked search does not wait `max_wait_ms` for company that is not coming
        return await self.batcher.score(pairs, company=self.batcher.searching > 1)

    async def _late(
        self, queries: list[str], heads: list[list[Hit]], pairs: list[tuple[str, str]]
    ) -> list[np.ndarray] | None:
        """MaxSim re-encoding the candidates (a bundle without stored token vectors), on a worker thread."""
        if self.late is None:
            return None
        texts, offset = [], 0
        for head in heads:
            texts.append([p for _, p in pairs[offset : offset + len(head)]])
            offset += len(head)
        rows = [[h.idx for h in head] for head in heads]
        return await asyncio.to_thread(self.late.score_many, queries, rows, texts)  # inside the sift.rerank span

    # -- entry points ------------------------------------------------------------------------------------

    async def search_many(self, queries: list[str], options: SearchOptions) -> list[SearchResult]:
        """`_search_many`, with a sharded build's unanswered shards left out of the results (and named in each
        result's `missing_shards`) when `options.allow_partial`, else raising `ShardUnavailable`."""
        if not options.allow_partial:
            return await self._search_many(queries, options)
        partial, token = Partial.allow()  # read by the shard fan-out, in this request's context only
        try:
            results = await self._search_many(queries, options)
        finally:
            Partial.reset(token)
        missing = sorted(partial.missing)
        for result in results:
            result.missing_shards = list(missing)
        return results

    async def _search_many(self, queries: list[str], options: SearchOptions) -> list[SearchResult]:
        """Run the whole pipeline for a batch of queries (encoded and reranked in batches).

        Invariant: each result is `ranking[offset : offset + k]` of one ranking that depends on the options
        but not on `offset` or `k` (as long as `candidates` does not change), so consecutive pages
        concatenate to the result of one request for the whole range; ties are broken by passage row.

        Thread hand-offs: a first-stage search makes one (retrieval, fusion and the page's passages on one
        worker thread); a reranked search makes two: the first stage and the second stage's passages on one
        worker thread, which queues the cross-encoder's batch on the loop as soon as its pairs exist and
        scores stored-vector MaxSim while the micro-batcher's thread scores the batch (a third only when the
        page needs passages the second stage did not read, or MaxSim re-encodes candidates)."""
        started = time.perf_counter()
        passages: dict[int, dict[str, Any]] = {}
        reranked = [0] * len(queries)
        if options.rerank and self.second_stage:
            if self.batcher is not None:
                self.batcher.searching += 1
            try:
                loop = asyncio.get_running_loop()
                ranked, timings, prepared = await asyncio.to_thread(
                    self._first_stage_for_rerank, queries, options, loop
                )
                ranked, timings["rerank"], passages = await self._second_stage(queries, ranked, prepared)
            finally:
                if self.batcher is not None:
                    self.batcher.searching -= 1
            reranked = [
                sum(1 for h in hits if "rerank" in h.stages and h.stages["rerank"].score is not None) for hits in ranked
            ]
            if options.collapse or self._missing(ranked, options, passages):
                ranked, top = await asyncio.to_thread(self._page, queries, ranked, options, passages, timings)
            else:  # every passage of the page was read with the second stage's: no hand-off
                ranked, top = self._page(queries, ranked, options, passages, timings)
        else:  # first stage only: retrieval, the page and its passages in one hand-off to the thread pool
            ranked, top, timings = await asyncio.to_thread(self._first_stage_page, queries, options, passages)
        facets: list[dict[str, dict[str, int]] | None] = [None] * len(queries)
        if options.facets:
            t = time.perf_counter()
            facets = list(await asyncio.to_thread(self._facets, ranked, options.facets, passages))
            timings["facets"] = _ms(t)
        timings["total"] = _ms(started)
        timings = {k: round(v, 3) for k, v in timings.items()}
        return [
            SearchResult(hits, {h.idx: passages[h.idx] for h in hits}, dict(timings), n, len(whole), facets=counted)
            for hits, n, whole, counted in zip(top, reranked, ranked, facets)
        ]

    def _facets(
        self, ranked: list[list[Hit]], names: Sequence[str], passages: dict[int, dict[str, Any]]
    ) -> list[dict[str, dict[str, int]]]:
        """Per query, each field's values counted over its whole ranking (the candidates, not only the page):
        metadata as served (a passage's own over its document's); a list counts each item; values become
        JSON text (true, 3) unless strings; most frequent first, ties by value. Reads the rows not read yet."""
        missing = {h.idx for hits in ranked for h in hits} - passages.keys()
        read = self.docstore.passages(missing) if missing else {}
        out = []
        for hits in ranked:
            counts: dict[str, Counter[str]] = {name: Counter() for name in names}
            for hit in hits:
                passage = passages.get(hit.idx) or read.get(hit.idx)
                metadata = passage["metadata"] if passage else {}
                for name in names:
                    value = metadata.get(name)
                    for item in value if isinstance(value, list) else [value]:
                        if item is not None and not isinstance(item, (dict, list)):
                            counts[name][item if isinstance(item, str) else json.dumps(item)] += 1
            out.append({n: dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))) for n, c in counts.items()})
        return out

    def _first_stage_for_rerank(
        self, queries: list[str], options: SearchOptions, loop: asyncio.AbstractEventLoop
    ) -> tuple[list[list[Hit]], dict[str, float], _Prepared]:
        """The first stage and the second stage's thread-side work (`_prepare_rerank`) in one hand-off. Without
        collapse, the page's rows of the first-stage ranking are read too: reranking only permutes the top
        `rerank_depth`, so the page's hits are among those rows and the head's."""
        ranked, timings = self.coarse(queries, options)
        window = set()
        if not options.collapse:
            window = {h.idx for hits in ranked for h in hits[options.offset : options.offset + options.k]}
        return ranked, timings, self._prepare_rerank(queries, ranked, options.rerank_depth, window, loop)

    @staticmethod
    def _missing(ranked: list[list[Hit]], options: SearchOptions, passages: dict[int, dict[str, Any]]) -> bool:
        return any(h.idx not in passages for hits in ranked for h in hits[options.offset : options.offset + options.k])

    def _first_stage_page(
        self, queries: list[str], options: SearchOptions, passages: dict[int, dict[str, Any]]
    ) -> tuple[list[list[Hit]], list[list[Hit]], dict[str, float]]:
        ranked, timings = self.coarse(queries, options)
        ranked, top = self._page(queries, ranked, options, passages, timings)
        return ranked, top, timings

    def _page(
        self,
        queries: list[str],
        ranked: list[list[Hit]],
        options: SearchOptions,
        passages: dict[int, dict[str, Any]],
        timings: dict[str, float],
    ) -> tuple[list[list[Hit]], list[list[Hit]]]:
        """Collapse when asked, cut each ranking's page and read its passages into `passages` (those the
        reranker already read are not read again)."""
        if options.collapse:
            ranked = [_best_passage_per_document(hits) for hits in ranked]
        top = [hits[options.offset : options.offset + options.k] for hits in ranked]
        t = time.perf_counter()
        missing = {h.idx for hits in top for h in hits} - passages.keys()
        with self.tracer.span("sift.fetch", **{"sift.passages": len(missing), **self._trace_attrs(queries)}):
            if missing:
                passages.update(self.docstore.passages(missing))
        timings["fetch"] = _ms(t)
        return ranked, top

    def check_rerank_texts(self) -> None:
        """Raise `NoReranker` unless `rerank_texts` can score (a cross-encoder, or MaxSim)."""
        if self.batcher is None and self.late is None:
            raise NoReranker(
                "no reranker is configured; set reranker.model "
                "(e.g. SIFT_RERANKER__MODEL=models/sift-reranker-minilm-l6 or maxsim) and restart"
            )

    async def rerank_texts(
        self, query: str, texts: list[str], rows: list[int | None], max_tokens_per_doc: int | None = None
    ) -> RerankedTexts:
        """Score arbitrary texts against `query` with this pipeline's reranker (`/v1/rerank`): the
        cross-encoder through the process's micro-batcher, or, when MaxSim is the only second stage, MaxSim
        (texts sent by passage id, `rows[i]`, from the build's stored token vectors, as search scores them).
        Raises `NoReranker` without either, `RerankTimeout` past `reranker.timeout_ms` (and `QueueFull`)."""
        self.check_rerank_texts()
        late = self.late if self.batcher is None else None
        if late is not None:
            texts, truncated, tokens, stored = await asyncio.to_thread(
                late.prepare_texts, query, texts, rows, max_tokens_per_doc
            )
            work = asyncio.to_thread(late.score_texts, query, texts, stored)
        else:
            assert self.batcher is not None and self.reranker is not None
            texts, truncated, tokens = await asyncio.to_thread(self.reranker.prepare, query, texts, max_tokens_per_doc)
            work = self.batcher.score([(query, t) for t in texts])
        try:
            scores = await asyncio.wait_for(work, timeout=self.settings.reranker.timeout_ms / 1000.0)
        except TimeoutError as exc:
            raise RerankTimeout("reranking took longer than reranker.timeout_ms; retry with fewer documents") from exc
        return RerankedTexts(texts, np.asarray(scores, dtype=np.float32), truncated, tokens)

    async def search(self, query: str, options: SearchOptions) -> SearchResult:
        return (await self.search_many([query], options))[0]

    def options(
        self,
        *,
        fusion: FusionMethod | FusionConfig | None = None,
        rrf_k: int | None = None,
        weights: dict[str, float] | None = None,
        **overrides: Any,
    ) -> SearchOptions:
        """The one merge of configured defaults and per-call overrides, for the API, eval, training and the
        benches alike: each override given (not None) replaces its default, and the result is checked against
        this build and the configured limits (`InvalidOption` names the field and what to do).

        Rules: `mode` must be one this build can run; `k` ≤ `search.max_k`, `candidates` ≤
        `search.max_candidates`, `rerank_depth` ≤ `reranker.max_depth`; `rerank=True` needs a second stage.
        `fusion` is a method name (with `rrf_k` and `weights` over the configured ones) or a whole
        `FusionConfig`. A first page (offset 0) ranks at least `k` candidates, so it may ask for more than
        `candidates`; later pages keep the depth their cursor fixed."""
        s = self.settings
        default_mode = s.search.default_mode if s.search.default_mode in self.available_modes() else "bm25"
        if isinstance(fusion, FusionConfig):
            merged_fusion = fusion
        else:
            merged_fusion = FusionConfig(
                fusion or s.fusion.method,
                rrf_k or s.fusion.rrf_k,
                dict(weights) if weights is not None else dict(s.fusion.weights),
            )
        given = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(given) - {f.name for f in fields(SearchOptions)}
        if unknown:
            raise TypeError(f"unknown search options: {sorted(unknown)}")
        options = replace(
            SearchOptions(
                k=s.search.default_k,
                mode=default_mode,
                candidates=s.search.default_candidates,
                fusion=merged_fusion,
                rerank=self.rerank_by_default,
                rerank_depth=self.default_depth,
            ),
            **given,
        )
        if options.mode not in self.available_modes():
            raise InvalidOption(
                "mode", f"{options.mode!r} is not available for this bundle; use one of {self.available_modes()}"
            )
        _check_max(options.k, s.search.max_k, "k", "search.max_k")
        _check_max(options.candidates, s.search.max_candidates, "candidates", "search.max_candidates")
        _check_max(options.rerank_depth, s.reranker.max_depth, "rerank_depth", "reranker.max_depth")
        _check_max(len(options.facets), s.search.max_facets, "facets", "search.max_facets")
        if options.rerank and not self.second_stage:
            raise InvalidOption("rerank", "no reranker is configured; set reranker.model or send rerank=false")
        if not options.offset and options.candidates < options.k:
            options = replace(options, candidates=options.k)
        return options

    def available_modes(self) -> list[str]:
        return [m for m, names in RETRIEVERS_BY_MODE.items() if all(n in self.searchers for n in names)]

    def runtimes(self) -> dict[str, str | None]:
        """What runs each model: passages as recorded by the build, queries and reranker as loaded here."""
        dense = self.dense
        reranker = self.reranker
        return {
            "passages": (self.bundle.manifest.get("dense") or {}).get("runtime", "torch") if dense else None,
            "queries": dense.runtime if dense else None,
            "reranker": reranker.runtime if reranker is not None else None,
            "maxsim": ("stored token vectors" if self.late.stored else "re-encoded") if self.late is not None else None,
        }

    async def close(self) -> None:
        """Close its docstore, and its micro-batcher when it made its own (shared models and the process's
        batchers stay: `Models.close`)."""
        if self.batcher is not None and self._owns_batcher:
            await self.batcher.close()
        self.docstore.close()


@dataclass
class RerankedTexts:
    """`Pipeline.rerank_texts`' result: the texts as scored (cut to the token limit asked), their raw reranker
    scores in order, the indices cut, and the tokens billed."""

    texts: list[str]
    scores: np.ndarray
    truncated: list[int]
    tokens: int


class NoReranker(LookupError):
    """No second stage can score texts here (the API answers 422 naming `reranker.model`)."""


class RerankTimeout(TimeoutError):
    """The reranker did not answer within `reranker.timeout_ms` (the API answers 503)."""


class InvalidOption(ValueError):
    """A search option that does not fit this build or a configured limit: `field` names it (the API answers
    422 with it)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def dense_retriever(searchers: Mapping[str, Retriever]) -> DenseRetriever | None:
    """The `dense` retriever of `searchers` (None without one), checked to be a `DenseRetriever`: MaxSim, the
    query runtimes and `/v1/embeddings` use its encoder."""
    searcher = searchers.get("dense")
    if searcher is None:
        return None
    if not isinstance(searcher, DenseRetriever):
        name = type(searcher).__name__
        raise TypeError(f"the dense retriever {name} is not a DenseRetriever (app.retrieval.protocols)")
    return searcher


def _check_max(value: int, limit: int, field: str, setting: str) -> None:
    if value > limit:
        raise InvalidOption(field, f"must be <= {limit} ({setting})")


def _best_passage_per_document(hits: list[Hit]) -> list[Hit]:
    seen: set[str] = set()
    out = []
    for hit in hits:
        if hit.doc_id not in seen:
            seen.add(hit.doc_id)
            out.append(hit)
    return out


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0
