"""The live index lifecycle against real uvicorn servers: hot reload under load, a corrupt publish refused,
pruning and deleting builds while serving, concurrent builds into one folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from indexer.build import build_bundle
from indexer.bundle import CURRENT, MANIFEST, list_builds, new_build_id, open_bundle, prune_builds
from tests.conftest import EXAMPLES, ROOT, write_jsonl
from tests.servers import sift_server

SERVER_ENV = {
    "SIFT_SERVER__RELOAD_INTERVAL_S": "0.5",
    "SIFT_GENERATOR__BACKEND": "none",
    "SIFT_RERANKER__MODEL": "none",
}


def wait_for(condition, what: str, timeout: float = 60) -> None:
    """Poll `condition` until it holds. The deadline only catches a hang (it is no claim about speed)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"still waiting for {what} after {timeout} s")
        time.sleep(0.1)


class Load:
    """`clients` threads searching as fast as they can; every response is recorded (sent, received, status,
    build), times from `time.monotonic()`."""

    def __init__(self, base: str, clients: int = 8) -> None:
        self.base, self.clients = base, clients
        self.records: list[tuple[float, float, int, str | None]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, i: int) -> None:
        queries = ["how do stars form", "sourdough starter", "coral reef bleaching", "black hole event horizon"]
        with httpx.Client(timeout=30) as client:
            n = 0
            while not self._stop.is_set():
                n += 1
                sent = time.monotonic()
                try:
                    r = client.post(f"{self.base}/v1/search", json={"query": queries[(i + n) % 4], "k": 3})
                    build = r.json().get("bundle") if r.status_code == 200 else None
                    self.records.append((sent, time.monotonic(), r.status_code, build))
                    if r.status_code != 200:
                        self.errors.append(f"{r.status_code}: {r.text[:200]}")
                except httpx.HTTPError as exc:
                    self.records.append((sent, time.monotonic(), 0, None))
                    self.errors.append(repr(exc))

    def __enter__(self) -> Load:
        self.started = time.monotonic()
        for t in self._threads:
            t.start()
        return self

    def builds_sent_after(self, t: float) -> list[str | None]:
        """The builds that answered the requests sent after `t`."""
        return [b for sent, _, _, b in list(self.records) if sent > t]

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)


def clone_build(out: Path, source: str, publish: bool = True) -> str:
    """A copy of a published build under a new id (same content, so it verifies), optionally made current
    with an atomic link swap, as a publish does."""
    build_id = new_build_id()
    shutil.copytree(out / source, out / build_id)
    manifest = json.loads((out / build_id / MANIFEST).read_text())
    manifest["build_id"] = build_id
    (out / build_id / MANIFEST).write_text(json.dumps(manifest))
    if publish:
        swap_current(out, build_id)
    return build_id


def swap_current(out: Path, build_id: str) -> None:
    tmp = out / f".{CURRENT}-test-{build_id}"
    os.symlink(build_id, tmp)
    os.replace(tmp, out / CURRENT)


def test_hot_reload_under_load_switches_builds_and_refuses_a_corrupt_one(tmp_path):
    out = tmp_path / "index"
    first = build_bundle(EXAMPLES, out, show_progress=False).build_id
    with sift_server({"SIFT_BUNDLE": str(out), **SERVER_ENV}) as (base, _process):
        with Load(base, clients=8) as load:
            wait_for(lambda: len(load.records) >= 8, "the load to run on the first build")
            # a good build of a changed corpus, published while the server is under load
            corpus = [json.loads(line) for line in EXAMPLES.read_text().splitlines()]
            corpus.append(
                {"_id": "new-001", "title": "Zebra migration", "text": "Zebras migrate across the Serengeti."}
            )
            good = build_bundle(write_jsonl(tmp_path / "v2.jsonl", corpus), out, show_progress=False).build_id
            # the watcher (polling every 0.5 s) switches to it; 60 s only catches "never switches"
            wait_for(lambda: any(b == good for *_, b in list(load.records)), "a response from the good build")
            switched = min(received for _, received, _, b in list(load.records) if b == good)
            time.sleep(2)
            # a corrupt build: right sizes, wrong bytes (checksum mismatch), published atomically
            bad = clone_build(out, good, publish=False)
            docstore = out / bad / "docstore.sqlite"
            data = bytearray(docstore.read_bytes())
            data[len(data) // 2 : len(data) // 2 + 64] = b"\x00" * 64
            docstore.write_bytes(bytes(data))
            swap_current(out, bad)

            def refused() -> bool:
                error = httpx.get(f"{base}/readyz", timeout=30).json()["details"]["default"].get("reload_error")
                return bool(error) and bad in error

            wait_for(refused, "the corrupt build to be refused")
            rejected = time.monotonic()
            # the good build keeps serving after the refusal: requests sent since then
            wait_for(lambda: len(load.builds_sent_after(rejected)) >= 8, "responses after the refusal")
            ready = httpx.get(f"{base}/readyz", timeout=10)
            info = httpx.get(f"{base}/v1/info", timeout=10).json()
            metrics = httpx.get(f"{base}/metrics", timeout=10).text
            while time.monotonic() - load.started < 22:  # at least 20 s of constant load
                time.sleep(0.5)
        late = load.builds_sent_after(rejected)
        server_log = Path(_process.log_path).read_text()
    assert load.errors == [], (load.errors[:5], [x for x in server_log.splitlines() if 'status": 200' not in x][-40:])
    builds = [b for _, _, _, b in load.records]
    assert builds.count(first) > 0 and builds.count(good) > 0, "the load ran on both builds"
    assert set(builds) == {first, good}, "only the first and the good build ever answered"
    # the switch is for good: no request sent after a response came from the good build went to the first
    assert first not in load.builds_sent_after(switched), "a request went back to the first build after the switch"
    assert len(late) >= 8 and set(late) == {good}, "the good build keeps serving after the corrupt publish"
    assert ready.status_code == 200 and ready.json()["bundle"] == good
    error = ready.json()["details"]["default"]["reload_error"]
    assert "sha256 does not match" in error and bad in error
    assert info["collection"]["reload_error"] == error and info["collection"]["build"] == good
    assert 'sift_reloads_total{collection="default",outcome="failed"} 1.0' in metrics
    assert 'sift_reloads_total{collection="default",outcome="ok"} 2.0' in metrics


def test_pruning_and_deleting_builds_while_serving_never_fails_a_request(tmp_path):
    out = tmp_path / "index"
    first = build_bundle(EXAMPLES, out, show_progress=False).build_id
    with sift_server({"SIFT_BUNDLE": str(out), **SERVER_ENV}) as (base, _process):
        with Load(base, clients=4) as load:
            wait_for(lambda: len(load.records) >= 4, "the load to run")
            # prune while the served build is the only one: nothing to delete, nothing fails
            assert prune_builds(out, 1) == ([], [])
            second = clone_build(out, first)
            # prune at once: the old build is still leased by the server (or already released and deleted)
            deleted, in_use = prune_builds(out, 1)
            assert deleted + in_use == [first]
            if in_use:  # the watcher switches, the old build drains and its lease is released
                pruned = []

                def released() -> bool:
                    pruned.append(prune_builds(out, 1))
                    return pruned[-1] != ([], [first])

                wait_for(released, "the old build's lease to be released")
                assert pruned[-1] == ([first], [])
            assert list_builds(out) == [second]
            # delete the served build's predecessor by hand right after a publish (the server may still be on it)
            third = clone_build(out, second)
            shutil.rmtree(out / second)
            wait_for(lambda: httpx.get(f"{base}/readyz", timeout=30).json()["bundle"] == third, "the switch")
            # and the served build itself, by hand: it keeps answering from its open files
            shutil.rmtree(out / third)
            deleted_at = time.monotonic()
            wait_for(lambda: len(load.builds_sent_after(deleted_at)) >= 8, "responses after the deletion")
            statuses = httpx.get(f"{base}/readyz", timeout=10).json()
    assert load.errors == [], load.errors[:5]
    assert set(load.builds_sent_after(deleted_at)) == {third}
    assert {b for _, _, _, b in load.records} <= {first, second, third}
    assert statuses["bundle"] == third


def test_two_builds_started_together_into_one_folder_both_publish(tmp_path):
    out = tmp_path / "index"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", "from app.cli import main; main()", "index", "build", "--input", str(EXAMPLES)]
    cmd += ["--out", str(out), "--no-progress", "--no-dense"]
    processes = [
        subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [p.communicate(timeout=300) for p in processes]
    for p, (_stdout, stderr) in zip(processes, results):
        assert p.returncode == 0, stderr[-2000:]
        assert "Traceback" not in stderr
    builds = list_builds(out)
    assert len(builds) == 2
    for build_id in builds:
        assert open_bundle(out / build_id, verify=True).build_id == build_id
    assert os.readlink(out / CURRENT) in builds
    assert not list(out.glob(".building-*")) and not list(out.glob(f".{CURRENT}-*"))


def test_two_collections_in_one_process_on_every_endpoint(tmp_path, example_index):
    from fastapi.testclient import TestClient

    from app.api.main import create_app
    from app.settings import load_settings

    recipes = [
        {
            "_id": "r1",
            "title": "Pancakes",
            "text": "Whisk flour, milk and eggs; fry the batter in butter until golden.",
        },
        {"_id": "r2", "title": "Lemonade", "text": "Squeeze six lemons, add sugar syrup and cold water, then stir."},
    ]
    second = tmp_path / "recipes"
    build_bundle(write_jsonl(tmp_path / "recipes.jsonl", recipes), second, show_progress=False)
    settings = load_settings(
        collections={"examples": example_index, "recipes": second},
        generator={"backend": "none"},
        reranker={"model": None},
        answer={"mode": "extractive", "extractive_text": "span"},
    )
    with TestClient(create_app(settings)) as client:
        for _ in range(600):
            if client.get("/readyz").status_code == 200:
                break
            time.sleep(0.1)
        listed = client.get("/v1/collections").json()
        assert listed["default"] == "examples"
        assert [c["name"] for c in listed["collections"]] == ["examples", "recipes"]
        assert all(c["ready"] and c["build"] for c in listed["collections"])
        builds = {c["name"]: c["build"] for c in listed["collections"]}

        default = client.post("/v1/search", json={"query": "lemon sugar water", "k": 1}).json()
        recipes_hit = client.post("/v1/search", json={"query": "lemon sugar water", "k": 1, "collection": "recipes"})
        assert default["bundle"] == builds["examples"] and default["hits"][0]["doc_id"] != "r2"
        assert recipes_hit.json()["bundle"] == builds["recipes"] and recipes_hit.json()["hits"][0]["doc_id"] == "r2"

        batch = client.post("/v1/search/batch", json={"queries": ["pancake batter"], "k": 1, "collection": "recipes"})
        assert batch.json()["bundle"] == builds["recipes"] and batch.json()["results"][0]["hits"][0]["doc_id"] == "r1"

        answer = client.post("/v1/answer", json={"question": "How many lemons are squeezed?", "collection": "recipes"})
        assert answer.json()["collection"] == "recipes" and answer.json()["answer"] == "six"
        assert answer.json()["citations"][0]["doc_id"] == "r2"
        chat = client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "How many lemons are squeezed?"}], "collection": "recipes"},
        ).json()
        assert chat["collection"] == "recipes" and chat["choices"][0]["message"]["content"] == "six"
        chat_default = client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "When was the Eiffel Tower completed?"}]},
        ).json()
        assert chat_default["collection"] == "examples" and chat_default["choices"][0]["message"]["content"] == "1889"

        assert client.get("/v1/documents/r1", params={"collection": "recipes"}).json()["title"] == "Pancakes"
        assert client.get("/v1/documents/r1").status_code == 404
        assert client.get("/v1/info", params={"collection": "recipes"}).json()["collection"]["name"] == "recipes"

        unknown = client.post("/v1/search", json={"query": "x", "collection": "nope"})
        assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "unknown_collection"
        assert "['examples', 'recipes']" in unknown.json()["error"]["message"]
        for path, body in (
            ("/v1/answer", {"question": "x", "collection": "nope"}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "collection": "nope"}),
            ("/v1/search/batch", {"queries": ["x"], "collection": "nope"}),
        ):
            assert client.post(path, json=body).status_code == 404, path
        metrics = client.get("/metrics").text
        assert 'sift_searches_total{collection="recipes"} 2.0' in metrics
        assert 'sift_searches_total{collection="examples"} 1.0' in metrics


def test_a_build_with_another_dense_model_is_refused_and_a_late_first_build_is_picked_up(tmp_path):
    """Reload refuses a build the served query encoder cannot search (here: no dense index at all), and a
    server started before any build exists loads the first one published."""
    import asyncio

    from app.services import Services
    from app.settings import load_settings
    from indexer.config import IndexConfig

    out = tmp_path / "index"
    settings = load_settings(bundle=out, generator={"backend": "none"}, reranker={"model": None})

    async def scenario() -> tuple[dict, dict, str | None, str]:
        services = Services.from_settings(settings)
        await services.start()
        assert not services.ready and "no such bundle" in services.collection(None).error
        first = await asyncio.to_thread(build_bundle, EXAMPLES, out, None, show_progress=False)
        loaded = await services.collection(None).reload()
        bm25_only = IndexConfig(dense={"enabled": False})
        second = await asyncio.to_thread(build_bundle, EXAMPLES, out, bm25_only, show_progress=False)
        refused = await services.collection(None).reload()
        served = services.collection(None).current.build_id
        await services.close()
        return loaded, refused, second.build_id, served if served == first.build_id else "wrong build served"

    loaded, refused, second, served = asyncio.run(scenario())
    assert loaded["outcome"] == "loaded"
    assert (
        refused["outcome"] == "failed" and "dense enabled is False" in refused["error"] and second in refused["error"]
    )
    assert served != "wrong build served"
