"""A second stage chosen for one collection without labels (`sift reranker choose`): the choice itself (a stage
that hurts is turned down; reranking is off where nothing beats the first stage), its record in a new build's
manifest (files shared, checksums sealed, kept by updates), and a real server serving it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from app.retrieval.types import Hit
from app.training.second_stage import Features, collection_choice, score, weight_grid
from indexer.bundle import BundleError
from tests.conftest import ROOT, write_jsonl

DEPTH = 8


def _features(ce_helps: bool, maxsim_helps: bool, relevant_at: int, n: int = 40) -> Features:
    """`n` queries whose one relevant document sits at rank `relevant_at` (0-based) of the first stage; each
    reranker ranks it first (helps) or last (hurts), with the rest in a query-dependent shuffled order."""
    rng = np.random.default_rng(7)
    features = Features("synthetic", [], {}, [])
    for q in range(n):
        qid = f"q{q}"
        hits = [Hit(i, f"p{q}-{i}", f"d{q}-{i}", float(DEPTH - i)) for i in range(DEPTH)]
        features.qids.append(qid)
        features.qrels[qid] = {f"d{q}-{relevant_at}": 1}
        features.ranked.append(hits)
        for helps, out in ((ce_helps, features.cross_encoder), (maxsim_helps, features.maxsim)):
            scores = rng.uniform(0.0, 1.0, DEPTH)
            scores[relevant_at] = 2.0 if helps else -1.0
            out.append(scores)
    return features


CONFIGURED = (DEPTH, {"first_stage": 0.25, "cross_encoder": 0.45, "maxsim": 0.3})


def test_a_stage_that_hurts_the_collection_is_turned_down():
    features = _features(ce_helps=False, maxsim_helps=True, relevant_at=4)
    record = collection_choice(features, [DEPTH], configured=CONFIGURED)
    assert record["rerank"] is True and record["decision"] == "collection" and record["p_value"] < 0.05
    assert record["weights"]["cross_encoder"] == 0.0 and record["weights"]["maxsim"] > 0
    assert record["stages"] == ["maxsim"]
    hybrid = score(features, None, None)["mrr@10"]
    assert record["hybrid"] == pytest.approx(hybrid, abs=1e-4) and hybrid == pytest.approx(0.2)
    assert record["chosen"] == pytest.approx(1.0)  # MaxSim puts every relevant document first
    # and the other way round
    record = collection_choice(_features(ce_helps=True, maxsim_helps=False, relevant_at=4), [DEPTH])
    assert record["stages"] == ["cross_encoder"] and record["weights"]["maxsim"] == 0.0
    # a coarser grid (`--step`) chooses among its own weights only
    coarse = collection_choice(_features(ce_helps=True, maxsim_helps=False, relevant_at=4), [DEPTH], weight_grid(0.5))
    assert set(coarse["weights"].values()) <= {0.0, 0.5, 1.0} and coarse["stages"] == ["cross_encoder"]


def test_reranking_is_off_where_nothing_beats_the_first_stage():
    features = _features(ce_helps=False, maxsim_helps=False, relevant_at=0)
    record = collection_choice(features, [DEPTH], configured=CONFIGURED)
    assert record["hybrid"] == pytest.approx(1.0) == record["chosen"]  # what it serves: the first stage
    assert record["rerank"] is False and record["decision"] == "off"
    # a request that asks to rerank there gets the configured second stage, not an arbitrary grid row
    assert record["depth"] == DEPTH and record["weights"] == CONFIGURED[1]
    assert record["stages"] == ["cross_encoder", "maxsim"]


def test_the_configured_default_stays_unless_the_collection_beats_it_significantly():
    # both stages rank the relevant document first: the configured weights already reach MRR@10 1.0, and the
    # grid's best (fewer stages) only ties them
    features = _features(ce_helps=True, maxsim_helps=True, relevant_at=5)
    record = collection_choice(features, [DEPTH], configured=CONFIGURED)
    assert record["decision"] == "configured" and record["p_value"] == 1.0
    assert (record["depth"], record["weights"]) == CONFIGURED and record["chosen"] == pytest.approx(1.0)
    assert len(record["best_weights"]) == 3 and record["best"] == pytest.approx(1.0)
    # a gain on a few queries is not enough either
    few = _features(ce_helps=False, maxsim_helps=True, relevant_at=4, n=40)
    for i in range(38):  # the configured weights already find 38 of 40 (a resample misses both 2: p ≈ 0.13)
        few.cross_encoder[i][4] = 2.0
    record = collection_choice(few, [DEPTH], configured=CONFIGURED)
    assert record["best"] > record["chosen"] and record["p_value"] >= 0.05 and record["decision"] == "configured"


def test_paired_bootstrap():
    from app.training.second_stage import paired_p

    assert paired_p(np.ones(50), np.zeros(50)) == 0.0
    assert paired_p(np.zeros(50), np.ones(50)) == 1.0
    assert paired_p(np.ones(50), np.ones(50)) == 1.0
    one_win = np.zeros(50)
    one_win[0] = 1.0
    assert 0.3 < paired_p(one_win, np.zeros(50)) < 0.7  # one query of 50: drawn ~64 % of the time


def test_a_choice_applies_only_with_its_reranker_and_stages():
    from app.services import collection_second_stage
    from app.settings import load_settings
    from indexer.bundle import BundleInfo

    record = {
        "rerank": True,
        "depth": 10,
        "weights": {"first_stage": 0.2, "cross_encoder": 0.0, "maxsim": 0.8},
        "stages": ["maxsim"],
        "reranker": "sift-reranker-minilm-l6",
    }
    info = BundleInfo(ROOT, {"build_id": "b", "second_stage": record})
    assert collection_second_stage(info, load_settings()) == record
    assert collection_second_stage(info, load_settings(reranker={"per_collection": False})) is None
    assert collection_second_stage(info, load_settings(reranker={"model": "org/another-reranker"})) is None
    assert collection_second_stage(info, load_settings(reranker={"maxsim": False})) is None  # it needs MaxSim
    assert collection_second_stage(BundleInfo(ROOT, {"build_id": "b"}), load_settings()) is None


@pytest.fixture(scope="module")
def chosen_index(example_index, tmp_path_factory):
    """A copy of the example index after `sift reranker choose` (the CLI, as a user runs it): (index folder,
    the build chosen on, the CLI's output)."""
    from indexer.bundle import open_bundle

    index = tmp_path_factory.mktemp("chosen") / "index"
    shutil.copytree(example_index, index, symlinks=True)
    before = open_bundle(index, verify=True)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "app.cli",
            "reranker",
            "choose",
            "--index",
            str(index),
            "--queries",
            "40",
            "--step",
            "0.1",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return index, before, done.stdout


def test_sift_reranker_choose_records_the_choice_in_a_new_build(chosen_index):
    from indexer.bundle import DOCSTORE, open_bundle

    index, before, printed = chosen_index
    after = open_bundle(index, verify=True)  # every checksum holds
    assert after.build_id != before.build_id and after.manifest["parent"] == before.build_id
    record = after.manifest["second_stage"]
    assert record["build"] == before.build_id and record["reranker"] == "sift-reranker-minilm-l6"
    assert record["metric"] == "mrr@10" and 20 <= record["queries"] <= 40
    assert record["depth"] in (8, 10, 12) and abs(sum(record["weights"].values()) - 1) < 1e-6
    assert record["best"] >= max(record["hybrid"], record["global_default"]) - 1e-9
    if record["decision"] == "collection":
        assert record["p_value"] < 0.05 and record["chosen"] == record["best"]
    elif record["decision"] == "configured":  # the global default's depth and weights, and its score
        assert record["p_value"] >= 0.05 and record["chosen"] == record["global_default"] and record["depth"] == 12
        assert record["weights"] == {"first_stage": 0.25, "cross_encoder": 0.45, "maxsim": 0.3}
    else:  # served by default: the first stage alone; a request asking to rerank gets the configured stage
        assert not record["rerank"] and record["chosen"] == record["hybrid"] and record["depth"] == 12
    assert f"served by default        {record['chosen']:.4f}" in printed
    # the data files are the parent's, shared: nothing was rebuilt or re-encoded
    assert os.stat(after.path(DOCSTORE)).st_ino == os.stat(before.path(DOCSTORE)).st_ino
    assert after.manifest["files"] == before.manifest["files"]
    assert after.manifest["counts"] == before.manifest["counts"]


def test_the_served_pipeline_takes_the_collection_choice(chosen_index):
    from app.services import load_pipeline
    from app.settings import load_settings

    index, _, _ = chosen_index
    pipeline = load_pipeline(load_settings(bundle=index))
    record = pipeline.bundle.manifest["second_stage"]
    assert pipeline.collection_choice == record
    assert pipeline.settings.reranker.depth == record["depth"] == pipeline.options().rerank_depth
    assert pipeline.stage_weights == record["weights"]
    assert pipeline.options().rerank is record["rerank"]
    assert pipeline.late is not None and pipeline.reranker is not None  # a stage weighed 0 scores, moves nothing
    configured = load_pipeline(load_settings(bundle=index, reranker={"per_collection": False}))
    assert configured.collection_choice is None
    assert configured.stage_weights == {"first_stage": 0.25, "cross_encoder": 0.45, "maxsim": 0.3}
    assert configured.options().rerank_depth == 12


def test_an_update_keeps_the_choice_and_a_server_serves_and_reloads_it(chosen_index, tmp_path):
    from indexer.bundle import open_bundle
    from indexer.update import update_bundle
    from tests.servers import sift_server

    index = tmp_path / "index"
    shutil.copytree(chosen_index[0], index, symlinks=True)  # the module's copy stays as chosen
    record = open_bundle(index).manifest["second_stage"]
    new = write_jsonl(tmp_path / "new.jsonl", [{"_id": "kiln-1", "title": "Kilns", "text": "A kiln fires clay."}])
    result = update_bundle(index, add=new, show_progress=False)
    assert open_bundle(result.path).manifest["second_stage"] == record
    with sift_server({"SIFT_BUNDLE": str(index), "SIFT_GENERATOR__BACKEND": "none"}) as (base, _):
        info = httpx.get(f"{base}/v1/info", timeout=30).json()
        stage = info["second_stage"]
        assert stage["chosen_for_collection"] == record and stage["rerank_by_default"] is record["rerank"]
        assert stage["configured_depth"] == record["depth"] and stage["weights"] == record["weights"]
        found = httpx.post(f"{base}/v1/search", json={"query": "a kiln fires clay", "k": 3}, timeout=60).json()
        assert found["hits"][0]["doc_id"] == "kiln-1"
        assert ("rerank" in found["hits"][0]["explain"]) is record["rerank"]  # reranked by default, or not
        asked = {"query": "a kiln fires clay", "k": 3, "rerank": True}
        found = httpx.post(f"{base}/v1/search", json=asked, timeout=60).json()
        assert found["hits"][0]["explain"]["rerank"] is not None  # a request may always ask
        # a new choice published while the server runs: reloaded, and its depth measured again (not the
        # served build's calibration, which was made for another depth)
        from indexer.build import annotate_bundle

        served = info["bundle"]["build_id"]
        other = {
            **record,
            "rerank": True,
            "depth": 8,
            "weights": {"first_stage": 0.5, "cross_encoder": 0.5, "maxsim": 0.0},
        }
        other["stages"], other["build"] = ["cross_encoder"], served
        published = annotate_bundle(index, "second_stage", other, expected=served).build_id

        def reloaded() -> dict:
            return httpx.get(f"{base}/v1/info", timeout=30).json()

        deadline = time.monotonic() + 60  # catches "never reloads", no claim about speed
        while reloaded()["bundle"]["build_id"] != published:
            assert time.monotonic() < deadline, "the server never reloaded the annotated build"
            time.sleep(0.2)
        stage = reloaded()["second_stage"]
        assert stage["chosen_for_collection"] == other and stage["configured_depth"] == 8
        assert stage["weights"] == other["weights"] and stage["depth"] <= 8
        calibration = stage["calibration"]
        assert calibration is None or calibration["configured_depth"] == 8
        found = httpx.post(f"{base}/v1/search", json=asked, timeout=60).json()
        assert found["hits"][0]["explain"].get("maxsim") is not None  # weighed 0: it still scores
    with pytest.raises(BundleError, match="run the command again"):  # chosen on a build no longer current
        annotate_bundle(index, "second_stage", other, expected=served)
