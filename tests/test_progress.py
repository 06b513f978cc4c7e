"""Long CLI jobs show progress bars with a total, so tqdm can print an ETA."""

from __future__ import annotations

import re

from indexer.build import build_bundle
from indexer.config import DenseSettings, IndexConfig
from indexer.sources import estimate_documents
from tests.conftest import EXAMPLES, write_jsonl


def test_document_estimates_for_each_input_kind(tmp_path):
    assert estimate_documents(EXAMPLES) == 147
    folder = tmp_path / "docs"
    folder.mkdir()
    for name in ("a.md", "b.txt", "c.html", "skip.bin"):
        (folder / name).write_text("# Title\n\nSome text.")
    assert estimate_documents(folder) == 3
    csv = tmp_path / "docs.csv"
    csv.write_text("id,title,text\n1,a,one\n2,b,two\n\n")
    assert estimate_documents(csv) == 2
    assert estimate_documents(tmp_path / "missing.jsonl") is None


def test_build_shows_bars_with_totals_and_eta(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"_id": f"d{i}", "title": "t", "text": f"text {i}"} for i in range(40)])
    config = IndexConfig(dense=DenseSettings(enabled=False))
    build_bundle(corpus, tmp_path / "index", config, show_progress=True)
    err = capsys.readouterr().err
    # "index: 100%|…| 40/40 [00:00<00:00, …]": a total, and elapsed<remaining (the ETA)
    assert re.search(r"index: 100%.*40/40 \[\d\d:\d\d<\d\d:\d\d", err), err[-2000:]
    assert re.search(r"tokenise: 100%.*40/40 \[\d\d:\d\d<\d\d:\d\d", err), err[-2000:]
