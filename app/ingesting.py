"""Documents in over HTTP: one `Ingestor` per collection accepts batches into the index folder's ingest log
(`indexer.ingest`: durable before the 202) and, in the one process holding the folder's applier lock, applies
them as incremental updates and reloads.

    POST .../documents ──► validate (api/) ──► Ingestor.accept: backlog check, IngestLog.append (fsync) ──► 202
    applier (one per index folder, any worker) ── every `apply_interval_s`, or at once for a waiting request ──►
        `sift index apply-ingest --serve` (a long-lived child with the bi-encoder loaded: the build job never
        runs in the server process) ──► publish
        ──► this worker reloads now; the others at their next `server.reload_interval_s` check
    wait=true ──► until the served build's `ingest.applied_seq` reaches the batch's number

Invariants: nothing is acknowledged before it is on disk; a batch is searchable exactly when the served
build's `applied_seq` is at least its number; one apply at a time per folder (the applier lock between
servers, the update lock between the applier and `sift index update`); applying again after a crash changes
nothing (see `indexer.ingest`). The applier survives anything: a failed apply is logged, counted, reported in
the collection's status and retried after a pause.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from indexer.bundle import BundleError, open_bundle
from indexer.commands import sift_command
from indexer.ingest import IngestLog, Operation, applied_seq

if TYPE_CHECKING:
    from app.services import Collection
    from app.settings import IngestSettings

log = logging.getLogger(__name__)

Listener = Callable[[str, str, float], None]  # (collection, event, value): batch_upsert|batch_delete|apply|...


class BacklogFull(RuntimeError):
    """The collection's backlog would exceed `ingest.max_backlog_documents`."""

    def __init__(self, backlog: int, limit: int, retry_after_s: float) -> None:
        super().__init__(
            f"{backlog} documents are waiting to be applied; {limit} at most (ingest.max_backlog_documents): "
            f"retry after {retry_after_s:.0f} s"
        )
        self.retry_after_s = retry_after_s


class Ingestor:
    """The ingest side of one collection (see the module docstring)."""

    def __init__(self, collection: Collection, settings: IngestSettings, listener: Listener | None = None) -> None:
        self.collection = collection
        self.settings = settings
        self.log = IngestLog(collection.root)
        self.listener: Listener = listener or (lambda collection, event, value: None)
        self.applying = False  # this process holds the applier lock
        self.last_error: str | None = None
        self.applies = {"ok": 0, "failed": 0}
        self.last_apply_s: float | None = None
        self._kick = asyncio.Event()
        self._lock_fd: int | None = None
        self._child: asyncio.subprocess.Process | None = None

    # -- what the served and published builds hold --------------------------------------------------------

    def served_seq(self) -> int:
        """The highest batch number in the build this process serves (0 when none is loaded)."""
        current = self.collection.current
        return applied_seq(current.pipeline.bundle.manifest) if current is not None else 0

    def published_seq(self) -> int:
        """The highest batch number in the build `current` points at (published, maybe not yet loaded here)."""
        try:
            return applied_seq(open_bundle(self.collection.root, verify=False).manifest)
        except BundleError:
            return self.served_seq()

    def _published_and_backlog(self) -> tuple[int, int]:
        """The published build's batch number and the items pending above it (one trip off the event loop)."""
        published = self.published_seq()
        return published, self.log.backlog(published)[1]

    # -- accepting ----------------------------------------------------------------------------------------

    async def accept(self, op: Operation, items: list[Any]) -> int:
        """Append one validated batch durably; returns its number (the task id). Raises `BacklogFull`."""
        published, backlog = await asyncio.to_thread(self._published_and_backlog)
        if backlog + len(items) > self.settings.max_backlog_documents:
            retry = max(1.0, self.settings.apply_interval_s + (self.last_apply_s or 0.0))
            raise BacklogFull(backlog, self.settings.max_backlog_documents, retry)
        seq = await asyncio.to_thread(self.log.append, op, items, published)
        self.listener(self.collection.name, f"batch_{op}", float(len(items)))
        return seq  # applied at the applier's next round (`apply_interval_s`), or at once if a request waits on it

    async def wait_searchable(self, seq: int, timeout_s: float) -> bool:
        """Wait until this process serves a build holding batch `seq` (True), or `timeout_s` passes (False).
        Another worker's apply is loaded here as soon as it is published (not at the next watcher check)."""
        deadline = time.monotonic() + timeout_s
        self._kick.set()
        while True:
            if self.served_seq() >= seq:
                return True
            if await asyncio.to_thread(self.published_seq) >= seq:
                await self.collection.reload()
                if self.served_seq() >= seq:
                    return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)

    def task(self, seq: int) -> dict[str, Any] | None:
        """A batch's state: `searchable` (in the build served here), `applied` (published; this process
        loads it at its next reload), `enqueued`; None for a number never given."""
        if seq < 1 or seq > self.log.last_seq():
            return None
        published, served = self.published_seq(), self.served_seq()
        state = "searchable" if served >= seq else "applied" if published >= seq else "enqueued"
        body: dict[str, Any] = {"task": seq, "collection": self.collection.name, "status": state}
        if state == "enqueued" and self.last_error:
            body["last_apply_error"] = self.last_error
        return body

    def status(self) -> dict[str, Any]:
        """For `/v1/collections` and the playground: the backlog and the applier's state."""
        published = self.published_seq()
        batches, documents = self.log.backlog(published)
        return {
            "enabled": self.settings.enabled,
            "applied_seq": published,
            "served_seq": self.served_seq(),
            "backlog_batches": batches,
            "backlog_documents": documents,
            "applier_here": self.applying,
            "applies": dict(self.applies),
            "last_apply_s": self.last_apply_s,
            "last_apply_error": self.last_error,
        }

    # -- applying -----------------------------------------------------------------------------------------

    def _try_lock(self) -> bool:
        if self._lock_fd is None:
            self._lock_fd = self.log.try_applier_lock()
            self.applying = self._lock_fd is not None
        return self.applying

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
            self.applying = False

    async def run(self) -> None:
        """The applier loop (runs until cancelled; every worker runs one, the lock holder applies). Nothing is
        created in the index folder, and no child started, until a batch is pending; the child stops after
        `ingest.applier_idle_s` without work (the next batch starts it again)."""
        idle_since = time.monotonic()
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._kick.wait(), self.settings.apply_interval_s)
                self._kick.clear()
                try:
                    published = await asyncio.to_thread(self.published_seq)
                    if not await asyncio.to_thread(self.log.names, published):
                        if self._child is not None and time.monotonic() - idle_since > self.settings.applier_idle_s:
                            await self._stop_child()
                        continue
                    if not await asyncio.to_thread(self._try_lock):
                        continue
                    await asyncio.sleep(min(0.2, self.settings.apply_interval_s))  # gather a burst's batches
                    await self.apply_once()
                    idle_since = time.monotonic()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - the applier must survive anything
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    log.exception("ingest applier failed")
                    await asyncio.sleep(self.settings.apply_interval_s)
        finally:
            await self._stop_child()
            self._unlock()

    async def _applier(self) -> asyncio.subprocess.Process:
        """The long-lived `sift index apply-ingest --serve` child (started on first use, again if it died or
        idled out): the bi-encoder loads once, not once per apply."""
        child = self._child
        if child is None or child.returncode is not None:
            cmd = [*sift_command(), "index", "apply-ingest", "--out", str(self.collection.root), "--serve"]
            cmd += ["--max-documents", str(self.settings.apply_max_documents), "--no-progress"]
            cmd += ["--nice", str(self.settings.applier_nice), "--threads", str(self.settings.applier_threads)]
            cmd += ["--idle"] if self.settings.applier_sched_idle else []
            threads = str(self.settings.applier_threads)
            env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
            child = await asyncio.create_subprocess_exec(
                *cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=None, env=env
            )
            self._child = child
        return child

    async def _stop_child(self) -> None:
        child, self._child = self._child, None
        if child is not None and child.returncode is None:
            child.kill()
            await child.wait()

    async def apply_once(self) -> bool:
        """One apply by the applier child, then reload; True when it published. A child that does not answer
        within `ingest.apply_timeout_s` (or dies) is stopped; the batches stay pending and are retried."""
        started = time.perf_counter()
        child = await self._applier()
        assert child.stdin is not None and child.stdout is not None
        try:
            child.stdin.write(b"apply\n")
            await child.stdin.drain()
            line = await asyncio.wait_for(child.stdout.readline(), self.settings.apply_timeout_s)
            outcome = json.loads(line) if line else {"ok": False, "error": f"the applier exited ({child.returncode})"}
        except TimeoutError:
            outcome = {
                "ok": False,
                "error": f"no answer in {self.settings.apply_timeout_s:.0f} s (ingest.apply_timeout_s)",
            }
        except (OSError, ValueError) as exc:  # a broken pipe, a garbled answer
            outcome = {"ok": False, "error": f"the applier failed: {exc}"}
        except asyncio.CancelledError:  # the server stops: the child ends at end of input, or dies with us
            await self._stop_child()
            raise
        seconds = time.perf_counter() - started
        if not outcome.get("ok"):
            await self._stop_child()
            self.applies["failed"] += 1
            self.last_error = str(outcome.get("error"))
            self.listener(self.collection.name, "apply_failed", seconds)
            failure = {"event": "ingest_apply_failed", "collection": self.collection.name, "error": self.last_error}
            log.error(json.dumps(failure))
            await asyncio.sleep(self.settings.apply_interval_s)
            return False
        self.last_error = None
        if not outcome.get("applied"):
            return False
        self.applies["ok"] += 1
        self.last_apply_s = seconds
        await self.collection.reload()
        current = self.collection.current
        ingest = (current.pipeline.bundle.manifest.get("ingest") or {}) if current is not None else {}
        self.listener(self.collection.name, "apply", seconds)
        if ingest.get("oldest_accepted_at"):
            self.listener(self.collection.name, "visible", max(0.0, time.time() - float(ingest["oldest_accepted_at"])))
        log.info(
            json.dumps(
                {
                    "event": "ingest_applied",
                    "collection": self.collection.name,
                    "applied_seq": ingest.get("applied_seq"),
                    "seconds": round(seconds, 3),
                    "summary": outcome.get("summary"),
                }
            )
        )
        return True


__all__ = ["BacklogFull", "Ingestor"]
