"""The SQLite docstore of a bundle: documents, passages (row `idx` = position in BM25 and FAISS) and
metadata as JSON. Written once by the indexer; opened read-only (immutable) by the server.

Metadata lives on documents (from the source) and on passages (e.g. zero-shot tags, indexer/tagging.py);
a passage's metadata as read is its document's with its own keys over it, and filters match that merged
view. Bundles written before passages had metadata read as documents' metadata alone.
"""

from __future__ import annotations

import contextlib
import json
import queue
import sqlite3
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from indexer.models import Document, Passage

SCHEMA = """
CREATE TABLE documents (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    text TEXT NOT NULL,
    metadata TEXT NOT NULL
);
CREATE TABLE passages (
    idx INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    doc_id TEXT NOT NULL REFERENCES documents(id),
    position INTEGER NOT NULL,
    text TEXT NOT NULL,
    start INTEGER NOT NULL,
    "end" INTEGER NOT NULL,
    metadata TEXT
);
CREATE INDEX passages_doc ON passages(doc_id, position);
"""


class DocstoreWriter:
    """Appends documents and their passages; passage `idx` values are assigned in insertion order."""

    def __init__(self, path: Path) -> None:
        self.connection = sqlite3.connect(path)
        self.connection.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;" + SCHEMA)
        self.passage_count = 0
        self.document_count = 0

    def add(self, document: Document, passages: Sequence[Passage]) -> None:
        self.connection.execute(
            "INSERT INTO documents VALUES (?, ?, ?, ?)",
            (document.id, document.title, document.text, json.dumps(document.metadata, ensure_ascii=False)),
        )
        self.connection.executemany(
            "INSERT INTO passages VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    self.passage_count + i,
                    p.id,
                    p.doc_id,
                    p.position,
                    p.text,
                    p.start,
                    p.end,
                    json.dumps(p.metadata, ensure_ascii=False) if p.metadata else None,
                )
                for i, p in enumerate(passages)
            ],
        )
        self.passage_count += len(passages)
        self.document_count += 1

    def close(self) -> None:
        self.connection.commit()
        self.connection.close()


@runtime_checkable
class DocstoreReader(Protocol):
    """What serving reads from a build's passages and documents (the pipeline, the engine, the answerer, the
    calibration and the shard fan-out call only these). Rows are the build's: `idx` is a passage's row in
    BM25 and FAISS alike. Declared by `Docstore` (one bundle), `app.retrieval.shards.ShardedDocstore` (a
    sharded build, global rows) and `app.serving_ray.RemoteShard` (a shard behind Ray Serve)."""

    num_passages: int
    num_documents: int

    def passages(self, indices: Iterable[int]) -> dict[int, dict[str, Any]]:
        """Passages (with their document's title and metadata) by row; unknown rows are absent."""
        ...

    def passages_by_id(self, passage_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Passages by passage id; unknown ids are absent."""
        ...

    def document(self, doc_id: str) -> dict[str, Any] | None:
        """A document with its passages in order, or None."""
        ...

    def passage_rows(self) -> list[tuple[str, str]]:
        """(passage id, doc_id) of every passage, in row order."""
        ...

    def passage_texts(self) -> list[tuple[str, str, str]]:
        """(passage id, document title, passage text) of every passage, in row order."""
        ...

    def filter_mask(self, filters: dict[str, Any]) -> np.ndarray:
        """1.0 for the rows whose document metadata matches every filter, else 0.0 (one value per row)."""
        ...

    def unavailable(self) -> list[str]:
        """Names of the parts that do not answer now (`/readyz`): a docstore in this process always answers."""
        ...

    def close(self) -> None: ...


class Docstore(DocstoreReader):
    """Read-only access to a bundle's docstore; safe to share between threads.

    All connections are opened when the docstore is (a small pool, borrowed per call), so a served build
    keeps answering even if its folder is deleted underneath it: open files outlive their directory entry.
    """

    def __init__(self, path: Path, connections: int = 4) -> None:
        self.path = Path(path)
        # a URI with the path percent-encoded, so '#', '?', spaces and non-ASCII names work
        self._uri = f"file:{urllib.parse.quote(str(self.path.resolve()))}?mode=ro&immutable=1"
        self._pool: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._all = [self._open() for _ in range(max(1, connections))]
        for connection in self._all:
            self._pool.put(connection)
        with self._connect() as connection:
            self.num_passages: int = connection.execute("SELECT COUNT(*) FROM passages").fetchone()[0]
            self.num_documents: int = connection.execute("SELECT COUNT(*) FROM documents").fetchone()[0]
            columns = {r[1] for r in connection.execute("PRAGMA table_info(passages)")}
        # passages' own metadata (SQL expression): NULL in a bundle written before passages had any
        self._pmeta = "p.metadata" if "metadata" in columns else "NULL"

    def _open(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self._uri, uri=True, check_same_thread=False)
        connection.row_factory = sqlite3.Row
        connection.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()  # file and schema read now
        return connection

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        connection = self._pool.get()
        try:
            yield connection
        finally:
            self._pool.put(connection)

    def close(self) -> None:
        for connection in self._all:
            connection.close()

    def unavailable(self) -> list[str]:
        return []

    def _passages_where(self, column: str, values: list[Any]) -> Iterator[dict[str, Any]]:
        """Passages (with their document's title and metadata) whose `column` (idx or id) is in `values`,
        queried in chunks below SQLite's parameter limit."""
        with self._connect() as connection:
            for offset in range(0, len(values), 900):
                chunk = values[offset : offset + 900]
                marks = ",".join("?" * len(chunk))
                query = (
                    'SELECT p.idx, p.id, p.doc_id, p.position, p.text, p.start, p."end", d.title, d.metadata, '
                    f"{self._pmeta} AS passage_metadata "
                    f"FROM passages p JOIN documents d ON d.id = p.doc_id WHERE p.{column} IN ({marks})"
                )
                for row in connection.execute(query, chunk):
                    item = dict(row)
                    item["metadata"] = _merged(item["metadata"], item.pop("passage_metadata"))
                    yield item

    def passages(self, indices: Iterable[int]) -> dict[int, dict[str, Any]]:
        """Passages (with their document's title and metadata) by row index."""
        return {item["idx"]: item for item in self._passages_where("idx", [int(i) for i in indices])}

    def passages_by_id(self, passage_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Passages by passage id; unknown ids are absent from the result."""
        return {item["id"]: item for item in self._passages_where("id", list(dict.fromkeys(passage_ids)))}

    def document(self, doc_id: str) -> dict[str, Any] | None:
        """A document with its passages in order, or None."""
        with self._connect() as connection:
            row = connection.execute("SELECT * FROM documents WHERE id = ?", (doc_id,)).fetchone()
            if row is None:
                return None
            document = dict(row)
            document["metadata"] = json.loads(document["metadata"])
            document["passages"] = [
                {**dict(p), "metadata": json.loads(p["metadata"]) if p["metadata"] else {}}
                for p in connection.execute(
                    f'SELECT idx, id, position, text, start, "end", {self._pmeta.removeprefix("p.")} AS metadata '
                    "FROM passages WHERE doc_id = ? ORDER BY position",
                    (doc_id,),
                )
            ]
        return document

    def passage_rows(self) -> list[tuple[str, str]]:
        """(passage id, doc_id) of every passage, in row order (row = BM25 and FAISS position)."""
        with self._connect() as connection:
            return [(r[0], r[1]) for r in connection.execute("SELECT id, doc_id FROM passages ORDER BY idx")]

    def document_ids(self) -> set[str]:
        with self._connect() as connection:
            return {r[0] for r in connection.execute("SELECT id FROM documents")}

    def documents(self) -> Iterator[tuple[Document, list[Passage], list[int]]]:
        """Every document with its passages and their rows, in row order (what an update or a reshard copies),
        read as it goes: one document is held at a time."""
        query = (
            'SELECT p.idx, p.id, p.doc_id, p.position, p.text, p.start, p."end", d.title, d.text AS doc_text, '
            f"d.metadata, {self._pmeta} AS passage_metadata FROM passages p JOIN documents d ON d.id = p.doc_id "
            "ORDER BY p.idx"
        )
        with self._connect() as connection:
            document: Document | None = None
            passages: list[Passage] = []
            rows: list[int] = []
            for r in connection.execute(query):
                if document is None or r["doc_id"] != document.id:
                    if document is not None:
                        yield document, passages, rows
                    document = Document(r["doc_id"], r["title"], r["doc_text"], json.loads(r["metadata"]))
                    passages, rows = [], []
                own = json.loads(r["passage_metadata"]) if r["passage_metadata"] else {}
                passages.append(Passage(r["id"], r["doc_id"], r["position"], r["text"], r["start"], r["end"], own))
                rows.append(r["idx"])
            if document is not None:
                yield document, passages, rows

    def passage_counts(self) -> list[int]:
        """Passages of every document, in row order (documents are contiguous runs of rows)."""
        with self._connect() as connection:
            query = "SELECT doc_id, COUNT(*) FROM passages GROUP BY doc_id ORDER BY MIN(idx)"
            return [r[1] for r in connection.execute(query)]

    def passage_texts(self) -> list[tuple[str, str, str]]:
        """(passage id, document title, passage text) of every passage, in row order."""
        with self._connect() as connection:
            query = "SELECT p.id, d.title, p.text FROM passages p JOIN documents d ON d.id = p.doc_id ORDER BY p.idx"
            return [(row[0], row[1], row[2]) for row in connection.execute(query)]

    def filter_mask(self, filters: dict[str, Any]) -> np.ndarray:
        """1.0 for passages whose metadata (the passage's own keys over its document's) matches every filter,
        else 0.0. A filter value that is a list means "any of"; anything else means equality.
        """
        clauses: list[str] = []
        params: list[Any] = []
        for key, value in filters.items():
            path = "$." + json.dumps(str(key))
            values = value if isinstance(value, list) else [value]
            if not values:
                clauses.append("0")
                continue
            marks = ",".join("?" * len(values))
            own = f"json_extract({self._pmeta}, ?)" if self._pmeta != "NULL" else "NULL"
            clauses.append(f"COALESCE({own}, json_extract(d.metadata, ?)) IN ({marks})")
            params.extend([path, path] if self._pmeta != "NULL" else [path])
            params.extend(int(v) if isinstance(v, bool) else v for v in values)
        mask = np.zeros(self.num_passages, dtype=np.float32)
        where = " AND ".join(clauses) or "1"
        with self._connect() as connection:
            rows = connection.execute(
                f"SELECT p.idx FROM passages p JOIN documents d ON d.id = p.doc_id WHERE {where}", params
            ).fetchall()
        if rows:
            mask[np.fromiter((r[0] for r in rows), dtype=np.int64)] = 1.0
        return mask


def _merged(document: str, passage: str | None) -> dict[str, Any]:
    """A passage's metadata as read: its document's (JSON) with the passage's own keys (JSON or NULL) over it."""
    merged: dict[str, Any] = json.loads(document)
    if passage:
        merged.update(json.loads(passage))
    return merged
