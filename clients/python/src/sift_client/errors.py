"""Errors raised by the client: one class per kind of failure, each carrying what the server said.

Sift answers every failure with `{"error": {"type", "message", "fields", "request_id"}}`; the exception keeps
those (`type` as `error_type`), the HTTP status and, for 429 and 503, the `Retry-After` the server asked for.
"""

from __future__ import annotations

import json
from typing import Any

import httpx


class SiftError(Exception):
    """Base of every error the client raises."""


class SiftConnectionError(SiftError):
    """The server could not be reached (refused, reset, DNS), after the retries."""


class SiftTimeoutError(SiftConnectionError):
    """No answer within the client's timeout, after the retries."""


class SiftStreamError(SiftError):
    """A streamed answer failed after its status line: the server sent an `error` event, an event this client
    cannot read, or the stream broke off or ended before its `done` event. `request_id` finds it in the log."""

    def __init__(self, message: str, request_id: str | None = None) -> None:
        super().__init__(message + (f" (request {request_id})" if request_id else ""))
        self.message = message
        self.request_id = request_id


class APIStatusError(SiftError):
    """The server answered with a status >= 400.

    `error_type` is the server's `error.type` (e.g. `validation_error`, `rate_limited`), `request_id` the
    `X-Request-ID` the server logged it under, `fields` each bad field (422s) and `retry_after` the seconds
    the server asked to wait (429, 503), when it said."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        error_type: str | None = None,
        request_id: str | None = None,
        fields: list[dict[str, str]] | None = None,
        retry_after: float | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(
            f"{status_code} {error_type or 'error'}: {message}" + (f" (request {request_id})" if request_id else "")
        )
        self.status_code = status_code
        self.message = message
        self.error_type = error_type
        self.request_id = request_id
        self.fields = fields
        self.retry_after = retry_after
        self.body = body


class InvalidRequestError(APIStatusError):
    """400 or 422: the request is wrong; `fields` names each bad field."""


class AuthenticationError(APIStatusError):
    """401: no API key, or one the server does not know (pass `api_key=` or set SIFT_API_KEY)."""


class PermissionDeniedError(APIStatusError):
    """403: the key lacks the scope the route needs."""


class NotFoundError(APIStatusError):
    """404: unknown collection, document or route."""


class ConflictError(APIStatusError):
    """409: e.g. a paging cursor from another build; search again from the first page."""


class RequestTooLargeError(APIStatusError):
    """413: the body or the work asked for is over a server limit; the message names the setting."""


class RateLimitError(APIStatusError):
    """429: too many requests, or the rerank or generation queue is full; see `retry_after`."""


class ServiceUnavailableError(APIStatusError):
    """503: the bundle or a shard is not loaded yet; see `retry_after`."""


class ServerError(APIStatusError):
    """Any other 5xx."""


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: InvalidRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: RequestTooLargeError,
    422: InvalidRequestError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}


def retry_after_of(response: httpx.Response) -> float | None:
    """Seconds from a `Retry-After` header given in seconds; None when absent or an HTTP date."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return max(0.0, seconds)


def error_from_response(response: httpx.Response) -> APIStatusError:
    """The typed error for a response with status >= 400, from Sift's error body when it has one."""
    body: Any = None
    error: dict[str, Any] = {}
    try:
        body = json.loads(response.content) if response.content else None
    except ValueError:
        body = response.text
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
    status = response.status_code
    kind = _BY_STATUS.get(status) or (ServerError if status >= 500 else APIStatusError)
    message = error.get("message") or (body if isinstance(body, str) and body else response.reason_phrase)
    return kind(
        status,
        str(message),
        error_type=error.get("type"),
        request_id=error.get("request_id") or response.headers.get("x-request-id"),
        fields=error.get("fields"),
        retry_after=retry_after_of(response),
        body=body,
    )
