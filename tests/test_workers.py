"""`server.workers: 2`: one `sift serve`, a pre-fork master and two uvicorn workers. Both workers answer, the
same way, and they share the models the master loaded (copy-on-write) instead of loading their own."""

from __future__ import annotations

import time

import httpx
import psutil

from tests.servers import sift_server

SEARCH = {"query": "how do vaccines train the immune system", "k": 5, "return_text": False}


def shared_mb(pid: int) -> tuple[float, float]:
    """(RSS, shared pages) of a process in MB, from /proc/<pid>/smaps_rollup."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if rest.strip().endswith("kB"):
                fields[name] = int(rest.split()[0]) / 1024
    return fields["Rss"], fields["Shared_Clean"] + fields["Shared_Dirty"]


def test_two_workers_both_answer_and_share_the_models(example_index):
    env = {"SIFT_BUNDLE": str(example_index), "SIFT_SERVER__WORKERS": "2"}
    with sift_server(env, ready_timeout=300) as (base, process):
        workers = {p.pid for p in psutil.Process(process.pid).children()}
        assert len(workers) == 2, workers
        answered: dict[int, list] = {}
        deadline = time.time() + 120
        while len(answered) < 2 and time.time() < deadline:
            with httpx.Client(timeout=30) as client:  # a new connection each time: either worker may accept it
                info = client.get(f"{base}/v1/info")
                if info.status_code != 200:  # that worker is still loading its build
                    time.sleep(0.2)
                    continue
                pid = info.json()["process"]["pid"]
                assert info.json()["process"]["workers"] == 2
                hits = client.post(f"{base}/v1/search", json=SEARCH).json()["hits"]
                answered.setdefault(pid, [(h["passage_id"], h["score"]) for h in hits])
        assert set(answered) == workers, f"answered by {set(answered)}, workers {workers}"
        first, second = answered.values()
        assert first == second and len(first) == 5  # the same ranking and scores from both processes
        assert first[0][0].startswith("bio-003")  # the vaccines passage of examples/
        for pid in workers:  # the models are the master's pages, shared, not a private copy per worker
            rss, shared = shared_mb(pid)
            assert shared >= 0.5 * rss and shared >= 150, (pid, rss, shared)
