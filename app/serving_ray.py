"""`sift serve --engine ray`: Sift on Ray Serve (install `sift[ray]`).

Two layouts, one response shape:

- **replicas** (any build): R replicas of the whole service, the FastAPI app as a Serve ingress
  (`SiftReplica`). Each replica loads the models and the read-only bundle itself and reloads on its own,
  as one `sift serve` does; Serve's proxy spreads requests, retries a request whose replica died and starts a
  new replica in its place. Fixed `ray.replicas` or `ray.autoscaling`.
- **shards** (a sharded build with `--shards`): one deployment per shard (`ShardServer`, `ray.shard_replicas`
  each) holding that shard's BM25, FAISS index, docstore and token vectors, and no model. The ingress
  replicas hold the models, encode each query once, fan out through deployment handles (`RemoteShards`),
  merge every shard's top k exactly, then fuse and rerank as one server does (`app.retrieval.shards`).
  A shard that does not answer within `ray.shard_timeout_s` is a 503 naming it, or partial results when the
  request says `allow_partial`; `/readyz` is ready only when every shard answers.

Invariants: the serving layer never writes a bundle; replicas share nothing but the read-only files; the
shard deployments must serve the build the ingress loaded (checked when the ingress opens them).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from ray import serve

from app.retrieval.protocols import DocstoreReader, Retriever, TokenStoreReader, VectorIndex
from app.retrieval.shards import ShardUnavailable
from app.retrieval.types import Hit, ranked
from app.settings import Settings
from indexer.bundle import BundleError, BundleInfo, open_bundle
from indexer.shards import shard_map

if TYPE_CHECKING:
    from app.retrieval.dense import DenseSearcher
    from app.services import BundleParts
    from indexer.tokens import TokenStore

log = logging.getLogger("sift.ray")

Scored = list[tuple[int, str, str, float]]


class ShardServer:
    """A Serve deployment holding one shard of a sharded build (no model: queries arrive as text for BM25 and
    as vectors for dense). Answers in the shard's own rows."""

    def __init__(self, root: str) -> None:
        from app.services import open_parts

        self.info = open_bundle(Path(root), verify=False)
        parts = open_parts(self.info)  # no encoder: dense searches the vectors the ingress sends
        self.docstore, self.bm25, self.dense, self.tokens = parts.docstore, parts.bm25, parts.dense, parts.tokens

    def _dense(self) -> DenseSearcher:
        if self.dense is None:
            raise LookupError(f"shard {self.info.build_id} has no dense index")
        return self.dense

    def _tokens(self) -> TokenStore:
        if self.tokens is None:
            raise LookupError(f"shard {self.info.build_id} stores no token vectors")
        return self.tokens

    def describe(self) -> dict[str, Any]:
        return {
            "build": self.info.build_id,
            "shard": self.info.manifest.get("shard"),
            "passages": self.docstore.num_passages,
            "documents": self.docstore.num_documents,
            "dense": self.dense is not None,
            "tokens": self.tokens is not None,
            "token_dtype": self.tokens.dtype if self.tokens is not None else None,
            "token_dimension": self.tokens.dimension if self.tokens is not None else None,
        }

    def ping(self) -> str:
        return self.info.build_id

    @staticmethod
    def _plain(hits: list[list[Hit]]) -> list[Scored]:
        return [[(h.idx, h.passage_id, h.doc_id, h.score) for h in ranking] for ranking in hits]

    def bm25_search(self, queries: list[str], k: int, mask: np.ndarray | None) -> list[Scored]:
        return self._plain(self.bm25.search_many(queries, k, mask))

    def dense_search(self, vectors: np.ndarray, k: int, mask: np.ndarray | None) -> list[Scored]:
        return self._plain(self._dense().search_vectors(vectors, k, mask))

    def passages(self, rows: list[int]) -> dict[int, dict[str, Any]]:
        return self.docstore.passages(rows)

    def passages_by_id(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        return self.docstore.passages_by_id(ids)

    def document(self, doc_id: str) -> dict[str, Any] | None:
        return self.docstore.document(doc_id)

    def passage_rows(self) -> list[tuple[str, str]]:
        return self.docstore.passage_rows()

    def passage_texts(self) -> list[tuple[str, str, str]]:
        return self.docstore.passage_texts()

    def filter_mask(self, filters: dict[str, Any]) -> np.ndarray:
        return self.docstore.filter_mask(filters)

    def maxsim(self, query: np.ndarray, rows: list[int]) -> np.ndarray:
        return self._tokens().maxsim(query, rows)


class RemoteShard(DocstoreReader, TokenStoreReader):
    """A `ShardServer` deployment seen from the ingress: each call waits at most `timeout_s`, and any failure
    is `ShardUnavailable` naming the shard. It is the shard's docstore and token store; `retriever()` and
    `vector_index()` are its BM25 and dense index (all in the shard's own rows)."""

    def __init__(self, name: str, handle: Any, timeout_s: float) -> None:
        self.name = name
        self.handle = handle
        self.timeout_s = timeout_s
        self.num_passages = 0
        self.num_documents = 0

    def call(self, method: str, *args: Any) -> Any:
        try:
            return getattr(self.handle, method).remote(*args).result(timeout_s=self.timeout_s)
        except Exception as exc:  # noqa: BLE001 - a dead replica, a timeout, an error inside the shard
            raise ShardUnavailable(self.name, f"{type(exc).__name__}: {str(exc)[:200]}") from exc

    def ping(self) -> bool:
        try:
            self.call("ping")
            return True
        except ShardUnavailable:
            return False

    def unavailable(self) -> list[str]:
        return [] if self.ping() else [self.name]

    # searchers
    def retriever(self) -> RemoteRetriever:
        return RemoteRetriever(self)

    def vector_index(self) -> RemoteVectorIndex:
        return RemoteVectorIndex(self)

    # docstore
    def passages(self, indices: Iterable[int]) -> dict[int, dict[str, Any]]:
        return self.call("passages", [int(i) for i in indices])

    def passages_by_id(self, passage_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        return self.call("passages_by_id", list(passage_ids))

    def document(self, doc_id: str) -> dict[str, Any] | None:
        return self.call("document", doc_id)

    def passage_rows(self) -> list[tuple[str, str]]:
        return self.call("passage_rows")

    def passage_texts(self) -> list[tuple[str, str, str]]:
        return self.call("passage_texts")

    def filter_mask(self, filters: dict[str, Any]) -> np.ndarray:
        return self.call("filter_mask", filters)

    def close(self) -> None:  # the deployment outlives the ingress's build
        return None

    # token store
    def maxsim(self, query: np.ndarray, rows: list[int]) -> np.ndarray:
        return self.call("maxsim", query, list(rows))


class RemoteRetriever(Retriever):
    """A shard's BM25, answered by its deployment in the shard's rows."""

    name = "bm25"

    def __init__(self, shard: RemoteShard) -> None:
        self.shard = shard

    def search_many(self, queries: list[str], k: int, mask: np.ndarray | None = None) -> list[list[Hit]]:
        return [ranked(self.name, scored) for scored in self.shard.call("bm25_search", queries, k, mask)]


class RemoteVectorIndex(VectorIndex):
    """A shard's dense index, searched by the vectors the ingress encoded, in the shard's rows."""

    def __init__(self, shard: RemoteShard) -> None:
        self.shard = shard

    def search_vectors(self, vectors: np.ndarray, k: int, mask: np.ndarray | None = None) -> list[list[Hit]]:
        return [ranked("dense", scored) for scored in self.shard.call("dense_search", vectors, k, mask)]


class RemoteShards:
    """`Models.shards` in an ingress replica: a sharded build's shards as `ShardServer` deployments."""

    def __init__(self, handles: dict[str, Any], timeout_s: float) -> None:
        self.handles = handles  # shard name → deployment handle
        self.timeout_s = timeout_s

    def open(self, info: BundleInfo, entries: list[dict[str, Any]]) -> list[BundleParts]:
        from app.services import BundleParts

        parts = []
        for entry in entries:
            if entry["name"] not in self.handles:
                raise BundleError(f"no deployment serves {entry['name']} of build {info.build_id}")
            shard = RemoteShard(entry["name"], self.handles[entry["name"]], self.timeout_s)
            described = shard.call("describe")
            if described["build"] != f"{info.build_id}.{entry['name']}":
                raise BundleError(
                    f"deployment for {entry['name']} serves build {described['build']}, not {info.build_id}; "
                    "redeploy the shards with the ingress (`sift serve --engine ray --shards`)"
                )
            shard.num_passages, shard.num_documents = described["passages"], described["documents"]
            parts.append(
                BundleParts(
                    shard,
                    shard.retriever(),
                    shard.vector_index() if described["dense"] else None,
                    shard if described["tokens"] else None,
                )
            )
        return parts


def deployment_name(shard: str) -> str:
    return f"sift-{shard}"


@serve.ingress()
class SiftReplica:
    """The whole service as a Serve ingress replica. Its services load in the constructor, so Serve routes
    requests to a replica only once it can answer them."""

    # Ray Serve awaits an async constructor (mypy requires __init__ to return None, not a coroutine)
    async def __init__(self, settings: dict[str, Any], shards: dict[str, Any] | None = None) -> None:  # type: ignore[misc]
        from app.services import Services

        self.settings = Settings.model_validate(settings)
        self.services = Services.from_settings(self.settings)
        if shards:  # a sharded layout: shard name → handle of its ShardServer deployment
            self.services.models.shards = RemoteShards(shards, self.settings.ray.shard_timeout_s)
        started = time.perf_counter()
        await self.services.start()
        if not self.services.ready:
            errors = [c.error for c in self.services.collections.values() if c.error]
            reason = self.services.load_error or "; ".join(errors) or "see the replica's log"
            raise RuntimeError(f"replica could not load its build: {reason}")
        log.info("replica ready in %.1f s", time.perf_counter() - started)

    def __serve_build_asgi_app__(self) -> Any:  # the ASGI app
        from app.api.main import create_app

        return create_app(self.settings, services=self.services)


def serve_options(settings: Settings) -> dict[str, Any]:
    """Deployment options of the ingress: fixed replicas, or autoscaling when configured."""
    ray_settings = settings.ray
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": ray_settings.cpus_per_replica},
        "max_ongoing_requests": ray_settings.max_ongoing_requests,
    }
    if ray_settings.autoscaling is not None:
        options["autoscaling_config"] = ray_settings.autoscaling.model_dump()
    else:
        options["num_replicas"] = ray_settings.replicas
    return options


def build_application(settings: Settings, sharded: bool = False) -> Any:
    """The Serve application for `settings` (its bundle from `settings.bundle`): replicas of the service, or
    with `sharded` one deployment per shard of the (sharded) build plus the ingress that fans out to them."""
    # the decorator form: `serve.deployment(cls, ...)` works too, but Ray types it as returning the decorator
    ingress = serve.deployment(name="sift", **serve_options(settings))(SiftReplica)
    if not sharded:
        return ingress.bind(settings.model_dump(mode="json"))
    info = open_bundle(settings.bundle, verify=False)
    entries = shard_map(info.manifest)
    if not entries:
        raise BundleError(f"{info.root} is not a sharded build; build it with --shards N, or drop --shards")
    shards = {
        e["name"]: serve.deployment(
            name=deployment_name(e["name"]),
            num_replicas=settings.ray.shard_replicas,
            max_ongoing_requests=settings.ray.max_ongoing_requests,
            ray_actor_options={"num_cpus": settings.ray.cpus_per_shard},
        )(ShardServer).bind(str(info.root / e["name"]))
        for e in entries
    }
    fixed = settings.model_copy(deep=True)
    fixed.bundle = info.root  # the ingress serves exactly the build its shards were deployed from
    return ingress.bind(fixed.model_dump(mode="json"), shards)


def run(settings: Settings, host: str, port: int, sharded: bool = False, block: bool = True) -> None:
    """Start (or join) Ray and Serve, deploy, and keep serving until interrupted."""
    import ray

    if not ray.is_initialized():
        ray.init(address=settings.ray.address, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_application(settings, sharded), name="sift", route_prefix="/")
    log.info("serving on http://%s:%d with Ray Serve", host, port)
    if block:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()
