"""Choosing the default second stage: which stages, their fusion weights and the rerank depth, on training
and validation data only.

    python -m app.training.second_stage [--out var/second_stage]   (bench/second_stage.py reports it)

Procedure (the one `configs/default.yaml` was chosen with):

1. For every query of each dataset, the hybrid top-100 passages (`Pipeline.coarse`, the API's first stage) are
   scored once by each candidate stage: the cross-encoder on the first `CE_DEPTH` of them, MaxSim over the
   bundle's stored token vectors on the first `MAX_DEPTH`. A pair's score does not depend on the other pairs,
   so reranking the first d passages for any d ≤ those depths is then exact, without re-scoring.
2. Each configuration (depth d, weights w on the simplex in steps of `STEP`) re-ranks the first d passages by
   Σ w·z(score) exactly as `combine_stages` does in the server, collapses to documents (best passage) and is
   scored with ir-measures.
3. Selection uses only **validation** sets: SciFact `qrels/train.tsv` (nDCG@10), SQuAD v1.1 dev articles
   0–23 as retrieval (MRR@10; the gold paragraph is the one relevant passage) and, out of domain and label
   free, `pydocs-ict`: 500 sentences cut out of the Python standard library's docstrings, each to find the
   docstring it came from (MRR@10; app/eval/pseudo.py). The cross-encoder was trained on the first two, so
   the third is the only one on which neither learned stage has seen the domain. The objective is the mean over
   them of the gain over hybrid as a share of the best gain any configuration reaches on that set (so each set
   counts equally, whatever its metric's range); a configuration qualifies only if it gains on every set. Depths are
   limited to those whose **measured** p50 fits `MEASURED_HEADROOM` of `BUDGET_MS`: `measure_latency` times
   the served path itself (`Pipeline.search` with the shipped stages, one query at a time, query cache off) on
   `LATENCY_QUERIES` SciFact train claims at every depth, on this machine (`latency.json` beside the features).
   Without that file, an estimate must fit `HEADROOM`: first stage + cross-encoder pairs at the batch speed
   measured while collecting, which under-predicts the served p50 (12 pairs: estimated ≤ 160 ms, served 229 ms
   over HTTP). Among the allowed depths, the smallest whose best objective is within `DEPTH_SLACK` of the best
   is kept (the cross-encoder dominates latency).
4. The chosen configuration is then reported, never re-tuned, on the **test** sets: SciFact test, SQuAD
   articles 24–47, and Cranfield (test only).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import pickle
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from app.eval.retrieval import document_run, evaluate
from app.retrieval.maxsim import is_maxsim
from app.retrieval.reranker import combine_stages, model_name, stack_below
from app.retrieval.types import Hit

if TYPE_CHECKING:
    from app.pipeline import Pipeline
    from app.retrieval.protocols import TextReranker
    from app.retrieval.reranker import Reranker
    from app.services import Models
    from app.settings import Settings

log = logging.getLogger(__name__)

CE_DEPTH = 30  # the cross-encoder scores at most this many candidates per query (its cost dominates latency)
MAX_DEPTH = 50  # MaxSim over stored vectors is cheap: scored this deep
DEPTHS = (8, 10, 12, 15, 20, 30)
BUDGET_MS = 200  # the p50 a default reranked search must stay under on a 2-core CPU (issue: ≤ 200 ms at c=1)
HEADROOM = 0.8  # share of the budget the estimate may use (HTTP, MaxSim and queueing take the rest)
MEASURED_HEADROOM = 0.9  # share of the budget a measured in-process p50 may use (HTTP adds ~3 ms; this VM drifts)
LATENCY_QUERIES = 60  # SciFact train claims timed at each depth by `measure_latency`
STEP = 0.05
DEPTH_SLACK = 0.01  # of the normalised objective
COMPONENTS = ("first_stage", "cross_encoder", "maxsim")
VALIDATION = {"scifact-train": "ndcg@10", "squad-a0-23": "mrr@10", "pydocs-ict": "mrr@10"}
PSEUDO_QUERIES = 500  # label-free queries of the out-of-domain validation set
TEST = {"scifact-test": "ndcg@10", "squad-a24-47": "mrr@10", "cranfield": "ndcg@10"}


@dataclass
class Features:
    """One dataset's first-stage rankings and per-stage scores of their heads."""

    name: str
    qids: list[str]
    qrels: dict[str, dict[str, int]]
    ranked: list[list[Hit]]
    cross_encoder: list[np.ndarray] = field(default_factory=list)  # first CE_DEPTH hits of each ranking
    maxsim: list[np.ndarray] = field(default_factory=list)  # first MAX_DEPTH hits
    seconds: dict[str, float] = field(default_factory=dict)


def collect(
    name: str,
    pipeline: Pipeline,
    reranker: TextReranker,
    queries: dict[str, str],
    qrels: dict[str, dict[str, int]],
    progress: bool = True,
    ce_depth: int = CE_DEPTH,
    maxsim_depth: int = MAX_DEPTH,
) -> Features:
    """Score the hybrid top-100 of every query with the cross-encoder (`reranker.score`, first `ce_depth`)
    and MaxSim (`pipeline.late`, required; first `maxsim_depth`)."""
    from tqdm.auto import tqdm

    late = pipeline.late
    if late is None:
        raise ValueError("the features need the pipeline's MaxSim stage (reranker.maxsim and stored token vectors)")
    qids, texts = list(queries), list(queries.values())
    options = pipeline.options(mode="hybrid", k=100, candidates=100, rerank=False)
    features = Features(name, qids, qrels, [])
    t = time.perf_counter()
    for text in tqdm(texts, desc=f"{name}: first stage", disable=not progress):
        features.ranked.append(pipeline.coarse([text], options)[0][0])
    features.seconds["first_stage"] = time.perf_counter() - t
    t = time.perf_counter()
    for text, hits in tqdm(list(zip(texts, features.ranked)), desc=f"{name}: maxsim", disable=not progress):
        head = hits[:maxsim_depth]
        features.maxsim.append(late.score(text, [h.idx for h in head], []))
    features.seconds["maxsim"] = time.perf_counter() - t
    t = time.perf_counter()
    for text, hits in tqdm(list(zip(texts, features.ranked)), desc=f"{name}: cross-encoder", disable=not progress):
        pairs, _ = pipeline.rerank_pairs([text], [hits[:ce_depth]])
        features.cross_encoder.append(reranker.score(pairs))
    features.seconds["cross_encoder"] = time.perf_counter() - t
    return features


def rerank(features: Features, depth: int, weights: dict[str, float]) -> list[list[Hit]]:
    """What the server returns for each query with this depth and these weights (then best passage per
    document, as `sift eval retrieval` scores it)."""
    out = []
    for hits, ce, ms in zip(features.ranked, features.cross_encoder, features.maxsim):
        head = hits[:depth]
        scores = {}
        if weights.get("cross_encoder", 0) > 0:
            scores["cross_encoder"] = ce[: len(head)]
        if weights.get("maxsim", 0) > 0:
            scores["maxsim"] = ms[: len(head)]
        out.append(stack_below(combine_stages(head, scores, weights), hits[len(head) :]))
    return out


def score(features: Features, depth: int | None, weights: dict[str, float] | None) -> dict[str, float]:
    """Metrics of hybrid (`depth` None) or of reranking with `depth` and `weights` (documents ranked by their
    best passage, as `document_run` does)."""
    ranked = features.ranked if depth is None else rerank(features, depth, weights or {})
    return evaluate(features.qrels, document_run(features.qids, ranked))


def weight_grid(step: float = STEP) -> list[dict[str, float]]:
    """Every weighting of the three components on the simplex (steps of `step`), at least one reranker > 0."""
    n = round(1 / step)
    grid = []
    for a, b in itertools.product(range(n + 1), repeat=2):
        if a + b <= n and (b > 0 or n - a - b > 0):
            grid.append({"first_stage": a / n, "cross_encoder": b / n, "maxsim": (n - a - b) / n})
    return grid


def max_depth_within_budget(
    features: Sequence[Features], budget_ms: float = BUDGET_MS, latency: dict[int, float] | None = None
) -> int:
    """The deepest rerank that fits the budget: with `latency` (measured p50 ms per depth, `measure_latency`),
    the deepest whose p50 is within `MEASURED_HEADROOM` of `budget_ms` (0 when none is); without it, an
    estimate (first stage + cross-encoder pairs, per query, as measured while collecting these features on
    this machine) within `HEADROOM`."""
    if latency:
        fits = [int(d) for d, ms in latency.items() if ms <= budget_ms * MEASURED_HEADROOM]
        return max(fits, default=0)
    first = sum(f.seconds["first_stage"] for f in features) / sum(len(f.qids) for f in features) * 1000
    pairs = sum(sum(len(c) for c in f.cross_encoder) for f in features)
    per_pair = sum(f.seconds["cross_encoder"] for f in features) / pairs * 1000
    return int((budget_ms * HEADROOM - first) // per_pair)


def select(
    validation: dict[str, Features],
    depths: Sequence[int] = DEPTHS,
    grid: list[dict[str, float]] | None = None,
    latency: dict[int, float] | None = None,
    metrics: dict[str, str] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """The configuration chosen by the procedure of the module docstring, with every validation figure
    (`latency`: measured p50 ms per depth; without it the depth limit is estimated; `metrics`: each set's
    metric, default `VALIDATION`'s; `progress`: a bar over the configurations)."""
    from tqdm.auto import tqdm

    metric = metrics or VALIDATION
    grid = grid or weight_grid()
    allowed = max_depth_within_budget(list(validation.values()), latency=latency)
    depths = [d for d in depths if d <= allowed] or [min(depths)]
    base = {name: score(f, None, None)[metric[name]] for name, f in validation.items()}
    table: list[dict[str, Any]] = []
    for depth, weights in tqdm(
        list(itertools.product(depths, grid)), desc="configurations", unit="config", disable=not progress
    ):
        gains = {name: score(f, depth, weights)[metric[name]] - base[name] for name, f in validation.items()}
        table.append({"depth": depth, "weights": weights, "gains": gains})
    # each set counts equally: a gain is measured as a share of the best gain any configuration reaches there
    best_gain = {name: max(row["gains"][name] for row in table) for name in validation}
    for row in table:
        shares = [row["gains"][n] / best_gain[n] if best_gain[n] > 0 else 0.0 for n in validation]
        row["objective"] = float(np.mean(shares))
    qualified = [row for row in table if all(g > 0 for g in row["gains"].values())] or table
    best = max(row["objective"] for row in qualified)
    for depth in sorted(depths):
        top = max((r for r in qualified if r["depth"] == depth), key=lambda r: r["objective"])
        if top["objective"] >= best - DEPTH_SLACK:
            return {"chosen": top, "best_objective": best, "hybrid": base, "table": table, "depths": depths}
    raise AssertionError("unreachable: the best depth qualifies")


def report(chosen: dict[str, Any], datasets: dict[str, Features], metrics: dict[str, str]) -> dict[str, dict]:
    """Hybrid vs the chosen configuration (and each stage alone at the same depth) on `datasets`."""
    depth, weights = chosen["depth"], chosen["weights"]
    out = {}
    for name, f in datasets.items():
        hybrid = score(f, None, None)
        fused = score(f, depth, weights)
        out[name] = {
            "metric": metrics[name],
            "hybrid": hybrid,
            "chosen": fused,
            "ce_0.5": score(f, 20, {"first_stage": 0.5, "cross_encoder": 0.5}),
            "maxsim_0.5": score(f, 20, {"first_stage": 0.5, "maxsim": 0.5}),
            "queries": len(f.qids),
        }
    return out


# -- datasets ------------------------------------------------------------------------------------------


def dataset_queries(name: str, shared: Path, out: Path) -> tuple[dict[str, str], dict[str, dict[str, int]], Path]:
    """(queries, qrels, corpus) of a named dataset from `shared/data` (SQuAD corpora are written under `out`)."""
    from app.eval.qa import load_squad, paragraphs_corpus, sample
    from app.eval.retrieval import load_beir

    data = shared / "data"
    if name == "pydocs-ict":
        return _pydocs(out / name)
    if name.startswith("scifact-") or name == "cranfield":
        folder, split = ("scifact", name.split("-", 1)[1]) if name != "cranfield" else ("cranfield", "test")
        ds = load_beir(data / folder, split)
        return ds.queries, ds.qrels, ds.corpus
    articles = range(0, 24) if name == "squad-a0-23" else range(24, 48)
    squad = data / "squad" / "dev-v1.1.json"
    questions = sample(load_squad(squad, articles), 500)
    corpus = out / name / "corpus.jsonl"
    if not corpus.exists():
        corpus.parent.mkdir(parents=True, exist_ok=True)
        corpus.write_text("".join(json.dumps(d) + "\n" for d in paragraphs_corpus(squad, articles)), encoding="utf-8")
    return {q.id: q.question for q in questions}, {q.id: {q.paragraph_id: 1} for q in questions}, corpus


def _pydocs(folder: Path) -> tuple[dict[str, str], dict[str, dict[str, int]], Path]:
    """The out-of-domain, label-free validation set: `PSEUDO_QUERIES` sentences cut out of the Python standard
    library's docstrings (app/eval/pseudo.py), written once under `folder` (corpus, queries, qrels, source)."""
    from app.eval.pseudo import pseudo_query_set, stdlib_docs

    corpus, saved = folder / "corpus.jsonl", folder / "queries.json"
    if not saved.exists():
        found = pseudo_query_set(stdlib_docs(), PSEUDO_QUERIES)
        folder.mkdir(parents=True, exist_ok=True)
        corpus.write_text("".join(json.dumps(r) + "\n" for r in found.corpus), encoding="utf-8")
        saved.write_text(json.dumps({"source": found.source, "queries": found.queries, "qrels": found.qrels}, indent=1))
    data = json.loads(saved.read_text())
    return data["queries"], data["qrels"], corpus


def scorers(settings: Settings) -> tuple[Reranker, Settings, Models]:
    """What `collect` scores with under `settings`: the configured cross-encoder (its max length, runtime and
    export cache), the settings of a first-stage pipeline whose MaxSim is the pipeline's own stage (no model
    loaded for it), and the model registry the pipelines share."""
    from app.retrieval.reranker import Reranker
    from app.services import Models

    rs, runtime = settings.reranker, settings.runtime
    if rs.model is None:
        raise RuntimeError("reranker.model is not set: the second stage's features need the cross-encoder")
    reranker = Reranker.load(rs.model, rs.max_length, runtime=runtime.reranker, cache_dir=runtime.cache_dir)
    first_stage = settings.model_copy(deep=True)
    first_stage.reranker.model = "maxsim"
    return reranker, first_stage, Models()


def collect_all(out: Path, shared: Path, names: Sequence[str]) -> None:
    """Score and cache (`out/<name>.pkl`) every dataset in `names` not cached yet: each gets a bundle built
    with configs/default.yaml's index config (int8 token vectors at least), scored by the configured
    cross-encoder at its max length and the runtime of `runtime.reranker`, and by stored-vector MaxSim."""
    from app.services import load_pipeline
    from app.settings import load_settings
    from indexer.build import ensure_bundle

    names = [n for n in names if not (out / f"{n}.pkl").exists()]
    if not names:
        return
    settings = load_settings(reranker={"maxsim": True})
    index = settings.index.model_copy(deep=True)
    index.dense.token_vectors = index.dense.token_vectors or "int8"
    reranker, first_stage, models = scorers(settings)
    for name in names:
        queries, qrels, corpus = dataset_queries(name, shared, out)
        bundle_dir = out / "bundles" / corpus.parent.name if "squad" not in name else corpus.parent / "index"
        bundle = ensure_bundle(corpus, bundle_dir, index, show_progress=True)
        pipeline = load_pipeline(first_stage, bundle, models, verify=False)
        features = collect(name, pipeline, reranker, queries, qrels)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.pkl").write_bytes(pickle.dumps(features))
        log.info("%s: %s", name, features.seconds)


def measure_latency(
    out: Path, shared: Path, depths: Sequence[int] = DEPTHS, n: int = LATENCY_QUERIES, runs: int = 3
) -> dict[int, float]:
    """p50 ms per rerank depth of the served path: `Pipeline.search` with configs/default.yaml's stages (the
    cross-encoder through its micro-batcher and stored-vector MaxSim, in parallel) over the SciFact bundle,
    one query at a time with the query cache off, on the first `n` SciFact **train** claims; the median of
    `runs` passes per depth (depths interleaved, so a drift of this machine's speed touches every depth
    alike). Cached as `out/latency.json` (delete it to measure again, e.g. on another machine)."""
    import asyncio
    import platform
    import statistics

    from app.services import load_pipeline
    from app.settings import load_settings

    path = out / "latency.json"
    if path.exists():
        return {int(d): float(ms) for d, ms in json.loads(path.read_text())["p50_ms"].items()}
    queries, _, _ = dataset_queries("scifact-train", shared, out)
    claims = list(queries.values())[:n]
    settings = load_settings(runtime={"query_cache_size": 0})
    pipeline = load_pipeline(settings, out / "bundles" / "scifact", verify=False)  # loads the reranker
    batcher = pipeline.batcher
    if pipeline.late is None or batcher is None:
        raise RuntimeError("the latency of the default second stage needs the cross-encoder and stored token vectors")

    async def timed() -> dict[int, list[float]]:
        passes: dict[int, list[float]] = {d: [] for d in depths}
        for claim in claims[:5]:  # warm-up
            await pipeline.search(claim, pipeline.options(rerank_depth=max(depths)))
        for _ in range(runs):
            for depth in depths:
                options = pipeline.options(k=10, rerank=True, rerank_depth=depth)
                times = []
                for claim in claims:
                    started = time.perf_counter()
                    await pipeline.search(claim, options)
                    times.append((time.perf_counter() - started) * 1000)
                passes[depth].append(statistics.median(times))
        await batcher.close()
        return passes

    passes = asyncio.run(timed())
    p50 = {d: statistics.median(v) for d, v in passes.items()}
    path.write_text(
        json.dumps(
            {
                "p50_ms": p50,
                "passes": passes,
                "claims": len(claims),
                "machine": platform.processor() or platform.machine(),
            },
            indent=1,
        )
    )
    log.info("served p50 by depth: %s", p50)
    return p50


# -- one collection, label-free (`sift reranker choose`) ---------------------------------------------------

COLLECTION_QUERIES = 500  # pseudo-queries cut from the collection (the bench's and the pydocs set's size)
MIN_COLLECTION_QUERIES = 20  # fewer cannot tell configurations apart: refused
COLLECTION_METRIC = "mrr@10"  # one relevant document per pseudo-query


SIGNIFICANCE = 0.05  # one-sided p a collection's own configuration must beat the configured one by
BOOTSTRAP = 2000  # paired bootstrap resamples of the pseudo-queries


def per_query(features: Features, depth: int | None, weights: dict[str, float] | None) -> np.ndarray:
    """Each query's reciprocal rank @10 (documents by best passage), in `features.qids` order, of hybrid
    (`depth` None) or of reranking with `depth` and `weights`."""
    import ir_measures
    from ir_measures import RR

    ranked = features.ranked if depth is None else rerank(features, depth, weights or {})
    run = document_run(features.qids, ranked)
    full = {qid: run.get(qid, {}) for qid in features.qrels}
    values = {m.query_id: float(m.value) for m in ir_measures.iter_calc([RR @ 10], features.qrels, full)}
    return np.array([values.get(qid, 0.0) for qid in features.qids])


def paired_p(better: np.ndarray, worse: np.ndarray, resamples: int = BOOTSTRAP, seed: int = 0) -> float:
    """One-sided paired bootstrap p-value that `better` beats `worse` on average: the share of resampled query
    sets (drawn with replacement, `seed` fixed) on which it does not. 1.0 when they never differ."""
    diff = np.asarray(better, dtype=np.float64) - np.asarray(worse, dtype=np.float64)
    if not diff.any():
        return 1.0
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1)
    return float((means <= 0).mean())


def collection_choice(
    features: Features,
    depths: Sequence[int],
    grid: list[dict[str, float]] | None = None,
    progress: bool = False,
    configured: tuple[int, dict[str, float]] | None = None,
) -> dict:
    """The manifest's `second_stage` record chosen on one collection's pseudo-query `features` (MRR@10).

    The collection's best configuration is `select`'s depth and weights (of equally good weights, those with
    the fewest stages above 0: a stage that adds nothing, or hurts, is turned down). It is served only if it
    beats the `configured` one (the global depth and weights) on these queries by a paired bootstrap at
    `SIGNIFICANCE` (`decision: collection`); otherwise the configured one stays (`decision: configured`): the
    best of several hundred configurations on a few hundred queries is partly noise, and the global choice was
    made on labelled validation data. When no configuration ranks the pseudo-queries better than the first
    stage alone, reranking is off by default for the collection (`decision: off`, `rerank: false`; a request
    may still ask, and gets the configured depth and weights). `chosen` is the pseudo-query score of what the
    collection serves by default; `best` that of its best configuration, `p_value` its test."""
    found = select(
        {"pseudo": features},
        depths=depths,
        grid=grid,
        latency={d: 0.0 for d in depths},
        metrics={"pseudo": COLLECTION_METRIC},
        progress=progress,
    )
    row, hybrid = found["chosen"], float(found["hybrid"]["pseudo"])
    gain = float(row["gains"]["pseudo"])
    tied = [r for r in found["table"] if r["depth"] == row["depth"] and r["gains"]["pseudo"] >= gain - 1e-9]
    row = min(tied, key=lambda r: sum(1 for k in ("cross_encoder", "maxsim") if r["weights"][k] > 0))
    best = (int(row["depth"]), {k: round(float(v), 4) for k, v in row["weights"].items()})
    fixed = None
    if configured is not None:
        fixed = (configured[0], {"first_stage": 0.0, "cross_encoder": 0.0, "maxsim": 0.0, **configured[1]})
    p_value = None
    theirs = None if fixed is None else per_query(features, *fixed)  # the configured default, query by query
    if gain <= 0:
        decision, (depth, weights), served = "off", fixed or best, hybrid
    elif fixed is None or theirs is None:
        decision, (depth, weights), served = "collection", best, hybrid + gain
    else:
        ours = per_query(features, *best)
        p_value = paired_p(ours, theirs)
        if p_value < SIGNIFICANCE:
            decision, (depth, weights), served = "collection", best, float(ours.mean())
        else:
            decision, (depth, weights), served = "configured", fixed, float(theirs.mean())
    return {
        "rerank": decision != "off",
        "decision": decision,
        "depth": depth,
        "weights": weights,
        "stages": sorted(k for k, v in weights.items() if v > 0 and k != "first_stage"),
        "metric": COLLECTION_METRIC,
        "hybrid": round(hybrid, 4),
        "chosen": round(served, 4),
        "best": round(hybrid + gain, 4),
        "best_depth": best[0],
        "best_weights": best[1],
        "p_value": None if p_value is None else round(p_value, 4),
        "queries": len(features.qids),
        **({} if theirs is None else {"global_default": round(float(theirs.mean()), 4)}),
    }


def choose_for_collection(
    index: Path,
    settings: Settings,
    queries: int = COLLECTION_QUERIES,
    seed: int = 13,
    progress: bool = True,
    step: float = STEP,
) -> dict[str, Any]:
    """Choose the second stage of the collection whose index folder (or build) is `index`, without labels.

    1. Pseudo-queries: `queries` documents of the current build (drawn with `seed`), one sentence cut out of
       each (`app.eval.pseudo.pseudo_query_set`, the rule of the out-of-domain validation set); its document
       is the one relevant one.
    2. A scratch copy of the build (hard links) updated with those documents, sentence removed (only they are
       re-encoded: `indexer.update.update_bundle`), so that no query is found by its own copy.
    3. Its hybrid top-100 per query scored by the configured cross-encoder and stored-vector MaxSim (`collect`),
       and `collection_choice` over depths up to `reranker.depth` and the weights on the simplex in steps of
       `step` (the global selection's grid by default).

    Returns the record for the build's manifest (`indexer.build.annotate_bundle(index, "second_stage", …)`),
    with the configured global default's pseudo-query score beside it. The scratch copy lives in a hidden
    `.choose-*` folder of the index folder (one file system for the links) and is removed at the end; nothing
    of the collection itself is written."""
    import os
    import tempfile

    from app.eval.pseudo import MIN_SENTENCES, pseudo_query_set
    from app.services import load_pipeline
    from indexer.bundle import CURRENT, DOCSTORE, link_tree, open_bundle
    from indexer.docstore import Docstore
    from indexer.update import update_bundle

    rs = settings.reranker
    if rs.model is None or is_maxsim(rs.model):
        raise ValueError("reranker.model names no cross-encoder: the second stage to choose is the cross-encoder's")
    if not (Path(index) / CURRENT).exists():
        raise ValueError(f"{index} is not an index folder (no `current`): pass the folder `sift index build` wrote")
    info = open_bundle(index, verify=True)
    if info.manifest.get("shards"):
        raise ValueError(
            f"{info.root} is a sharded build: choose on its unsharded source, then `sift index reshard` it "
            "(a reshard keeps the choice)"
        )
    if not (info.manifest.get("dense") or {}).get("token_vectors"):
        raise ValueError(f"{info.root} stores no token vectors: rebuild with index.dense.token_vectors for MaxSim")
    store = Docstore(info.path(DOCSTORE), connections=1)
    try:
        records = [{"_id": d.id, "title": d.title, "text": d.text} for d, _, _ in store.documents()]
    finally:
        store.close()
    pseudo = pseudo_query_set(records, queries, seed=seed, source=info.build_id)
    if len(pseudo.queries) < MIN_COLLECTION_QUERIES:
        raise ValueError(
            f"only {len(pseudo.queries)} documents of {info.build_id} have {MIN_SENTENCES} usable sentences or more "
            f"to cut a query from (need ≥ {MIN_COLLECTION_QUERIES} such documents); keep the global default"
        )
    settings = settings.model_copy(update={"reranker": rs.model_copy(update={"maxsim": True})})
    reranker, first_stage, models = scorers(settings)
    first_stage.reranker.per_collection = False  # the copy's own record (a choice made before) plays no part
    changed = {doc for qrel in pseudo.qrels.values() for doc in qrel}
    # the scratch copy lives in the index folder (hidden: never taken for a build), so hard links stay on one
    # file system
    with tempfile.TemporaryDirectory(prefix=".choose-", dir=Path(index)) as tmp:
        scratch = Path(tmp) / "index"
        scratch.mkdir()

        link_tree(info.root, scratch / info.build_id)
        os.symlink(info.build_id, scratch / CURRENT)
        cut = Path(tmp) / "cut.jsonl"
        cut.write_text("".join(json.dumps(r) + "\n" for r in pseudo.corpus if r["_id"] in changed), encoding="utf-8")
        update_bundle(scratch, add=cut, show_progress=progress)
        depths = sorted({d for d in DEPTHS if d <= rs.depth} | {rs.depth})  # the configured one is a candidate too
        pipeline = load_pipeline(first_stage, scratch, models, verify=False)
        try:  # scored only as deep as a chosen depth can go
            features = collect(
                "pseudo", pipeline, reranker, pseudo.queries, pseudo.qrels, progress, max(depths), max(depths)
            )
        finally:
            pipeline.docstore.close()
    configured = (rs.depth, dict(rs.weights)) if rs.weights is not None else None
    record = collection_choice(features, depths, weight_grid(step), progress, configured)
    record.update({"reranker": model_name(rs.model), "seed": seed, "build": info.build_id})
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("var/second_stage"))
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2].parent / "shared")
    parser.add_argument("--datasets", nargs="*", default=[*VALIDATION, *TEST])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    collect_all(args.out, args.shared, args.datasets)
    measure_latency(args.out, args.shared)


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:  # Features was pickled by `python -m` (module __main__)
        return Features if name == "Features" else super().find_class(module, name)


def load_features(out: Path, names: Sequence[str]) -> dict[str, Features]:
    """Features cached by `main` under `out`."""
    out_features = {}
    for name in names:
        with open(out / f"{name}.pkl", "rb") as handle:
            out_features[name] = _Unpickler(handle).load()
    return out_features


if __name__ == "__main__":
    main()
