"""The ingest log of an index folder: batches of upserts and deletes accepted over HTTP, each durable on disk
before it is acknowledged, applied later as one incremental update (`sift index apply-ingest`).

    <index folder>/ingest/
        .lock                               flock: sequence numbers are given and batches trimmed under it
        last_seq                            the highest sequence number ever given (task ids never repeat)
        batches/<seq>-<op>-<count>.json     one accepted batch: {"seq", "op", "accepted_at", "items", "sha256"}

Invariants:
- A batch file appears whole or not at all (written to a temporary name, fsynced, renamed, the folder
  fsynced): a crash leaves either nothing or a complete, checksummed batch. `append` returns only after that,
  so an acknowledged batch survives a power cut.
- Sequence numbers increase across processes (they are given under the flock) and are never reused, also after
  a trim, because `last_seq` is raised with each batch and a batch's file name carries its number.
- A published build records the highest sequence number it contains (`manifest["ingest"]["applied_seq"]`),
  so a batch is pending exactly when its number is above the served build's; applying is idempotent (an
  upsert replaces a document by id, a delete of an absent id does nothing), so replaying after a crash between
  publish and trim changes nothing.
- The name of a batch file gives its operation and item count, so the backlog is counted without reading it.

This module is shared by the server (appending, counting) and the offline apply job (reading, trimming); it
imports nothing of either.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

INGEST_DIR = "ingest"
BATCHES_DIR = "batches"
LAST_SEQ_FILE = "last_seq"
LOCK_FILE = ".lock"
APPLIER_LOCK_FILE = "applier.lock"  # held by the one process (of all workers and replicas) that applies

Operation = Literal["upsert", "delete"]


class IngestLogError(RuntimeError):
    """The ingest log cannot be read or written (a corrupt batch, a full disk)."""


@dataclass(frozen=True)
class BatchName:
    """What a batch file's name says: its sequence number, operation and item count."""

    seq: int
    op: Operation
    count: int

    @property
    def file_name(self) -> str:
        return f"{self.seq:012d}-{self.op}-{self.count}.json"

    @classmethod
    def parse(cls, name: str) -> BatchName | None:
        stem, dot, ext = name.partition(".")
        parts = stem.split("-")
        if ext != "json" or not dot or len(parts) != 3 or parts[1] not in ("upsert", "delete"):
            return None
        if not (parts[0].isdigit() and parts[2].isdigit()):
            return None
        return cls(int(parts[0]), parts[1], int(parts[2]))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Batch:
    """One accepted batch: upserted documents (records as `sift index build` reads them) or deleted ids."""

    seq: int
    op: Operation
    items: list[Any]
    accepted_at: float


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _digest(seq: int, op: str, items: list[Any]) -> str:
    return hashlib.sha256(json.dumps([seq, op, items], sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def applied_seq(manifest: dict[str, Any]) -> int:
    """The highest ingest sequence number a build contains (0: none)."""
    return int((manifest.get("ingest") or {}).get("applied_seq", 0))


class IngestLog:
    """The ingest log of the index folder `root` (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.folder = self.root / INGEST_DIR
        self.batches = self.folder / BATCHES_DIR

    def _ensure(self) -> None:
        if not self.batches.is_dir():
            self.batches.mkdir(parents=True, exist_ok=True)
            _fsync_dir(self.folder)
            _fsync_dir(self.root)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """The log's exclusive flock (released if the process dies)."""
        self._ensure()
        fd = os.open(self.folder / LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _last_seq(self, floor: int) -> int:
        try:
            recorded = int((self.folder / LAST_SEQ_FILE).read_text().strip() or 0)
        except (OSError, ValueError):
            recorded = 0
        names = [n.seq for n in self.names()]
        return max([recorded, floor, *names])

    def try_applier_lock(self) -> int | None:
        """Take the folder's applier lock without waiting: the open descriptor holding it (close it to let go;
        the lock dies with the process), or None when another process holds it."""
        self._ensure()
        fd = os.open(self.folder / APPLIER_LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def last_seq(self) -> int:
        """The highest sequence number given so far (0: none)."""
        return self._last_seq(0)

    def append(self, op: Operation, items: list[Any], applied: int = 0) -> int:
        """Write one batch durably and return its sequence number (above every number given before and above
        `applied`, the served build's). Raises `IngestLogError` when the disk refuses."""
        if op not in ("upsert", "delete"):
            raise ValueError(f"op must be upsert or delete, not {op!r}")
        try:
            with self.locked():
                seq = self._last_seq(applied) + 1
                body: dict[str, Any] = {"seq": seq, "op": op, "accepted_at": time.time(), "items": items}
                body["sha256"] = _digest(seq, op, items)
                name = BatchName(seq, op, len(items)).file_name
                tmp = self.batches / f".{name}.tmp"
                with tmp.open("w", encoding="utf-8") as handle:
                    json.dump(body, handle, ensure_ascii=False)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, self.batches / name)
                _fsync_dir(self.batches)
                last = self.folder / LAST_SEQ_FILE
                last_tmp = self.folder / f".{LAST_SEQ_FILE}.tmp"
                last_tmp.write_text(str(seq))
                os.replace(last_tmp, last)  # not fsynced: after a crash the batch files' names raise it again
                return seq
        except OSError as exc:
            raise IngestLogError(f"{self.batches}: cannot write the batch ({exc.strerror or exc})") from exc

    def names(self, after: int = 0) -> list[BatchName]:
        """Batches on disk numbered above `after`, in order (names only: nothing is read)."""
        if not self.batches.is_dir():
            return []
        found = [BatchName.parse(p.name) for p in self.batches.iterdir()]
        return sorted((n for n in found if n is not None and n.seq > after), key=lambda n: n.seq)

    def backlog(self, after: int) -> tuple[int, int]:
        """(batches, items) pending above `after`."""
        names = self.names(after)
        return len(names), sum(n.count for n in names)

    def read(self, name: BatchName) -> Batch:
        path = self.batches / name.file_name
        try:
            body = json.loads(path.read_text(encoding="utf-8"))
            seq, op, items = int(body["seq"]), body["op"], body["items"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise IngestLogError(f"{path}: unreadable batch ({exc})") from exc
        matches = (seq, op, len(items)) == (name.seq, name.op, name.count)
        if not matches or body.get("sha256") != _digest(seq, op, items):
            raise IngestLogError(f"{path}: the batch does not match its checksum or name; the file is corrupt")
        return Batch(seq, op, items, float(body.get("accepted_at", 0.0)))

    def pending(self, after: int, max_items: int | None = None) -> list[Batch]:
        """Batches above `after`, in order, as many whole batches as fit in `max_items` (at least one)."""
        out: list[Batch] = []
        total = 0
        for name in self.names(after):
            if out and max_items is not None and total + name.count > max_items:
                break
            out.append(self.read(name))
            total += name.count
        return out

    def trim(self, through: int) -> int:
        """Delete the batches numbered up to `through` (they are in a published build); returns how many."""
        removed = 0
        with self.locked():
            for name in self.names():
                if name.seq <= through:
                    (self.batches / name.file_name).unlink(missing_ok=True)
                    removed += 1
            if removed:
                _fsync_dir(self.batches)
        return removed


@dataclass
class Changes:
    """Pending batches folded into one update: the last operation on an id wins."""

    upserts: dict[str, dict[str, Any]]
    deletes: set[str]
    through: int
    batches: int
    oldest_accepted_at: float


def fold(batches: list[Batch]) -> Changes:
    """Fold batches in sequence order: an upsert replaces any earlier upsert or delete of its id, a delete
    removes any earlier upsert of its id."""
    upserts: dict[str, dict[str, Any]] = {}
    deletes: set[str] = set()
    for batch in batches:
        if batch.op == "upsert":
            for record in batch.items:
                doc_id = str(record.get("_id", record.get("id")))
                deletes.discard(doc_id)
                upserts.pop(doc_id, None)  # re-inserted: its position follows the newest upsert
                upserts[doc_id] = record
        else:
            for doc_id in batch.items:
                upserts.pop(str(doc_id), None)
                deletes.add(str(doc_id))
    return Changes(
        upserts,
        deletes,
        through=batches[-1].seq if batches else 0,
        batches=len(batches),
        oldest_accepted_at=min((b.accepted_at for b in batches), default=0.0),
    )


__all__ = [
    "Batch",
    "BatchName",
    "Changes",
    "IngestLog",
    "IngestLogError",
    "applied_seq",
    "fold",
]
