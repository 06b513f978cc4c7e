"""Sync and async clients for Sift's search API.

Both share one `_Config` (URL, key, timeout, retry policy) and one retry decision (`_Config.retry_delay`),
so the two differ only in how they wait and send. Every call is read-only on the server or idempotent
(`upsert` replaces documents by id, `delete` of a deleted id does nothing), so a call that failed before an
answer (429, 502, 503, 504, connection or timeout) may be sent again:

- waits `Retry-After` when the server gives it (429 and 503 do), else backs off exponentially with jitter;
- never retries any other 4xx: the request itself is wrong (or the key), sending it again cannot help;
- gives up after `max_retries` retries, or when the server asks for a longer wait than `max_retry_wait`,
  and raises the typed error (`sift_client.errors`) with the server's `error.type` and `request_id`.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel
from typing_extensions import Unpack

from sift_client.errors import (
    SiftConnectionError,
    SiftError,
    SiftStreamError,
    SiftTimeoutError,
    error_from_response,
    retry_after_of,
)
from sift_client.models import (
    AnswerEvent,
    AnswerResponse,
    BatchSearchResponse,
    ClassifyResponse,
    CollectionsResponse,
    DocumentResponse,
    DoneEvent,
    GenerationOptions,
    PassagesEvent,
    SearchOptions,
    SearchResponse,
    TaskResponse,
    TokenEvent,
)

__version__ = "0.1.0"
DEFAULT_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = frozenset({429, 502, 503, 504})
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class _Config:
    base_url: str
    api_key: str | None
    timeout: httpx.Timeout
    max_retries: int
    backoff: float
    max_backoff: float
    max_retry_wait: float
    collection: str | None
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        base_url: str | None,
        api_key: str | None,
        timeout: float | httpx.Timeout,
        max_retries: int,
        backoff: float,
        max_backoff: float,
        max_retry_wait: float,
        collection: str | None,
    ) -> _Config:
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if backoff < 0 or max_backoff < 0 or max_retry_wait < 0:
            raise ValueError("backoff, max_backoff and max_retry_wait must be >= 0 (seconds)")
        url = (base_url or os.environ.get("SIFT_URL") or DEFAULT_URL).rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https:// (got {url!r})")
        key = api_key if api_key is not None else os.environ.get("SIFT_API_KEY") or None
        headers = {"user-agent": f"sift-client/{__version__}", "accept": "application/json"}
        if key:
            headers["authorization"] = f"Bearer {key}"
        return cls(
            url,
            key,
            timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout),
            max_retries,
            backoff,
            max_backoff,
            max_retry_wait,
            collection,
            headers,
        )

    def retry_delay(self, attempt: int, response: httpx.Response | None) -> float | None:
        """Seconds to wait before retry number `attempt + 1`, or None to give up now.

        `response` is None when the attempt failed in transport (connection or timeout)."""
        if attempt >= self.max_retries:
            return None
        if response is not None:
            if response.status_code not in RETRY_STATUSES:
                return None
            asked = retry_after_of(response)
            if asked is not None:
                return asked if asked <= self.max_retry_wait else None
        return min(self.max_backoff, self.backoff * 2**attempt) * random.uniform(0.5, 1.0)

    def body(self, params: dict[str, Any]) -> dict[str, Any]:
        """The JSON body: the options given, with the client's default collection unless one is named."""
        out = {key: value for key, value in params.items() if value is not None}
        if self.collection is not None and "collection" not in out:
            out["collection"] = self.collection
        return out

    def collection_path(self, collection: str | None) -> str:
        """The URL path segment of `collection` (default: the client's, else the server's `default`)."""
        return quote(collection or self.collection or "default", safe="")

    def query(self, collection: str | None) -> dict[str, str]:
        name = collection if collection is not None else self.collection
        return {} if name is None else {"collection": name}


def _wait(wait: bool) -> dict[str, str] | None:
    return {"wait": "true"} if wait else None


def _document_path(doc_id: str) -> str:
    """`/v1/documents/<id>` with every character of the id that a URL would read as structure escaped: `/`,
    `#`, `?`, `%`, and an id of dots only (`.` and `..` would be resolved away as path segments)."""
    if not doc_id:
        raise ValueError("doc_id must not be empty")
    escaped = quote(doc_id, safe="")
    return "/v1/documents/" + (escaped.replace(".", "%2E") if set(doc_id) == {"."} else escaped)


def _parse(model: type[M], response: httpx.Response) -> M:
    return model.model_validate_json(response.content)


def _transport_error(exc: httpx.TransportError, url: str) -> SiftError:
    if isinstance(exc, httpx.TimeoutException):
        return SiftTimeoutError(
            f"no answer from {url} in time ({type(exc).__name__}); raise timeout= or check the server"
        )
    return SiftConnectionError(f"cannot reach {url} ({type(exc).__name__}: {exc}); is `sift serve` running there?")


class _SSE:
    """Server-Sent Events from lines: `feed(line)` returns (event, data) when a blank line ends one."""

    def __init__(self) -> None:
        self.event = "message"
        self.data: list[str] = []

    def feed(self, line: str) -> tuple[str, str] | None:
        line = line.lstrip("\ufeff")
        if not line:
            if not self.data:
                self.event = "message"
                return None
            out = (self.event, "\n".join(self.data))
            self.event, self.data = "message", []
            return out
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            self.event = value or "message"
        elif name == "data":
            self.data.append(value)
        return None


def _answer_event(event: str, data: str, request_id: str | None = None) -> AnswerEvent | None:
    try:
        payload = json.loads(data)
        if event == "passages":
            return PassagesEvent.model_validate(payload)
        if event == "token":
            return TokenEvent.model_validate(payload)
        if event == "done":
            return DoneEvent(answer=AnswerResponse.model_validate(payload))
    except ValueError as exc:  # malformed JSON, or a payload of another shape (pydantic's error is a ValueError)
        raise SiftStreamError(f"a malformed {event!r} event in the answer stream: {exc}", request_id) from exc
    if event == "error":
        message = payload.get("message", payload) if isinstance(payload, dict) else payload
        raise SiftStreamError(f"the server failed during the answer: {message}", request_id)
    return None  # an event this client does not know yet: skipped


class _AnswerStream:
    """The events of one streamed answer, from its lines. Raises `SiftStreamError` (with the request id) for
    an `error` event, a malformed event, a broken connection or a stream that ends before its `done` event."""

    def __init__(self, request_id: str | None) -> None:
        self.request_id = request_id
        self.sse = _SSE()
        self.done = False

    def feed(self, line: str) -> AnswerEvent | None:
        block = self.sse.feed(line)
        if block is None:
            return None
        event = _answer_event(*block, self.request_id)
        self.done = self.done or isinstance(event, DoneEvent)
        return event

    def finish(self) -> AnswerEvent | None:
        """The last event if the stream ended without its blank line; raises if no `done` event came."""
        event = self.feed("")
        if not self.done:
            raise SiftStreamError("the answer stream ended before its done event", self.request_id)
        return event

    def broken(self, exc: Exception) -> SiftStreamError:
        return SiftStreamError(f"the answer stream broke off ({type(exc).__name__}: {exc})", self.request_id)


def _answer_body(
    question: str,
    passages: int | None,
    generation: GenerationOptions | None,
    stream: bool,
    options: SearchOptions,
) -> dict[str, Any]:
    return {"question": question, "passages": passages, "generation": generation, "stream": stream, **options}


H = TypeVar("H", httpx.Client, httpx.AsyncClient)


class _Base(Generic[H]):
    """What the sync and async clients share: their settings (`_Config`) and their httpx client."""

    _http_type: type[H]

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = 60.0,
        max_retries: int = 2,
        backoff: float = 0.25,
        max_backoff: float = 8.0,
        max_retry_wait: float = 30.0,
        collection: str | None = None,
        http_client: H | None = None,
    ) -> None:
        self._config = _Config.of(
            base_url, api_key, timeout, max_retries, backoff, max_backoff, max_retry_wait, collection
        )
        self._http: H = http_client or self._http_type(timeout=self._config.timeout)
        self._owns_http = http_client is None

    @property
    def base_url(self) -> str:
        return self._config.base_url


class SiftClient(_Base[httpx.Client]):
    """A blocking client of one Sift server; thread-safe, reuses connections. Close it (or use `with`).

    `base_url` defaults to $SIFT_URL, else http://127.0.0.1:8000; `api_key` to $SIFT_API_KEY. `collection`
    is the collection every call uses unless it names another. `timeout` (seconds) bounds each connect,
    read and write of an attempt (httpx's timeout), not the whole call with its retries."""

    _http_type = httpx.Client

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> SiftClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, method: str, path: str, *, json_body: Any = None, params: Any = None) -> httpx.Response:
        url = self._config.base_url + path
        attempt = 0
        while True:
            try:
                response = self._http.request(
                    method,
                    url,
                    json=json_body,
                    params=params,
                    headers=self._config.headers,
                    timeout=self._config.timeout,
                )
            except httpx.TransportError as exc:
                delay = self._config.retry_delay(attempt, None)
                if delay is None:
                    raise _transport_error(exc, url) from exc
            else:
                if response.status_code < 400:
                    return response
                delay = self._config.retry_delay(attempt, response)
                if delay is None:
                    raise error_from_response(response)
            time.sleep(delay)
            attempt += 1

    def search(
        self,
        query: str,
        *,
        offset: int = 0,
        cursor: str | None = None,
        facets: list[str] | None = None,
        **options: Unpack[SearchOptions],
    ) -> SearchResponse:
        """One page of hits for `query` (`POST /v1/search`), best first, each with its stages' explain; with
        `facets`, those metadata fields' value counts over the candidates (`SearchResponse.facets`)."""
        body = self._config.body(
            {"query": query, "offset": offset or None, "cursor": cursor, "facets": facets, **options}
        )
        return _parse(SearchResponse, self._send("POST", "/v1/search", json_body=body))

    def search_pages(self, query: str, **options: Unpack[SearchOptions]) -> Iterator[SearchResponse]:
        """Every page of hits for `query`, following `next_cursor` until the last page."""
        page = self.search(query, **options)
        yield page
        while page.next_cursor is not None:
            page = self.search(query, cursor=page.next_cursor, **options)
            yield page

    def search_batch(
        self, queries: list[str], *, offset: int = 0, **options: Unpack[SearchOptions]
    ) -> BatchSearchResponse:
        """Hits for several queries in one request (`POST /v1/search/batch`), one result per query, in order."""
        body = self._config.body({"queries": queries, "offset": offset or None, **options})
        return _parse(BatchSearchResponse, self._send("POST", "/v1/search/batch", json_body=body))

    def document(self, doc_id: str, *, collection: str | None = None) -> DocumentResponse:
        """A document with all its passages (`GET /v1/documents/{id}`); `NotFoundError` when unknown."""
        path = _document_path(doc_id)
        return _parse(DocumentResponse, self._send("GET", path, params=self._config.query(collection)))

    def collections(self) -> CollectionsResponse:
        """The served collections, the default first, with their builds and reload state."""
        return _parse(CollectionsResponse, self._send("GET", "/v1/collections"))

    def upsert(
        self, documents: list[dict[str, Any]], *, collection: str | None = None, wait: bool = False
    ) -> TaskResponse:
        """Add or replace documents (`{"_id", "text", "title"?, "metadata"?}`) in `collection` (admin key):
        durable when this returns; with `wait`, also searchable (`status == "searchable"`)."""
        path = f"/v1/collections/{self._config.collection_path(collection)}/documents"
        return _parse(TaskResponse, self._send("POST", path, json_body=documents, params=_wait(wait)))

    def delete(self, ids: list[str], *, collection: str | None = None, wait: bool = False) -> TaskResponse:
        """Delete documents by id from `collection` (admin key); with `wait`, until the deletion is searched."""
        path = f"/v1/collections/{self._config.collection_path(collection)}/documents/delete"
        return _parse(TaskResponse, self._send("POST", path, json_body={"ids": ids}, params=_wait(wait)))

    def task(self, task: int, *, collection: str | None = None) -> TaskResponse:
        """The state of a batch `upsert` or `delete` returned."""
        path = f"/v1/collections/{self._config.collection_path(collection)}/tasks/{int(task)}"
        return _parse(TaskResponse, self._send("GET", path))

    def classify(self, texts: list[str], label_set: str | dict[str, Any]) -> ClassifyResponse:
        """Zero-shot labels for `texts` (`POST /v1/classify`): `label_set` names a configured one (e.g.
        "topic"), or is `{"labels": {label: [words]}, "template": ..., "prefix": ...}`."""
        body = {"texts": texts, "label_set": label_set}
        return _parse(ClassifyResponse, self._send("POST", "/v1/classify", json_body=body))

    def answer(
        self,
        question: str,
        *,
        passages: int | None = None,
        generation: GenerationOptions | None = None,
        **options: Unpack[SearchOptions],
    ) -> AnswerResponse:
        """Retrieve, then answer from the best passages with citations (`POST /v1/answer`)."""
        body = self._config.body(_answer_body(question, passages, generation, False, options))
        return _parse(AnswerResponse, self._send("POST", "/v1/answer", json_body=body))

    def answer_stream(
        self,
        question: str,
        *,
        passages: int | None = None,
        generation: GenerationOptions | None = None,
        **options: Unpack[SearchOptions],
    ) -> Iterator[AnswerEvent]:
        """The answer as it is generated: a `PassagesEvent`, `TokenEvent`s, then a `DoneEvent` with the whole
        answer. A failure after the stream began raises `SiftStreamError`. Retries apply before the stream."""
        body = self._config.body(_answer_body(question, passages, generation, True, options))
        url = self._config.base_url + "/v1/answer"
        headers = {**self._config.headers, "accept": "text/event-stream"}
        attempt = 0
        while True:
            stream: _AnswerStream | None = None
            try:
                with self._http.stream(
                    "POST", url, json=body, headers=headers, timeout=self._config.timeout
                ) as response:
                    if response.status_code < 400:
                        stream = _AnswerStream(response.headers.get("x-request-id"))
                        for line in response.iter_lines():
                            if (event := stream.feed(line)) is not None:
                                yield event
                        if (event := stream.finish()) is not None:
                            yield event
                        return
                    response.read()
                    delay = self._config.retry_delay(attempt, response)
                    if delay is None:
                        raise error_from_response(response)
            except httpx.TransportError as exc:
                if stream is not None:  # events may have gone out: never sent again
                    raise stream.broken(exc) from exc
                delay = self._config.retry_delay(attempt, None)
                if delay is None:
                    raise _transport_error(exc, url) from exc
            time.sleep(delay)
            attempt += 1


class AsyncSiftClient(_Base[httpx.AsyncClient]):
    """The asyncio twin of `SiftClient`: the same methods, awaited (`answer_stream` is an async iterator)."""

    _http_type = httpx.AsyncClient

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncSiftClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _send(self, method: str, path: str, *, json_body: Any = None, params: Any = None) -> httpx.Response:
        url = self._config.base_url + path
        attempt = 0
        while True:
            try:
                response = await self._http.request(
                    method,
                    url,
                    json=json_body,
                    params=params,
                    headers=self._config.headers,
                    timeout=self._config.timeout,
                )
            except httpx.TransportError as exc:
                delay = self._config.retry_delay(attempt, None)
                if delay is None:
                    raise _transport_error(exc, url) from exc
            else:
                if response.status_code < 400:
                    return response
                delay = self._config.retry_delay(attempt, response)
                if delay is None:
                    raise error_from_response(response)
            await asyncio.sleep(delay)
            attempt += 1

    async def search(
        self,
        query: str,
        *,
        offset: int = 0,
        cursor: str | None = None,
        facets: list[str] | None = None,
        **options: Unpack[SearchOptions],
    ) -> SearchResponse:
        body = self._config.body(
            {"query": query, "offset": offset or None, "cursor": cursor, "facets": facets, **options}
        )
        return _parse(SearchResponse, await self._send("POST", "/v1/search", json_body=body))

    async def search_pages(self, query: str, **options: Unpack[SearchOptions]) -> AsyncIterator[SearchResponse]:
        page = await self.search(query, **options)
        yield page
        while page.next_cursor is not None:
            page = await self.search(query, cursor=page.next_cursor, **options)
            yield page

    async def search_batch(
        self, queries: list[str], *, offset: int = 0, **options: Unpack[SearchOptions]
    ) -> BatchSearchResponse:
        body = self._config.body({"queries": queries, "offset": offset or None, **options})
        return _parse(BatchSearchResponse, await self._send("POST", "/v1/search/batch", json_body=body))

    async def document(self, doc_id: str, *, collection: str | None = None) -> DocumentResponse:
        path = _document_path(doc_id)
        return _parse(DocumentResponse, await self._send("GET", path, params=self._config.query(collection)))

    async def collections(self) -> CollectionsResponse:
        return _parse(CollectionsResponse, await self._send("GET", "/v1/collections"))

    async def upsert(
        self, documents: list[dict[str, Any]], *, collection: str | None = None, wait: bool = False
    ) -> TaskResponse:
        """As `SiftClient.upsert`."""
        path = f"/v1/collections/{self._config.collection_path(collection)}/documents"
        return _parse(TaskResponse, await self._send("POST", path, json_body=documents, params=_wait(wait)))

    async def delete(self, ids: list[str], *, collection: str | None = None, wait: bool = False) -> TaskResponse:
        """As `SiftClient.delete`."""
        path = f"/v1/collections/{self._config.collection_path(collection)}/documents/delete"
        return _parse(TaskResponse, await self._send("POST", path, json_body={"ids": ids}, params=_wait(wait)))

    async def task(self, task: int, *, collection: str | None = None) -> TaskResponse:
        """As `SiftClient.task`."""
        path = f"/v1/collections/{self._config.collection_path(collection)}/tasks/{int(task)}"
        return _parse(TaskResponse, await self._send("GET", path))

    async def classify(self, texts: list[str], label_set: str | dict[str, Any]) -> ClassifyResponse:
        body = {"texts": texts, "label_set": label_set}
        return _parse(ClassifyResponse, await self._send("POST", "/v1/classify", json_body=body))

    async def answer(
        self,
        question: str,
        *,
        passages: int | None = None,
        generation: GenerationOptions | None = None,
        **options: Unpack[SearchOptions],
    ) -> AnswerResponse:
        body = self._config.body(_answer_body(question, passages, generation, False, options))
        return _parse(AnswerResponse, await self._send("POST", "/v1/answer", json_body=body))

    async def answer_stream(
        self,
        question: str,
        *,
        passages: int | None = None,
        generation: GenerationOptions | None = None,
        **options: Unpack[SearchOptions],
    ) -> AsyncIterator[AnswerEvent]:
        body = self._config.body(_answer_body(question, passages, generation, True, options))
        url = self._config.base_url + "/v1/answer"
        headers = {**self._config.headers, "accept": "text/event-stream"}
        attempt = 0
        while True:
            stream: _AnswerStream | None = None
            try:
                async with self._http.stream(
                    "POST", url, json=body, headers=headers, timeout=self._config.timeout
                ) as response:
                    if response.status_code < 400:
                        stream = _AnswerStream(response.headers.get("x-request-id"))
                        async for line in response.aiter_lines():
                            if (event := stream.feed(line)) is not None:
                                yield event
                        if (event := stream.finish()) is not None:
                            yield event
                        return
                    await response.aread()
                    delay = self._config.retry_delay(attempt, response)
                    if delay is None:
                        raise error_from_response(response)
            except httpx.TransportError as exc:
                if stream is not None:  # events may have gone out: never sent again
                    raise stream.broken(exc) from exc
                delay = self._config.retry_delay(attempt, None)
                if delay is None:
                    raise _transport_error(exc, url) from exc
            await asyncio.sleep(delay)
            attempt += 1
