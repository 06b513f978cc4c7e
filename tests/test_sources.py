"""Ingestion: every input format, and bad input that is reported (file and line) or skipped with a count."""

from __future__ import annotations

import pytest

from indexer.config import CsvSettings
from indexer.sources import ReadReport, SourceError, read_documents
from tests.conftest import write_jsonl


def test_jsonl_reads_beir_fields_and_metadata(tmp_path):
    path = write_jsonl(
        tmp_path / "c.jsonl",
        [
            {"_id": "a", "title": "Alpha", "text": "first text", "metadata": {"topic": "x"}},
            {"_id": 2, "text": "second text"},
        ],
    )
    docs = list(read_documents(path))
    assert [(d.id, d.title, d.text, d.metadata) for d in docs] == [
        ("a", "Alpha", "first text", {"topic": "x"}),
        ("2", "", "second text", {}),
    ]


def test_folder_reads_txt_md_html_with_titles(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "plain_notes.txt").write_text("Just some text.", encoding="utf-8")
    (tmp_path / "sub" / "guide.md").write_text("Intro line\n\n# Real Title\n\nBody here.", encoding="utf-8")
    (tmp_path / "page.html").write_text(
        "<html><head><title>Tab</title><style>p{}</style></head><body><h1>Page Heading</h1>"
        "<p>Para one &amp; more.</p><script>var x=1;</script><p>Para two.</p></body></html>",
        encoding="utf-8",
    )
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    docs = {d.id: d for d in read_documents(tmp_path)}
    assert set(docs) == {"plain_notes", "sub/guide", "page"}
    assert docs["plain_notes"].title == "plain notes"
    assert docs["sub/guide"].title == "Real Title"
    assert docs["page"].title == "Page Heading"
    assert "Para one & more." in docs["page"].text and "var x" not in docs["page"].text
    assert docs["page"].metadata == {"path": "page.html", "format": "html"}


def test_csv_with_configured_columns_keeps_other_columns_as_metadata(tmp_path):
    path = tmp_path / "docs.csv"
    path.write_text('key,heading,body,year\nk1,T1,"hello, world",2020\nk2,T2,second,2021\n', encoding="utf-8")
    docs = list(
        read_documents(path, csv_columns=CsvSettings(id_column="key", title_column="heading", text_column="body"))
    )
    assert [(d.id, d.title, d.text, d.metadata) for d in docs] == [
        ("k1", "T1", "hello, world", {"year": "2020"}),
        ("k2", "T2", "second", {"year": "2021"}),
    ]


def test_csv_missing_column_names_the_column(tmp_path):
    path = tmp_path / "docs.csv"
    path.write_text("id,body\n1,x\n", encoding="utf-8")
    with pytest.raises(SourceError, match=r"docs.csv:1: column 'text' not in header"):
        list(read_documents(path))


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"_id": "a", "text": "x"}', "{not json"], r"c.jsonl:2: malformed JSON"),
        (['{"_id": "a", "text": "x"}', '{"_id": "a", "text": "y"}'], r"c.jsonl:2: duplicate document id 'a'"),
        (['{"text": "x"}'], r"c.jsonl:1: missing '_id'"),
        (['{"_id": "a", "text": "   "}'], r"c.jsonl:1: document 'a' has empty text"),
        (['{"_id": "a", "text": 5}'], r"c.jsonl:1: field 'text' must be a string"),
        (['["a"]'], r"c.jsonl:1: expected a JSON object"),
    ],
)
def test_bad_jsonl_lines_are_errors_naming_file_and_line(tmp_path, lines, message):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(SourceError, match=message):
        list(read_documents(path))


def test_bad_encoding_is_reported_with_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"_id": "a", "text": "ok"}\n{"_id": "b", "text": "caf\xe9"}\n')
    with pytest.raises(SourceError, match=r"c.jsonl:2: not valid UTF-8"):
        list(read_documents(path))


def test_empty_inputs_are_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(SourceError, match="empty.jsonl: file is empty"):
        list(read_documents(tmp_path / "empty.jsonl"))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "blank.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(SourceError, match=r"blank.txt: file is empty"):
        list(read_documents(folder))
    with pytest.raises(SourceError, match="no such file"):
        list(read_documents(tmp_path / "missing.jsonl"))


def test_skip_bad_counts_every_skipped_record(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(
        b'{"_id": "a", "text": "ok"}\n{broken\n{"_id": "a", "text": "dup"}\n{"_id": "b", "text": "\xff"}\n'
        b'{"_id": "c", "text": "fine"}\n'
    )
    report = ReadReport()
    docs = list(read_documents(path, skip_bad=True, report=report))
    assert [d.id for d in docs] == ["a", "c"]
    assert report.read == 2
    assert len(report.skipped) == 3
    assert any(":2: malformed JSON" in s for s in report.skipped)
    assert any(":3: duplicate document id" in s for s in report.skipped)
    assert any(":4: not valid UTF-8" in s for s in report.skipped)
