"""`GenerationPool`: generation (and reading) on its own bounded threads, admitted up to a limit.

Retrieval runs on asyncio's default executor; answers run here, so a burst of slow generations never makes
a search wait for a thread. At most `size` answers are admitted at once (`server.max_concurrent_generations`);
one more is refused at once (`Busy`, a 429 with Retry-After), never queued without end.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class Busy(RuntimeError):
    """Every generation slot is taken."""

    def __init__(self, size: int) -> None:
        super().__init__(f"all {size} generation slots are busy (server.max_concurrent_generations); retry in a second")
        self.size = size


class GenerationPool:
    def __init__(self, size: int) -> None:
        self.size = size
        # two threads per slot: a stream's consumer, and the model thread a local generator starts beside it
        self._executor = ThreadPoolExecutor(max_workers=2 * size, thread_name_prefix="generate")
        self._active = 0
        self._lock = threading.Lock()

    @property
    def active(self) -> int:
        return self._active

    def acquire(self) -> None:
        """Take a slot or raise `Busy`."""
        with self._lock:
            if self._active >= self.size:
                raise Busy(self.size)
            self._active += 1

    def release(self) -> None:
        with self._lock:
            self._active = max(0, self._active - 1)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on a generation thread, with the caller's context (request id, tracing span)."""
        context = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(self._executor, lambda: context.run(fn, *args))

    def start(self, fn: Callable[[], None]) -> None:
        """Run `fn` on a generation thread, with the caller's context, without waiting for it."""
        context = contextvars.copy_context()
        self._executor.submit(context.run, fn)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
