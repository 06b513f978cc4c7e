"""What every framework integration shares: what it keeps of a hit (the passage text, and the rest as
metadata), and its async clients."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping
from typing import Any

from sift_client.client import AsyncSiftClient
from sift_client.models import SearchHit, SearchOptions, SearchResponse


def search_options(*layers: Mapping[str, Any] | None) -> SearchOptions:
    """The options of one search from `layers`, each overriding the ones before; an option left None (in the
    last layer that names it) is not sent, so the server's default applies."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update(layer or {})
    return {key: value for key, value in merged.items() if value is not None}  # type: ignore[return-value]


def hit_text(hit: SearchHit) -> str:
    """The passage text; the snippet when the search asked for no text (`return_text=False`)."""
    return hit.text if hit.text is not None else (hit.snippet or "")


def hit_metadata(hit: SearchHit, page: SearchResponse) -> dict[str, Any]:
    """Ids, score, character offsets, each stage's explain, the build that answered and the document's own
    metadata (under `metadata`, so its keys never shadow Sift's)."""
    return {
        "doc_id": hit.doc_id,
        "passage_id": hit.passage_id,
        "title": hit.title,
        "score": hit.score,
        "position": hit.position,
        "start": hit.start,
        "end": hit.end,
        "explain": {stage: None if e is None else e.model_dump() for stage, e in hit.explain.items()},
        "bundle": page.bundle,
        "mode": page.mode,
        "metadata": dict(hit.metadata),
    }


class AsyncClients:
    """One `AsyncSiftClient` per running event loop, made on first use in it: an httpx connection pool belongs
    to the loop that opened it, and frameworks are often driven by several (`asyncio.run` twice, notebooks).
    The clients of loops that have closed are dropped on the next call (their connections died with the
    loop), so a process that runs many loops does not keep them."""

    def __init__(self, make: Callable[[], AsyncSiftClient]) -> None:
        self._make = make
        self._by_loop: dict[asyncio.AbstractEventLoop, AsyncSiftClient] = {}
        self._lock = threading.Lock()

    def get(self) -> AsyncSiftClient:
        loop = asyncio.get_running_loop()
        with self._lock:
            for old in [other for other in self._by_loop if other.is_closed()]:
                del self._by_loop[old]
            client = self._by_loop.get(loop)
            if client is None:
                client = self._by_loop[loop] = self._make()
            return client
