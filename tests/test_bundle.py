"""The bundle: round trip, checksum verification, atomic publish, and kill -9 during a build."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from indexer.build import build_bundle
from indexer.bundle import CURRENT, BundleError, list_builds, open_bundle
from indexer.config import IndexConfig
from indexer.docstore import Docstore
from indexer.sources import SourceError
from tests.conftest import EXAMPLES, ROOT, write_jsonl

DOCS = [
    {
        "_id": "sun",
        "title": "The Sun",
        "text": "The Sun is a star that fuses hydrogen into helium.",
        "metadata": {"t": "space"},
    },
    {
        "_id": "bread",
        "title": "Bread",
        "text": "Yeast makes bread dough rise by releasing carbon dioxide.",
        "metadata": {"t": "food"},
    },
    {
        "_id": "git",
        "title": "Git",
        "text": "Git records project history as a graph of commits.",
        "metadata": {"t": "code"},
    },
]


@pytest.fixture()
def small_index(tmp_path) -> Path:
    out = tmp_path / "index"
    build_bundle(write_jsonl(tmp_path / "c.jsonl", DOCS), out, show_progress=False)
    return out


def test_round_trip_manifest_docstore_and_indexes(small_index):
    info = open_bundle(small_index)
    m = info.manifest
    assert m["format_version"] == 1 and m["counts"] == {"documents": 3, "passages": 3, "skipped": 0}
    assert m["dense"]["model"] == "sentence-transformers/all-MiniLM-L6-v2" and m["dense"]["dimension"] == 384
    assert m["config"]["bm25"] == {"method": "lucene", "k1": 0.9, "b": 0.4, "stemmer": "english", "stopwords": "en"}
    assert {"docstore.sqlite", "dense/index.faiss", "dense/embeddings.f16.npy"} <= set(m["files"])
    assert all(len(entry["sha256"]) == 64 for entry in m["files"].values())
    assert (small_index / CURRENT).is_symlink() and info.root.name == m["build_id"]
    store = Docstore(info.path("docstore.sqlite"))
    doc = store.document("bread")
    assert doc["title"] == "Bread" and doc["metadata"] == {"t": "food"}
    assert doc["passages"][0]["id"] == "bread#0" and doc["passages"][0]["text"] == DOCS[1]["text"]
    assert store.filter_mask({"t": ["food", "code"]}).tolist() == [0.0, 1.0, 1.0]


def test_corrupted_file_is_detected_by_checksum(small_index):
    info = open_bundle(small_index)
    target = next(p for p in (info.root / "bm25").iterdir() if p.is_file())
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"sha256 does not match the manifest; the bundle is damaged, rebuild it"):
        open_bundle(small_index)


def test_missing_truncated_and_unknown_format_are_refused(small_index):
    info = open_bundle(small_index)
    (info.root / "dense" / "index.faiss").write_bytes(b"short")
    with pytest.raises(BundleError, match="size 5 bytes, manifest says"):
        open_bundle(small_index)
    (info.root / "dense" / "index.faiss").unlink()
    with pytest.raises(BundleError, match="listed in the manifest but missing"):
        open_bundle(small_index)
    manifest = json.loads((info.root / "manifest.json").read_text())
    manifest["format_version"] = 99
    (info.root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="bundle format 99"):
        open_bundle(small_index)
    with pytest.raises(BundleError, match="no such bundle"):
        open_bundle(small_index / "nope")


def test_failed_build_leaves_published_bundle_and_no_temp_dir(small_index, tmp_path):
    before = open_bundle(small_index).build_id
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"_id": "a", "text": "ok"}\n{oops\n', encoding="utf-8")
    with pytest.raises(SourceError, match="bad.jsonl:2"):
        build_bundle(bad, small_index, show_progress=False)
    assert open_bundle(small_index).build_id == before
    assert not list(small_index.glob(".building-*"))


def test_second_build_switches_current_and_keeps_first(small_index, tmp_path):
    first = open_bundle(small_index).build_id
    result = build_bundle(write_jsonl(tmp_path / "d.jsonl", DOCS[:2]), small_index, show_progress=False)
    assert open_bundle(small_index).build_id == result.build_id != first
    assert list_builds(small_index) == sorted([first, result.build_id])
    assert result.summary().startswith("built 2 documents, 2 passages in ")


def _build_cmd(out: Path) -> list[str]:
    code = "from app.cli import main; main()"
    return [sys.executable, "-c", code, "index", "build", "--input", str(EXAMPLES), "--out", str(out), "--no-progress"]


@pytest.mark.heavy
def test_kill_9_at_any_point_leaves_previous_bundle_served(tmp_path):
    """Kill a build at spread-out moments (model load, chunking, BM25, encoding, publish); after each kill the
    published bundle still verifies and answers searches, and the next build cleans up the leftovers."""
    from app.services import Models, load_pipeline
    from app.settings import load_settings

    out = tmp_path / "index"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    subprocess.run(_build_cmd(out), check=True, env=env, capture_output=True, cwd=ROOT)
    duration = time.perf_counter() - started
    published = {open_bundle(out).build_id}
    settings = load_settings(bundle=out, reranker={"model": None})
    models = Models()  # the bi-encoder loads once for every check below
    killed_mid_build = 0
    for fraction in (0.1, 0.35, 0.6, 0.8, 0.95):
        process = subprocess.Popen(
            _build_cmd(out), env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(duration * fraction)
        process.send_signal(signal.SIGKILL)
        process.wait()
        killed_mid_build += bool(list(out.glob(".building-*")))
        info = open_bundle(out, verify=True)  # whatever `current` points at is complete and intact
        if info.build_id not in published:  # the build finished before the kill landed
            published.add(info.build_id)
        pipeline = load_pipeline(settings, out, models)
        assert pipeline.searchers["bm25"].search("sourdough starter", 3)[0].doc_id == "cook-003"
        pipeline.docstore.close()
    build_bundle(EXAMPLES, out, IndexConfig(dense={"enabled": False}), show_progress=False)
    assert not list(out.glob(".building-*")), "the next build removes what killed builds left behind"
    assert killed_mid_build >= 3, "too few kills landed mid-build; the test did not exercise what it claims"
