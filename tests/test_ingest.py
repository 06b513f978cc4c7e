"""Documents in over HTTP (issue 34): the ingest log (durable, checksummed, numbered), the apply job (one
incremental update per group of batches, exactly once, under the update lock `sift index update` takes too),
and the endpoints on a real `sift serve`: read-your-writes, replacement with new metadata, deletes, limits,
scopes, task states and metrics. The crash test (SIGKILL while clients write) is in tests/test_ingest_crash.py."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time

import httpx
import pytest

from indexer.bundle import open_bundle, update_lock
from indexer.docstore import Docstore
from indexer.ingest import Batch, IngestLog, IngestLogError, applied_seq, fold
from tests.conftest import write_jsonl
from tests.servers import sift_server


def _copy(example_index, tmp_path):
    out = tmp_path / "index"
    shutil.copytree(example_index, out, symlinks=True)
    return out


def _documents(index) -> dict[str, dict]:
    info = open_bundle(index, verify=True)
    store = Docstore(info.path("docstore.sqlite"))
    try:
        return {
            doc.id: {"text": doc.text, "metadata": doc.metadata, "passages": list(passages)}
            for doc, passages, _ in store.documents()
        }
    finally:
        store.close()


# -- the log ------------------------------------------------------------------------------------------------


def test_log_numbers_batches_durably_and_never_reuses_a_number(tmp_path) -> None:
    log = IngestLog(tmp_path)
    first = log.append("upsert", [{"_id": "a", "text": "one"}])
    second = log.append("delete", ["a", "b"])
    assert (first, second) == (1, 2)
    assert [(n.seq, n.op, n.count) for n in log.names()] == [(1, "upsert", 1), (2, "delete", 2)]
    assert log.backlog(0) == (2, 3) and log.backlog(1) == (1, 2)
    assert log.pending(0)[1] == Batch(2, "delete", ["a", "b"], log.pending(0)[1].accepted_at)
    assert log.trim(2) == 2 and log.names() == []
    assert log.append("upsert", [{"_id": "c", "text": "three"}]) == 3  # numbers survive a trim
    assert IngestLog(tmp_path).append("delete", ["c"], applied=10) == 11  # and never fall below a build's
    # a crash mid-write leaves only a temporary file, which is no batch
    (log.batches / ".000000000012-upsert-1.json.tmp").write_text('{"seq": 12')
    assert [n.seq for n in log.names()] == [3, 11]


def test_a_corrupt_batch_is_an_error_not_silently_skipped(tmp_path) -> None:
    log = IngestLog(tmp_path)
    log.append("upsert", [{"_id": "a", "text": "one"}])
    path = next(log.batches.glob("*.json"))
    path.write_text(path.read_text().replace('"one"', '"two"'))
    with pytest.raises(IngestLogError, match="checksum"):
        log.pending(0)


def test_pending_takes_whole_batches_up_to_the_limit(tmp_path) -> None:
    log = IngestLog(tmp_path)
    for n in range(4):
        log.append("upsert", [{"_id": f"d{n}-{i}", "text": "x"} for i in range(3)])
    assert [b.seq for b in log.pending(0, max_items=7)] == [1, 2]
    assert [b.seq for b in log.pending(0, max_items=1)] == [1]  # one batch at least, however large
    assert [b.seq for b in log.pending(2)] == [3, 4]


def test_fold_lets_the_last_operation_on_an_id_win() -> None:
    batches = [
        Batch(1, "upsert", [{"_id": "a", "text": "a1"}, {"_id": "b", "text": "b1"}], 1.0),
        Batch(2, "delete", ["a", "c"], 2.0),
        Batch(3, "upsert", [{"_id": "c", "text": "c3"}, {"_id": "b", "text": "b3"}], 3.0),
    ]
    changes = fold(batches)
    assert changes.upserts == {"c": {"_id": "c", "text": "c3"}, "b": {"_id": "b", "text": "b3"}}
    assert changes.deletes == {"a"} and changes.through == 3 and changes.oldest_accepted_at == 1.0


# -- the apply job ------------------------------------------------------------------------------------------


def test_apply_publishes_pending_batches_once_and_trims_them(example_index, tmp_path) -> None:
    from indexer.update import apply_ingest

    index = _copy(example_index, tmp_path)
    before = _documents(index)
    kept, changed, deleted = sorted(before)[:3]
    log = IngestLog(index)
    log.append(
        "upsert", [{"_id": "new-1", "title": "Zebras", "text": "Zebras cross the river.", "metadata": {"topic": "zoo"}}]
    )
    log.append("upsert", [{"_id": changed, "text": "Rewritten text about tides.", "metadata": {"topic": "sea"}}])
    log.append("delete", [deleted, "never-existed"])
    result = apply_ingest(index, show_progress=False)
    assert result is not None
    info = open_bundle(index, verify=True)
    assert applied_seq(info.manifest) == 3 and info.manifest["build"]["kind"] == "ingest"
    assert info.manifest["update"]["added"] == 1 and info.manifest["update"]["changed"] == 1
    assert info.manifest["update"]["deleted"] == 1  # the unknown id did nothing
    after = _documents(index)
    assert after["new-1"]["metadata"] == {"topic": "zoo"} and after[changed]["text"] == "Rewritten text about tides."
    assert after[changed]["metadata"] == {"topic": "sea"} and deleted not in after and after[kept] == before[kept]
    passage_ids = [p.id for doc in after.values() for p in doc["passages"]]
    assert len(passage_ids) == len(set(passage_ids))
    assert log.names() == []  # trimmed
    assert apply_ingest(index, show_progress=False) is None  # nothing pending: no new build
    assert open_bundle(index).build_id == info.build_id
    # a crash between publish and trim: the batches are still on disk but in the build, so nothing is redone
    log.append("upsert", [{"_id": "new-2", "text": "Second zebra."}])
    apply_ingest(index, show_progress=False)
    published = open_bundle(index).build_id
    (log.batches / "000000000004-upsert-1.json").write_text("{}")  # even a stale, unreadable leftover
    assert apply_ingest(index, show_progress=False) is None and open_bundle(index).build_id == published


def test_an_update_carries_the_ingest_record_and_waits_for_the_update_lock(example_index, tmp_path) -> None:
    from indexer.update import apply_ingest, update_bundle

    index = _copy(example_index, tmp_path)
    IngestLog(index).append("upsert", [{"_id": "new-1", "text": "Zebras cross the river."}])
    apply_ingest(index, show_progress=False)
    finished: list[float] = []
    released = threading.Event()

    def hold() -> None:
        with update_lock(index):
            released.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    time.sleep(0.2)
    add = write_jsonl(tmp_path / "add.jsonl", [{"_id": "cli-1", "text": "Added from the command line."}])
    updater = threading.Thread(
        target=lambda: (update_bundle(index, add, show_progress=False), finished.append(time.time()))
    )
    updater.start()
    time.sleep(3)
    assert not finished  # waiting for the lock, not deriving from the same parent
    released_at = time.time()
    released.set()
    updater.join(120)
    holder.join()
    assert finished and finished[0] >= released_at
    info = open_bundle(index, verify=True)
    assert applied_seq(info.manifest) == 1  # carried forward by the CLI update: nothing is replayed
    assert {"new-1", "cli-1"} <= set(_documents(index))


# -- the endpoints ------------------------------------------------------------------------------------------

ADMIN_KEY = "admin-key-0123456789abcdef"
SEARCH_KEY = "search-key-0123456789abcdef"


def test_documents_over_http(example_index, tmp_path) -> None:
    index = _copy(example_index, tmp_path)
    env = {
        "SIFT_BUNDLE": str(index),
        "SIFT_SERVER__ADMIN_KEYS": json.dumps([ADMIN_KEY]),
        "SIFT_SERVER__API_KEYS": json.dumps([SEARCH_KEY]),
        "SIFT_INGEST__MAX_DOCUMENTS_PER_BATCH": "5",
        "SIFT_INGEST__MAX_BACKLOG_DOCUMENTS": "8",
        "SIFT_INGEST__MAX_BODY_BYTES": "20000",
    }
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with sift_server(env) as (base, server):
        client = httpx.Client(base_url=base, timeout=180, headers=admin)
        docs = "/v1/collections/default/documents"

        def search(query: str, **extra) -> list[dict]:
            body = {"query": query, "k": 5, "mode": "bm25", "rerank": False, **extra}
            response = client.post("/v1/search", json=body)
            assert response.status_code == 200, response.text
            return response.json()["hits"]

        # read-your-writes: a new document is searchable when wait=true returns
        doc = {
            "_id": "zeb-1",
            "title": "Zebras",
            "text": "Zebras of the Serengeti migrate in vast herds.",
            "metadata": {"topic": "zoo"},
        }
        response = client.post(f"{docs}?wait=true", json=[doc])
        assert response.status_code == 200, response.text
        task = response.json()
        assert task["status"] == "searchable" and task["documents"] == 1
        assert search("Serengeti zebras migrate")[0]["doc_id"] == "zeb-1"
        _assert_applier_yields_the_cores(server.pid)

        # a changed document replaces its passages; filters read its new metadata
        changed = {**doc, "text": "Zebras graze the savanna of the Masai Mara.", "metadata": {"topic": "savanna"}}
        assert client.post(f"{docs}?wait=true", json=[changed]).status_code == 200
        hits = search("zebras Masai Mara savanna", filters={"topic": "savanna"})
        assert [h["doc_id"] for h in hits] == ["zeb-1"]
        assert search("zebras", filters={"topic": "zoo"}) == []
        assert all(h["doc_id"] != "zeb-1" for h in search("Serengeti migrate herds"))  # the old text is gone

        # JSONL, then a delete, read-your-writes both
        jsonl = "\n".join(
            json.dumps({"_id": f"okapi-{i}", "text": f"Okapi sighting number {i} in Ituri."}) for i in range(2)
        )
        response = client.post(docs, content=jsonl, headers={"content-type": "application/x-ndjson"})
        assert response.status_code == 202 and response.json()["status"] in ("enqueued", "searchable")
        response = client.post(f"{docs}/delete?wait=true", json={"ids": ["zeb-1", "okapi-0", "not-there"]})
        assert response.status_code == 200, response.text
        found = [h["doc_id"] for h in search("Okapi sighting Ituri")]
        assert found[0] == "okapi-1" and "okapi-0" not in found
        assert all(h["doc_id"] != "zeb-1" for h in search("zebras savanna"))
        status = client.get(f"/v1/collections/default/tasks/{response.json()['task']}").json()
        assert status["status"] == "searchable"

        # bad input: nothing of a rejected batch is written, and the error names the record and field
        backlog = client.get("/v1/collections").json()["collections"][0]["ingest"]
        bad = client.post(docs, json=[{"_id": "ok", "text": "fine"}, {"_id": "bad", "text": 5}])
        assert bad.status_code == 422 and bad.json()["error"]["fields"][0]["field"] == "documents[1].text"
        blank = client.post(docs, json=[{"_id": "  ", "text": "x"}])
        assert blank.status_code == 422 and blank.json()["error"]["fields"][0]["field"] == "documents[0]._id"
        assert client.post(docs, content=b"{not json", headers={"content-type": "application/json"}).status_code == 422
        assert client.post(docs, json=[]).status_code == 422
        assert client.post(f"{docs}/delete", json={"ids": []}).status_code == 422
        too_many = client.post(docs, json=[{"_id": f"m{i}", "text": "x"} for i in range(6)])
        assert too_many.status_code == 413 and "ingest.max_documents_per_batch" in too_many.json()["error"]["message"]
        too_big = client.post(docs, json=[{"_id": "big", "text": "x" * 30000}])
        assert too_big.status_code == 413 and "ingest.max_body_bytes" in too_big.json()["error"]["message"]
        assert (
            client.get("/v1/collections").json()["collections"][0]["ingest"]["backlog_documents"]
            == backlog["backlog_documents"]
        )
        assert client.get("/v1/collections/default/tasks/999").status_code == 404
        assert client.post("/v1/collections/nope/documents", json=[doc]).status_code == 404

        # the Python client: typed tasks, the same read-your-writes
        from sift_client import AsyncSiftClient, SiftClient

        with SiftClient(base, api_key=ADMIN_KEY) as sift:
            task = sift.upsert([{"_id": "tapir-1", "text": "A tapir wades through the Amazon."}], wait=True)
            assert task.status == "searchable" and sift.task(task.task).status == "searchable"
            assert sift.search("tapir Amazon", mode="bm25", rerank=False).hits[0].doc_id == "tapir-1"
            assert sift.collections().collections[0].ingest.applied_seq >= task.task

        async def remove() -> str:
            async with AsyncSiftClient(base, api_key=ADMIN_KEY) as sift:
                return (await sift.delete(["tapir-1"], wait=True)).status

        assert asyncio.run(remove()) == "searchable"
        assert all(h["doc_id"] != "tapir-1" for h in search("tapir Amazon"))

        # scopes: a search key may search but not write
        searcher = {"Authorization": f"Bearer {SEARCH_KEY}"}
        assert client.post(docs, json=[doc], headers=searcher).status_code == 403
        assert httpx.post(f"{base}{docs}", json=[doc]).status_code == 401

        # metrics: batches, applies and time to visible
        metrics = client.get("/metrics").text
        assert 'sift_ingest_batches_total{collection="default",op="upsert"} 4.0' in metrics
        assert 'sift_ingest_documents_total{collection="default",op="delete"} 4.0' in metrics
        assert 'sift_ingest_apply_seconds_count{collection="default",outcome="ok"}' in metrics
        assert 'sift_ingest_time_to_visible_seconds_count{collection="default"}' in metrics
        assert 'sift_ingest_backlog_documents{collection="default"} 0.0' in metrics

        # a full backlog: with applies held back (the update lock taken, as a long `sift index update` would),
        # batches pile up to ingest.max_backlog_documents (8); the next is a 429 with Retry-After, and once the
        # lock is free everything acknowledged is applied
        released = threading.Event()
        holder = threading.Thread(target=lambda: _hold_update_lock(index, released))
        holder.start()
        try:
            tasks = []
            for i in range(2):
                batch = [{"_id": f"held-{i}-{j}", "text": f"Quokka sighting {i} {j}."} for j in range(4)]
                response = client.post(docs, json=batch)
                assert response.status_code == 202, response.text
                tasks.append(response.json()["task"])
            refused = client.post(docs, json=[{"_id": "one-more", "text": "Over the backlog."}])
            assert refused.status_code == 429 and "ingest.max_backlog_documents" in refused.json()["error"]["message"]
            assert int(refused.headers["Retry-After"]) >= 1
            assert client.get("/v1/collections").json()["collections"][0]["ingest"]["backlog_documents"] == 8
            assert client.get(f"/v1/collections/default/tasks/{tasks[1]}").json()["status"] == "enqueued"
        finally:
            released.set()
            holder.join()
        deadline = time.time() + 120
        while client.get(f"/v1/collections/default/tasks/{tasks[1]}").json()["status"] != "searchable":
            assert time.time() < deadline, "the held batches were never applied"
            time.sleep(0.5)
        found = {h["doc_id"] for h in search("quokka", k=10)}
        assert found == {f"held-{i}-{j}" for i in range(2) for j in range(4)}


def _assert_applier_yields_the_cores(server_pid: int) -> None:
    """The server's applier child (`ingest.applier_sched_idle`, `applier_nice`, `applier_threads`: the shipped
    defaults) runs under SCHED_IDLE where Linux offers it, at niceness 10 more than the server either way."""
    import os

    import psutil

    server = psutil.Process(server_pid)
    children = [p for p in server.children(recursive=True) if "apply-ingest" in " ".join(p.cmdline())]
    assert len(children) == 1, [p.cmdline() for p in server.children(recursive=True)]
    child = children[0]
    assert child.nice() == server.nice() + 10
    if hasattr(os, "SCHED_IDLE"):
        assert os.sched_getscheduler(child.pid) == os.SCHED_IDLE
        assert os.sched_getscheduler(server_pid) == os.SCHED_OTHER  # the searches keep the normal policy


def _hold_update_lock(index, released: threading.Event) -> None:
    with update_lock(index):
        released.wait(300)
