"""The ingest crash test (issue 34, `make test-heavy`): trials of four clients upserting and deleting over HTTP
while the whole server (its process group: workers and the applier's child) is SIGKILLed at a random moment.
After each restart: every acknowledged change is searchable, exactly once; a batch that was in flight at the
kill is applied whole or not at all; the bundle verifies. With one worker process and with two."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest

from indexer.bundle import open_bundle
from indexer.docstore import Docstore
from tests.conftest import ROOT
from tests.servers import free_port

pytestmark = pytest.mark.heavy

TRIALS = int(os.environ.get("SIFT_CRASH_TRIALS", "20"))  # fewer only to try the test by hand
CLIENTS = 4
IDS_PER_CLIENT = 12
ABSENT = None  # the state of a deleted (or never written) document


@dataclass
class Op:
    """One request: the documents it sets (id -> text, or ABSENT for a delete) and whether it was acknowledged."""

    changes: dict[str, str | None]
    acked: bool = False


@dataclass
class Ledger:
    """Every client's requests in the order it sent them (a client waits for each answer before the next)."""

    ops: list[list[Op]] = field(default_factory=lambda: [[] for _ in range(CLIENTS)])

    def possible(self, doc_id: str) -> set[str | None]:
        """The states `doc_id` may be in now: an acknowledged change fixes it, one in flight at a kill may or
        may not have been applied (it was the client's last request of its trial)."""
        client = int(doc_id.split("-")[0][1:])
        states: set[str | None] = {ABSENT}
        for op in self.ops[client]:
            if doc_id in op.changes:
                states = {op.changes[doc_id]} if op.acked else states | {op.changes[doc_id]}
        return states


def _start(index, workers: int) -> tuple[str, subprocess.Popen, str]:
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="sift-crash-", suffix=".log", delete=False)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "SIFT_BUNDLE": str(index),
        "SIFT_SERVER__WORKERS": str(workers),
        "SIFT_SERVER__RELOAD_INTERVAL_S": "0.5",
        "SIFT_INGEST__APPLY_INTERVAL_S": "0.5",
        # the ingest path is under test: a first-stage server (no reranker, reader or generator) starts fastest
        "SIFT_RERANKER__MODEL": "none",
        "SIFT_ANSWER__READER": "none",
        "SIFT_GENERATOR__BACKEND": "none",
    }
    cmd = [
        sys.executable,
        "-c",
        "from app.cli import main; main()",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    process = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return base, process, log.name
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.time() > deadline:
            pytest.fail(f"server did not start: {open(log.name).read()[-3000:]}")
        time.sleep(0.25)


def _kill(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGKILL)  # the master, its workers and an apply in progress, all at once
    process.wait(timeout=30)


def _client(base: str, number: int, ledger: Ledger, stop: threading.Event, rng: random.Random, trial: int) -> None:
    ids = [f"c{number}-{i}" for i in range(IDS_PER_CLIENT)]
    with httpx.Client(base_url=base, timeout=60) as http:
        sent = 0
        while not stop.is_set():
            sent += 1
            chosen = rng.sample(ids, rng.randint(1, 4))
            if rng.random() < 0.7:
                changes: dict[str, str | None] = {
                    d: f"{d.replace('-', 'x')}mark trial {trial} request {sent} of client {number}" for d in chosen
                }
                op = Op(changes)
                ledger.ops[number].append(op)
                request = ("/v1/collections/default/documents", [{"_id": d, "text": t} for d, t in changes.items()])
            else:
                op = Op(dict.fromkeys(chosen, ABSENT))
                ledger.ops[number].append(op)
                request = ("/v1/collections/default/documents/delete", {"ids": chosen})
            try:
                response = http.post(request[0], json=request[1])
            except httpx.TransportError:
                return  # the server died: this request may or may not have been made durable
            if response.status_code == 429:
                ledger.ops[number].pop()  # refused whole (a backlog limit): never written
                time.sleep(float(response.headers.get("Retry-After", "1")))
                continue
            assert response.status_code == 202, response.text
            op.acked = True
            time.sleep(rng.uniform(0.0, 0.05))


def _drained(base: str, index, workers: int, timeout_s: float = 300) -> None:
    """Wait until nothing is pending and every worker process serves the published build (each answers
    `/v1/info` with its pid; a new connection per request reaches the workers in turn)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        ingest = httpx.get(f"{base}/v1/collections", timeout=30).json()["collections"][0]["ingest"]
        if ingest["backlog_documents"] == 0 and ingest["served_seq"] == ingest["applied_seq"]:
            published = open_bundle(index, verify=False).build_id
            synced: set[int] = set()
            for _ in range(20 * workers):
                info = httpx.get(f"{base}/v1/info", timeout=30).json()
                if info["bundle"]["build_id"] == published:
                    synced.add(info["process"]["pid"])
                if len(synced) >= workers:
                    return
        time.sleep(0.3)
    pytest.fail(f"the backlog did not drain, or a worker did not load the published build, in {timeout_s} s")


def _verify(index, base: str, ledger: Ledger, workers: int) -> int:
    """Check the published build against the ledger; returns how many documents were in doubt (in flight)."""
    info = open_bundle(index, verify=True)  # checksums of every file
    store = Docstore(info.path("docstore.sqlite"))
    try:
        actual: dict[str, str] = {}
        passage_ids: list[str] = []
        for document, passages, _ in store.documents():
            passage_ids += [p.id for p in passages]
            if document.id.startswith("c") and "-" in document.id and document.id[1].isdigit():
                actual[document.id] = document.text
    finally:
        store.close()
    assert len(passage_ids) == len(set(passage_ids)), "a passage id twice"
    doubtful = 0
    for client in range(CLIENTS):
        for i in range(IDS_PER_CLIENT):
            doc_id = f"c{client}-{i}"
            possible = ledger.possible(doc_id)
            doubtful += len(possible) > 1
            assert actual.get(doc_id) in possible, (doc_id, actual.get(doc_id), possible)
    # an in-flight batch is applied whole or not at all
    for ops in ledger.ops:
        for op in (o for o in ops if not o.acked and len(o.changes) > 1):
            applied = {actual.get(d) == text for d, text in op.changes.items() if text is not ABSENT}
            assert len(applied) <= 1, ("half of a batch applied", op.changes)
    # every document is searchable, once, by its own marker (a new connection per request: any worker answers)
    for doc_id, text in actual.items():
        for _ in range(workers):
            body = {"query": text.split()[0], "k": 3, "mode": "bm25", "rerank": False}
            hits = httpx.post(f"{base}/v1/search", json=body, timeout=60).json()["hits"]
            assert [h["doc_id"] for h in hits if h["doc_id"] == doc_id] == [doc_id], (doc_id, hits)
            assert hits[0]["doc_id"] == doc_id
    return doubtful


@pytest.mark.parametrize("workers", [1, 2])
def test_acknowledged_documents_survive_sigkill(example_index, tmp_path, workers) -> None:
    import shutil

    index = tmp_path / "index"
    shutil.copytree(example_index, index, symlinks=True)
    rng = random.Random(34 * workers)
    ledger = Ledger()
    base, process, log_path = _start(index, workers)
    in_doubt = 0
    try:
        for trial in range(TRIALS):
            stop = threading.Event()
            clients = [
                threading.Thread(target=_client, args=(base, n, ledger, stop, random.Random(rng.random()), trial))
                for n in range(CLIENTS)
            ]
            for thread in clients:
                thread.start()
            time.sleep(rng.uniform(0.3, 4.0))
            _kill(process)
            stop.set()
            for thread in clients:
                thread.join(60)
            base, process, log_path = _start(index, workers)
            _drained(base, index, workers)
            in_doubt += _verify(index, base, ledger, workers)
        acked = sum(op.acked for ops in ledger.ops for op in ops)
        assert acked >= TRIALS * CLIENTS  # the clients did write (and the kills hit during writes)
        print(f"workers={workers}: {TRIALS} kills, {acked} acknowledged requests, {in_doubt} documents in doubt")
    finally:
        if process.poll() is None:
            _kill(process)
