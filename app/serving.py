"""Several worker processes on one port (`server.workers` > 1), pre-forked by gunicorn.

The master process loads the models once (`Services.preload`: reranker, generator, reader and the bi-encoder
of each collection's build) and then forks the workers, which share those weights copy-on-write: N workers
cost about one model set, not N. Each worker then opens the builds itself (BM25 and the docstore are
memory-mapped or read-only files, so their pages are shared through the page cache too), reloads them on
its own, and serves with uvicorn (`uvicorn_worker.UvicornWorker`). gunicorn restarts a worker that dies,
from the same loaded master, without loading the models again.

Invariants:
- the master never runs torch with more than one thread (a forked child cannot use an OpenMP pool started by
  its parent: it hangs), and ONNX Runtime sessions reopen themselves in each worker (`indexer.runtime`);
- each worker gets `runtime.threads` = cores ÷ workers unless set, so the workers do not oversubscribe cores;
- the master serves nothing and writes nothing: workers answer, and the bundle stays read-only.
"""

from __future__ import annotations

import gc
import logging
import os
from typing import TYPE_CHECKING, Any

from gunicorn.app.base import BaseApplication

from app.settings import Settings
from indexer.runtime import return_freed_memory

if TYPE_CHECKING:
    from app.services import Models

log = logging.getLogger("sift.serving")


def worker_threads(settings: Settings, workers: int) -> int:
    """Intra-op threads per worker: `runtime.threads` when set, else the cores shared out (at least 1)."""
    return settings.runtime.threads or max(1, (os.cpu_count() or 1) // workers)


def prepare_fork(models: Models) -> None:
    """The master's last step before forking: free its ONNX Runtime sessions (their threads do not fork; each
    worker opens its own), keep what is loaded out of every worker's GC (a GC pass writes to every object it
    scans, copying its page), and give the heap's free pages back to the OS (glibc `malloc_trim`), since a
    worker reusing an inherited free page copies it."""
    models.release_sessions()
    return_freed_memory()
    gc.freeze()


class PreforkServer(BaseApplication):
    """gunicorn with uvicorn workers around Sift's app; the app (and its models) is loaded before forking."""

    def __init__(self, settings: Settings, workers: int, host: str, port: int) -> None:
        if workers < 2:
            raise ValueError("PreforkServer is for 2 or more workers; serve one with uvicorn.run")
        self.settings = settings.model_copy(deep=True)
        self.settings.runtime.threads = worker_threads(settings, workers)
        self.settings.server.workers = workers
        self.workers, self.host, self.port = workers, host, port
        super().__init__()

    def load_config(self) -> None:
        options: dict[str, Any] = {
            "bind": [f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"],
            "workers": self.workers,
            "worker_class": "uvicorn_worker.UvicornWorker",
            "preload_app": True,  # load() runs once, in the master, before the workers are forked
            "timeout": 120,  # a worker silent this long (stuck) is replaced
            "graceful_timeout": 30,
            "keepalive": 5,
            "loglevel": self.settings.server.log_level,
            "proc_name": "sift",
        }
        for key, value in options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:  # the ASGI app
        from app.api.main import create_app
        from app.services import Services

        services = Services.from_settings(self.settings)
        services.preload()
        prepare_fork(services.models)
        log.info("models loaded once for %d workers (%d threads each)", self.workers, self.settings.runtime.threads)
        return create_app(self.settings, services=services)


def serve_workers(settings: Settings, workers: int, host: str, port: int) -> None:
    """Serve with `workers` pre-forked processes until interrupted (SIGTERM: graceful, SIGINT: quick)."""
    PreforkServer(settings, workers, host, port).run()
