"""Sift in process, run by bench/peers.py with this checkout's interpreter, through the same harness as the peers.

Build: `indexer.build.build_bundle` with the shipped index config (configs/default.yaml: chunking, bm25s,
FAISS, pq token vectors), the same code `sift index build` runs. Search: `app.engine.Engine.search` (what the
API calls) on one event loop in a background thread, as a server runs it, with the shipped settings (the
query-embedding cache off); at rerank depth 0 the second stage is off (Sift's first stage: hybrid, RRF),
otherwise the second stage (cross-encoder + MaxSim + first stage) runs at that depth. Hits are documents (`collapse`: a document's best
passage), at most `k`.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent))

import harness  # noqa: E402


class Index:
    def __init__(self, engine: Any, k: int, candidates: int) -> None:
        self.engine, self.k, self.candidates = engine, k, candidates
        self.options: dict[int, Any] = {}
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def search(self, text: str, depth: int) -> harness.Hits:
        if depth not in self.options:
            extra = {"rerank": True, "rerank_depth": depth} if depth else {"rerank": False}
            self.options[depth] = self.engine.options(k=self.k, collapse=True, candidates=self.candidates, **extra)
        future = asyncio.run_coroutine_threadsafe(self.engine.search(text, self.options[depth]), self.loop)
        return [(hit.doc_id, float(hit.score)) for hit in future.result(timeout=300).hits]


def build(documents: list[dict[str, Any]], job: dict[str, Any]) -> Index:
    from app.engine import Engine
    from app.services import Models, load_pipeline
    from app.settings import load_settings
    from indexer.build import build_bundle
    from indexer.config import load_index_config

    # the prepared corpus (`{"id", "title", "text"}` JSONL) is what `sift index build` reads: no copy
    build_bundle(Path(job["corpus"]), Path(job["index_dir"]), load_index_config(), show_progress=False)
    settings = load_settings(runtime={"query_cache_size": 0})  # every query pays its encoding, as the peers' do
    pipeline = load_pipeline(settings, Path(job["index_dir"]), Models.load(settings, generator=False, reader=False))
    return Index(Engine(pipeline), int(job["k"]), int(job["first_depth"]))


def search(index: Index, text: str, rerank_depth: int) -> harness.Hits:
    return index.search(text, rerank_depth)


if __name__ == "__main__":
    harness.run(build, search)
