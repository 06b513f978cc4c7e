"""The combined second stage: token vectors stored in the bundle (round trip, equality with re-encoding,
corrupt files refused, kept by updates), the z-score fusion of first stage, cross-encoder and MaxSim, and
its explain output through the API."""

from __future__ import annotations

import asyncio
import json
import shutil

import numpy as np
import pytest

from app.retrieval.reranker import combine_stages
from app.retrieval.types import Hit, StageScore
from indexer.bundle import BundleError
from indexer.tokens import TokenStore, TokenStoreError, TokenWriter, quantize_int8
from tests.conftest import ROOT

CORPUS = ROOT / "examples" / "corpus.jsonl"


@pytest.fixture(scope="module")
def token_index(int8_example_index):
    return int8_example_index


@pytest.fixture(scope="module")
def maxsim_pipeline(token_index):
    from app.services import load_pipeline
    from app.settings import load_settings

    settings = load_settings(
        bundle=token_index, reranker={"model": "maxsim", "maxsim": True, "interpolation": 0.5, "weights": None}
    )
    return load_pipeline(settings)


def test_int8_quantisation_round_trips_unit_vectors():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(50, 384)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    q, scales = quantize_int8(v)
    assert q.dtype == np.int8 and scales.shape == (50,)
    assert np.abs(q.astype(np.float32) * scales[:, None] - v).max() < 0.5 * scales.max() + 1e-6


def test_bundle_round_trip_and_manifest(token_index):
    from indexer.bundle import open_bundle

    info = open_bundle(token_index, verify=True)
    meta = info.manifest["dense"]["token_vectors"]
    store = TokenStore.open(info.path("dense"), info.manifest["counts"]["passages"])
    assert meta["passages"] == info.manifest["counts"]["passages"] == len(store.offsets) - 1
    assert meta["tokens"] == store.data.shape[0] > 50 * meta["passages"]  # whole passages, not a token or two
    assert meta["dtype"] == "int8" and meta["dimension"] == 384
    norms = np.linalg.norm(store.vectors(0), axis=1)
    assert np.allclose(norms, 1.0, atol=0.01)
    # the files are covered by the manifest's checksums
    assert {"dense/tokens.int8.bin", "dense/tokens.offsets.npy", "dense/tokens.scales.npy"} <= set(
        info.manifest["files"]
    )


def test_stored_maxsim_equals_maxsim_from_reencoding(maxsim_pipeline):
    from app.retrieval.maxsim import LateInteraction

    pipeline = maxsim_pipeline
    assert pipeline.late is not None and pipeline.late.stored
    reencoded = LateInteraction(pipeline.searchers["dense"])
    correlations = []
    for query in ("how do vaccines train the immune system", "baking bread with sourdough", "python programming"):
        hits = asyncio.run(pipeline.search(query, pipeline.options(k=40, rerank=False))).hits
        pairs, _ = pipeline.rerank_pairs([query], [hits])
        stored = pipeline.late.score(query, [h.idx for h in hits], [])
        fresh = reencoded.score(query, [h.idx for h in hits], [t for _, t in pairs])
        assert np.abs(stored - fresh).max() < 0.01
        correlations.append(np.corrcoef(stored, fresh)[0, 1])
    assert min(correlations) >= 0.999, correlations


def test_a_corrupt_or_mismatched_store_is_refused(token_index, tmp_path):
    from app.services import load_pipeline
    from app.settings import load_settings

    copy = tmp_path / "index"
    shutil.copytree(token_index, copy, symlinks=True)
    build = (copy / "current").resolve()
    passages = json.loads((build / "manifest.json").read_text())["counts"]["passages"]
    data = build / "dense" / "tokens.int8.bin"
    with pytest.raises(TokenStoreError, match="cover"):
        TokenStore.open(build / "dense", passages + 1)
    with open(data, "r+b") as handle:  # truncated by a byte
        handle.truncate(data.stat().st_size - 1)
    with pytest.raises(TokenStoreError, match="truncated or corrupt"):
        TokenStore.open(build / "dense", passages)
    settings = load_settings(bundle=copy, reranker={"model": "maxsim", "maxsim": True})
    with pytest.raises(BundleError):
        load_pipeline(settings, verify=False)  # the store's own checks, even without checksums
    with pytest.raises(BundleError):
        load_pipeline(settings, verify=True)


def test_offsets_must_agree_with_the_data(tmp_path):
    with TokenWriter(tmp_path, "float16") as writer:
        writer.add(np.eye(3, 8, dtype=np.float32))
        writer.add(np.ones((2, 8), dtype=np.float32))
        meta = writer.close()
    assert meta["tokens"] == 5 and meta["passages"] == 2
    store = TokenStore.open(tmp_path, 2)
    assert np.allclose(store.vectors(1), np.full((2, 8), 8**-0.5), atol=1e-3)
    np.save(tmp_path / "tokens.offsets.npy", np.array([0, 4, 3], dtype=np.int64))
    with pytest.raises(TokenStoreError, match="offsets"):
        TokenStore.open(tmp_path, 2)


def test_an_update_keeps_stored_token_vectors(token_index, tmp_path):
    from indexer.bundle import open_bundle
    from indexer.update import update_bundle

    copy = tmp_path / "index"
    shutil.copytree(token_index, copy, symlinks=True)
    parent = open_bundle(copy)
    parent_store = TokenStore.open(parent.path("dense"), parent.manifest["counts"]["passages"])
    added = tmp_path / "add.jsonl"
    added.write_text(
        json.dumps({"_id": "new-1", "title": "Tea", "text": "Green tea is steamed, black tea oxidised."}) + "\n"
    )
    update_bundle(copy, add=added, show_progress=False)
    child = open_bundle(copy)
    store = TokenStore.open(child.path("dense"), child.manifest["counts"]["passages"])
    assert len(store.offsets) - 1 == len(parent_store.offsets)  # one new passage
    assert np.array_equal(store.vectors(0), parent_store.vectors(0))  # kept rows copied as stored
    assert child.manifest["dense"]["token_vectors"]["passages"] == child.manifest["counts"]["passages"]


def _hit(idx: int, score: float) -> Hit:
    return Hit(idx, f"p{idx}", f"d{idx}", score, {"fused": StageScore(score, idx + 1)})


def test_combine_stages_fuses_z_scores_and_records_every_stage():
    hits = [_hit(i, s) for i, s in enumerate([3.0, 2.0, 1.0, 0.0])]
    ce = np.array([0.0, 0.0, 5.0, 0.0])
    ms = np.array([0.1, 0.9, 0.2, 0.3])
    only_first = combine_stages(hits, {"cross_encoder": ce, "maxsim": ms}, {"first_stage": 1.0})
    assert [h.idx for h in only_first] == [0, 1, 2, 3]
    out = combine_stages(
        hits, {"cross_encoder": ce, "maxsim": ms}, {"first_stage": 0.2, "cross_encoder": 0.5, "maxsim": 0.3}
    )
    assert out[0].idx == 2  # the cross-encoder's clear favourite
    z = lambda v: (v - v.mean()) / v.std()  # noqa: E731
    expected = 0.2 * z(np.array([3.0, 2, 1, 0])) + 0.5 * z(ce) + 0.3 * z(ms)
    assert [h.idx for h in out] == sorted(range(4), key=lambda i: (-expected[i], i))
    assert [round(h.score, 6) for h in out] == [round(expected[h.idx], 6) for h in out]
    top = out[0].stages
    assert top["rerank"] == StageScore(5.0, 1, None)  # the cross-encoder's raw score, final rank
    assert top["maxsim"].score == pytest.approx(0.2) and top["maxsim"].rank == 3  # MaxSim's own rank
    assert top["fused"].rank == 3  # first-stage provenance kept


def test_settings_validate_weights():
    from pydantic import ValidationError

    from app.settings import RerankerSettings

    with pytest.raises(ValidationError, match="unknown second-stage weights"):
        RerankerSettings(weights={"bm25": 1.0})
    with pytest.raises(ValidationError, match="at least one"):
        RerankerSettings(weights={"maxsim": 0.0})
    s = RerankerSettings(interpolation=0.6, weights=None)  # no weights: split from `interpolation`
    assert s.stage_weights(cross_encoder=True, maxsim=True) == pytest.approx(
        {"first_stage": 0.4, "cross_encoder": 0.3, "maxsim": 0.3}
    )
    s = RerankerSettings(weights={"first_stage": 0.3, "cross_encoder": 0.4, "maxsim": 0.3})
    assert s.stage_weights(cross_encoder=False, maxsim=True)["cross_encoder"] == 0.0


def test_search_explains_maxsim_and_rerank_through_http(token_index):
    from app.settings import load_settings
    from tests.servers import app_client

    settings = load_settings(
        bundle=token_index,
        # maxsim_pipeline's second stage at its configured depth (12: every hit of the page is reranked), uncalibrated
        reranker={"model": "maxsim", "maxsim": True, "interpolation": 0.5, "weights": None, "latency_budget_ms": 0},
        answer={"reader": None},  # no answer backend
    )
    with app_client(settings) as client:
        response = client.post("/v1/search", json={"query": "immune system vaccines", "k": 5})
        assert response.status_code == 200, response.text
        body = response.json()
    hits = body["hits"]
    assert len(hits) == 5
    ranks = [h["explain"]["rerank"]["rank"] for h in hits]
    assert ranks == [1, 2, 3, 4, 5]
    assert all(h["explain"]["maxsim"]["score"] > 0 for h in hits)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)


def test_selection_limits_depth_by_measured_latency():
    """The selection's depth limit: with a measured p50 per depth (`measure_latency`), the deepest within
    `MEASURED_HEADROOM` of the budget; none fits → 0 (select then falls back to the smallest depth)."""
    from app.training import second_stage as ss

    measured = {8: 113.0, 10: 146.0, 12: 153.0, 15: 203.0, 20: 247.0}
    assert ss.max_depth_within_budget([], 200, latency=measured) == 12  # 180 ms allowed at 90 %
    assert ss.max_depth_within_budget([], 250, latency=measured) == 15
    assert ss.max_depth_within_budget([], 100, latency=measured) == 0


def test_pseudo_queries_are_cut_out_of_their_document():
    """The label-free validation set: each query is a usable sentence of one document (never its first
    usable one), gone from that document's text in the corpus, and that document is its one relevant
    document; other documents are unchanged; the same seed gives the same set."""
    from app.eval.pseudo import pseudo_query_set, sentences

    records = [
        {
            "_id": f"d{i}",
            "title": f"d{i}",
            "text": f"Object {i} parses the given input quickly. It returns a list of tokens for record {i}. "
            f"Each token keeps its offset within the source text {i}. Errors raise a ValueError naming line {i}.",
        }
        for i in range(20)
    ]
    found = pseudo_query_set(records, 5, seed=3)
    assert len(found.queries) == 5 and set(found.queries) == set(found.qrels)
    by_id = {r["_id"]: r for r in found.corpus}
    original = {r["_id"]: r for r in records}
    for qid, query in found.queries.items():
        (doc,) = found.qrels[qid]
        assert query in sentences(original[doc]["text"])[1:]
        assert query in original[doc]["text"] and query not in by_id[doc]["text"]
        assert len(sentences(by_id[doc]["text"])) == 3
    untouched = set(original) - {d for rel in found.qrels.values() for d in rel}
    assert len(untouched) == 15 and all(by_id[d] == original[d] for d in untouched)
    assert pseudo_query_set(records, 5, seed=3) == found and pseudo_query_set(records, 5, seed=4) != found
    # documents too short to give a query (a lower-cased or terse corpus has many) stay in the corpus, undrawn
    short = [{"_id": f"s{i}", "title": "", "text": f"A short note about item {i} only."} for i in range(30)]
    mixed = pseudo_query_set(short + records, 50, seed=3)
    assert len(mixed.queries) == 20 and len(mixed.corpus) == 50
    assert {d for rel in mixed.qrels.values() for d in rel} == set(original)


def test_stdlib_docstrings_make_an_out_of_domain_corpus():
    """`stdlib_docs` (run in its own process: it imports the standard library) yields hundreds of distinct
    docstrings with at least 3 usable sentences each, named by their qualified names, in a fixed order."""
    import subprocess
    import sys

    code = (
        "import json; from app.eval.pseudo import stdlib_docs, sentences; d = stdlib_docs(); "
        "print(json.dumps([len(d), len({r['text'] for r in d}), min(len(sentences(r['text'])) for r in d), "
        "[r['_id'] for r in d] == sorted(r['_id'] for r in d), 'json.dumps' in {r['_id'] for r in d}]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    count, distinct, fewest, ordered, has_json = json.loads(out.stdout.strip().splitlines()[-1])
    assert count >= 300 and distinct == count and fewest >= 3 and ordered, (count, distinct, fewest, ordered)
    assert has_json, "json.dumps's docstring (several sentences of prose) is missing"
