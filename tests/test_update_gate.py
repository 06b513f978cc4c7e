"""`sift index update` (incremental) equals a full build of the final corpus; the quality gate refuses a
broken build and lets a good one through."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest

from indexer.bm25 import BM25Index
from indexer.build import GateRefused, build_bundle
from indexer.bundle import BM25_DIR, DENSE_DIR, DOCSTORE, list_builds, open_bundle
from indexer.config import IndexConfig
from indexer.dense import INDEX_FILE
from indexer.docstore import Docstore
from indexer.gate import make_gate
from indexer.update import update_bundle
from tests.conftest import EXAMPLES, ROOT, write_jsonl

QUERIES = ["how do stars form", "sourdough starter", "coral reef bleaching", "tides and the moon", "zebra migration"]


def corpus() -> list[dict]:
    return [json.loads(line) for line in EXAMPLES.read_text().splitlines()]


def passages_and_scores(out: Path) -> tuple[list[tuple[str, str]], dict[str, dict[str, float]], dict[str, np.ndarray]]:
    info = open_bundle(out)
    store = Docstore(info.path(DOCSTORE))
    rows = store.passage_texts()
    config = IndexConfig.model_validate(info.manifest["config"])
    bm25 = BM25Index.load(info.path(BM25_DIR), config.bm25, mmap=False)
    bm25_scores = {q: dict(zip([r[0] for r in rows], bm25.scores(q).tolist())) for q in QUERIES}
    index = faiss.read_index(str(info.path(DENSE_DIR) / INDEX_FILE))
    vectors = dict(zip([r[0] for r in rows], index.reconstruct_n(0, index.ntotal)))
    store.close()
    return sorted((r[0], r[2]) for r in rows), bm25_scores, vectors


def test_update_equals_a_full_build_of_the_final_corpus(tmp_path, encoder):
    docs = corpus()
    out = tmp_path / "index"
    parent = build_bundle(write_jsonl(tmp_path / "v1.jsonl", docs), out, show_progress=False)
    deleted = [docs[3]["_id"], docs[40]["_id"]]
    changed = {**docs[10], "text": docs[10]["text"] + " Zebras also migrate here every year."}
    added = [
        {"_id": "new-001", "title": "Zebra migration", "text": "Zebras migrate across the Serengeti in great herds."},
        {
            "_id": "new-002",
            "title": "Quiet stars",
            "text": "Red dwarfs burn slowly and may shine for trillions of years.",
        },
    ]
    unchanged_resent = docs[20]
    (tmp_path / "delete.txt").write_text("# ids to delete\n" + "\n".join(deleted) + "\n")
    write_jsonl(tmp_path / "add.jsonl", [changed, *added, unchanged_resent])
    result = update_bundle(out, tmp_path / "add.jsonl", tmp_path / "delete.txt", show_progress=False)
    manifest = open_bundle(out).manifest
    assert manifest["parent"] == parent.build_id and result.build_id == manifest["build_id"]
    update = manifest["update"]
    assert (update["added"], update["changed"], update["deleted"], update["unchanged_resent"]) == (2, 1, 2, 1)
    # one passage each: 3 encoded (changed + 2 added); 3 dropped (2 deleted + the old version of the changed one)
    assert update["passages_encoded"] == 3 and update["passages_reused"] == parent.passages - 3

    final = [d for d in docs if d["_id"] not in deleted and d["_id"] != changed["_id"]] + [changed, *added]
    full = build_bundle(write_jsonl(tmp_path / "final.jsonl", final), tmp_path / "full", show_progress=False)
    assert full.passages == result.passages and full.documents == result.documents == len(final)
    got, want = passages_and_scores(out), passages_and_scores(tmp_path / "full")
    assert got[0] == want[0], "the same passages (ids and texts)"
    for q in QUERIES:
        for pid, score in want[1][q].items():
            assert got[1][q][pid] == pytest.approx(score, abs=1e-5), (q, pid)
    probe = encoder.encode(QUERIES, normalize_embeddings=True)
    for pid, vector in want[2].items():
        assert np.abs(probe @ got[2][pid] - probe @ vector).max() <= 1e-3, pid
    assert got[1]["zebra migration"]["new-001#0"] > 0


def test_update_refuses_bad_input_and_keeps_the_current_build(tmp_path):
    out = tmp_path / "index"
    first = build_bundle(EXAMPLES, out, IndexConfig(dense={"enabled": False}), show_progress=False).build_id
    (tmp_path / "delete.txt").write_text("no-such-doc\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", "from app.cli import main; main()", "index", "update", "--out", str(out)]
    unknown = subprocess.run([*cmd, "--delete", str(tmp_path / "delete.txt")], capture_output=True, text=True, env=env)
    assert unknown.returncode == 1 and "not in build" in unknown.stderr and "no-such-doc" in unknown.stderr
    nothing = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert nothing.returncode == 1 and "nothing to do" in nothing.stderr
    (tmp_path / "bad.jsonl").write_text('{"_id": "x", "title": "t"}\n')
    bad = subprocess.run([*cmd, "--add", str(tmp_path / "bad.jsonl")], capture_output=True, text=True, env=env)
    assert bad.returncode == 1 and "--skip-bad" in bad.stderr
    assert list_builds(out) == [first] and open_bundle(out).build_id == first


@pytest.fixture(scope="module")
def gate_dataset(tmp_path_factory) -> Path:
    """A small BEIR dataset over examples/: for 16 documents, a query of every 6th word of its text (terms
    spread over the whole document, as a broad question would be)."""
    root = tmp_path_factory.mktemp("gate-data")
    docs = corpus()[::9][:16]
    queries = [{"_id": f"q{i}", "text": " ".join(d["text"].split()[::6][:10])} for i, d in enumerate(docs)]
    write_jsonl(root / "queries.jsonl", queries)
    (root / "corpus.jsonl").symlink_to(EXAMPLES)
    (root / "qrels").mkdir()
    lines = ["query-id\tcorpus-id\tscore"] + [f"q{i}\t{d['_id']}\t1" for i, d in enumerate(docs)]
    (root / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.heavy
def test_gate_refuses_broken_builds_and_passes_a_good_one(tmp_path, gate_dataset):
    out = tmp_path / "index"
    first = build_bundle(EXAMPLES, out, show_progress=False).build_id
    messages: list[str] = []
    gate = make_gate(gate_dataset, max_drop=0.01, echo=messages.append)
    with pytest.raises(GateRefused, match="new build .* published build") as refused:  # measured 0.90 vs 0.97
        build_bundle(EXAMPLES, out, IndexConfig(chunking={"window": 8, "overlap": 2}), show_progress=False, gate=gate)
    new_score, old_score = (float(x) for x in __import__("re").findall(r" (0\.\d{4}|1\.0000)", str(refused.value))[:2])
    assert new_score < old_score - 0.01, str(refused.value)
    with pytest.raises(GateRefused, match=r"cannot run on bundle .* supports modes \['bm25'\]"):
        build_bundle(EXAMPLES, out, IndexConfig(dense={"enabled": False}), show_progress=False, gate=gate)
    assert list_builds(out) == [first] and open_bundle(out).build_id == first, "refused builds leave no trace"
    good = build_bundle(EXAMPLES, out, show_progress=False, gate=gate)
    assert open_bundle(out).build_id == good.build_id
    assert "new build" in messages[-1] and f"published build {first}" in messages[-1]
