"""Readers that turn a JSONL file, a folder of .txt/.md/.html files or a CSV file into `Document`s.

Every reader reports bad records as `SourceError` naming the file and line; with `skip_bad=True`
they are counted in `ReadReport.skipped` instead, never silently dropped.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from indexer.config import CsvSettings
from indexer.models import Document

FOLDER_SUFFIXES = (".txt", ".md", ".markdown", ".html", ".htm")


class SourceError(ValueError):
    """A record that cannot be ingested; the message names the file and line."""


@dataclass
class ReadReport:
    """What a reader saw: documents read and bad records skipped (with reasons)."""

    read: int = 0
    skipped: list[str] = field(default_factory=list)


def read_documents(
    path: Path,
    *,
    skip_bad: bool = False,
    csv_columns: CsvSettings | None = None,
    report: ReadReport | None = None,
) -> Iterator[Document]:
    """Yield documents from `path`, picking the reader by what the path is.

    Duplicate document ids are an error (or skipped and counted with `skip_bad`).
    """
    path = Path(path)
    report = report if report is not None else ReadReport()
    if not path.exists():
        raise SourceError(f"{path}: no such file or folder; pass --input a JSONL file, CSV file or folder")
    if path.is_dir():
        records = _read_folder(path)
    elif path.suffix.lower() in (".jsonl", ".ndjson"):
        records = _read_jsonl(path)
    elif path.suffix.lower() in (".csv", ".tsv"):
        records = _read_csv(path, csv_columns or CsvSettings())
    else:
        raise SourceError(
            f"{path}: unsupported input type {path.suffix!r}; use .jsonl, .csv/.tsv or a folder of "
            f"{', '.join(FOLDER_SUFFIXES)} files"
        )
    seen: set[str] = set()
    for where, item in records:
        if isinstance(item, SourceError):
            error = item
        elif item.id in seen:
            error = SourceError(f"{where}: duplicate document id {item.id!r}")
        elif not item.text.strip():
            error = SourceError(f"{where}: document {item.id!r} has empty text")
        else:
            seen.add(item.id)
            report.read += 1
            yield item
            continue
        if not skip_bad:
            raise SourceError(f"{error} (pass --skip-bad to skip and count such records)")
        report.skipped.append(str(error))


def estimate_documents(path: Path) -> int | None:
    """About how many records `read_documents(path)` will see (for a progress bar's total and ETA), from one
    cheap pass: non-blank lines of a JSONL file, supported files of a folder, lines of a CSV after its header
    (a quoted newline counts twice, so this can over-count). None when it cannot tell."""
    path = Path(path)
    try:
        if path.is_dir():
            return sum(1 for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FOLDER_SUFFIXES)
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".ndjson", ".csv", ".tsv"):
            with path.open("rb") as handle:
                lines = sum(1 for line in handle if line.strip())
            return max(lines - 1, 0) if suffix in (".csv", ".tsv") else lines
    except OSError:
        return None
    return None


def _read_jsonl(path: Path) -> Iterator[tuple[str, Document | SourceError]]:
    """Records line by line (the file is streamed, never read whole)."""
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise SourceError(f"{path}: cannot read ({exc.strerror})") from exc
    seen_any = False
    with handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            seen_any = True
            yield _jsonl_record(f"{path}:{number}", line)
    if not seen_any:
        raise SourceError(f"{path}: file is empty")


def _jsonl_record(where: str, line: bytes) -> tuple[str, Document | SourceError]:
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return where, SourceError(f"{where}: not valid UTF-8 ({exc.reason} at byte {exc.start})")
    except json.JSONDecodeError as exc:
        return where, SourceError(f"{where}: malformed JSON ({exc.msg}, column {exc.colno})")
    parsed = record_document(where, record)
    return where, parsed


def record_document(where: str, record: object) -> Document | SourceError:
    """A JSON record as `sift index build` reads it (`_id` or `id`, `text`, optional `title` and `metadata`),
    or the error naming `where` and the field at fault (JSONL files and documents sent over HTTP alike)."""
    if not isinstance(record, dict):
        return SourceError(f"{where}: expected a JSON object, got {type(record).__name__}")
    doc_id = record.get("_id", record.get("id"))
    if doc_id is None or str(doc_id).strip() == "":
        return SourceError(f"{where}: missing '_id'")
    text = record.get("text")
    if not isinstance(text, str):
        return SourceError(f"{where}: field 'text' must be a string")
    metadata = record.get("metadata") or {}
    if not isinstance(metadata, dict):
        return SourceError(f"{where}: field 'metadata' must be an object")
    return Document(str(doc_id), str(record.get("title") or ""), text, metadata)


def _read_folder(folder: Path) -> Iterator[tuple[str, Document | SourceError]]:
    """One document per file; its id is the path below `folder` without the extension. Two files that would
    share an id (`a.md` and `a.txt`) are an error naming both, so neither silently replaces the other."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in FOLDER_SUFFIXES)
    if not files:
        raise SourceError(f"{folder}: no {', '.join(FOLDER_SUFFIXES)} files found")
    owners: dict[str, Path] = {}
    for file in files:
        where = str(file)
        rel = file.relative_to(folder)
        doc_id = str(rel.with_suffix(""))
        if doc_id in owners:
            yield (
                where,
                SourceError(
                    f"{where}: document id {doc_id!r} is also the id of {owners[doc_id]} (folder ids are paths without "
                    "the extension); rename one of the two files"
                ),
            )
            continue
        owners[doc_id] = file
        try:
            content = file.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            yield where, SourceError(f"{where}: not valid UTF-8 ({exc.reason} at byte {exc.start})")
            continue
        if not content.strip():
            yield where, SourceError(f"{where}: file is empty")
            continue
        suffix = file.suffix.lower()
        if suffix in (".html", ".htm"):
            title, text = _html_title_and_text(content)
        elif suffix in (".md", ".markdown"):
            title, text = _markdown_title(content), content
        else:
            title, text = "", content
        title = title or file.stem.replace("_", " ").replace("-", " ")
        metadata = {"path": str(rel), "format": suffix.lstrip(".")}
        yield where, Document(doc_id, title, text, metadata)


def _markdown_title(content: str) -> str:
    match = re.search(r"^\s{0,3}#{1,6}\s+(.+?)\s*#*\s*$", content, flags=re.MULTILINE)
    return match.group(1).strip() if match else ""


class _HtmlText(HTMLParser):
    _SKIP = {"script", "style", "head", "noscript"}
    _BLOCK = {"p", "div", "br", "li", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "section", "article"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title = ""
        self.heading = ""
        self._stack: list[str] = []

    def handle_starttag(self, tag: str, attrs: object) -> None:
        self._stack.append(tag)
        if tag in self._BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        while self._stack:
            if self._stack.pop() == tag:
                break

    def handle_data(self, data: str) -> None:
        if "title" in self._stack and not self.title:
            self.title = data.strip()
        if any(t in self._SKIP for t in self._stack):
            return
        if self._stack and self._stack[-1] in ("h1", "h2") and not self.heading and data.strip():
            self.heading = data.strip()
        self.parts.append(data)


def _html_title_and_text(content: str) -> tuple[str, str]:
    parser = _HtmlText()
    parser.feed(content)
    parser.close()
    text = re.sub(r"[ \t]+", " ", "".join(parser.parts))
    text = re.sub(r"\n\s*\n+", "\n\n", text).strip()
    return parser.heading or parser.title, text


def _read_csv(path: Path, columns: CsvSettings) -> Iterator[tuple[str, Document | SourceError]]:
    """Rows parsed by the csv module over the file itself (streamed; quoted newlines stay inside their field).
    A malformed row or a field over `columns.max_field_chars` is an error for that record only."""
    if csv.field_size_limit() < columns.max_field_chars:
        csv.field_size_limit(columns.max_field_chars)  # process-wide in the csv module; only ever raised
    try:
        handle = path.open(encoding="utf-8-sig", newline="")
        first = handle.read(1)
        handle.seek(0)
    except UnicodeDecodeError as exc:
        raise SourceError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise SourceError(f"{path}: cannot read ({exc.strerror})") from exc
    with handle:
        if not first:
            raise SourceError(f"{path}: file is empty")
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        reader = csv.DictReader(handle, delimiter=delimiter)
        try:
            header = reader.fieldnames or []
        except (csv.Error, UnicodeDecodeError) as exc:
            raise SourceError(f"{path}:1: unreadable header ({exc})") from exc
        for required in (columns.id_column, columns.text_column):
            if required not in header:
                raise SourceError(
                    f"{path}:1: column {required!r} not in header {header}; "
                    "choose columns with --id-column/--title-column/--text-column"
                )
        limit = columns.max_field_chars
        while True:
            where = f"{path}:{reader.line_num + 1}"
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield where, SourceError(f"{where}: unreadable row ({exc}; index.csv.max_field_chars is {limit})")
                continue
            except UnicodeDecodeError as exc:
                raise SourceError(f"{where}: not valid UTF-8 ({exc.reason})") from exc
            if None in row or any(v is None for v in row.values()):
                yield where, SourceError(f"{where}: row has {len(row.get(None) or [])} extra or missing fields")
                continue
            doc_id = (row.get(columns.id_column) or "").strip()
            if not doc_id:
                yield where, SourceError(f"{where}: empty {columns.id_column!r} column")
                continue
            named = (columns.id_column, columns.title_column, columns.text_column)
            metadata = {k: v for k, v in row.items() if k not in named}
            yield where, Document(doc_id, row.get(columns.title_column) or "", row[columns.text_column], metadata)
