"""Paging through `/v1/search`: `offset` + `k`, or an opaque cursor bound to the build that issued it.

A page is `ranking[offset : offset + k]` of one ranking computed at a fixed depth (see
`Pipeline.search_many`), so pages never overlap or skip a hit while the same build serves:
- with `offset`, the depth is `candidates` (pages agree with one request for the whole range when that
  range fits in `candidates`);
- with a cursor, the depth is the one the first page used, whatever `candidates` or `k` later pages send.
A cursor records the build id, the collection, the next offset, that depth and a fingerprint of the query and
every other option that shapes the ranking. A cursor from another build is refused with 409 (its ranking no
longer exists); one sent with another query or other options with 422. Cursors are not secret: they only save
the client from tracking the offset.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from app.api.errors import ApiError
from app.pipeline import SearchOptions

CURSOR_VERSION = 1


@dataclass(frozen=True)
class Cursor:
    build: str
    collection: str
    offset: int
    depth: int
    fingerprint: str


def fingerprint(query: str, options: SearchOptions, collection: str) -> str:
    """A short hash of what decides the ranking besides its depth (not `k`, `offset`, `candidates` or how
    hits are shown)."""
    shaping = {
        "query": query,
        "collection": collection,
        "mode": options.mode,
        "fusion": asdict(options.fusion),
        "rerank": options.rerank,
        "rerank_depth": options.rerank_depth if options.rerank else None,
        "filters": options.filters,
        "collapse": options.collapse,
    }
    raw = json.dumps(shaping, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def encode_cursor(cursor: Cursor) -> str:
    payload = {
        "v": CURSOR_VERSION,
        "b": cursor.build,
        "c": cursor.collection,
        "o": cursor.offset,
        "d": cursor.depth,
        "f": cursor.fingerprint,
    }
    raw = json.dumps(payload, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(token: str) -> Cursor:
    """The cursor in `token`, or a 422 naming the `cursor` field."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        payload: dict[str, Any] = json.loads(raw)
        if payload.get("v") != CURSOR_VERSION:
            raise ValueError("unknown cursor version")
        cursor = Cursor(str(payload["b"]), str(payload["c"]), int(payload["o"]), int(payload["d"]), str(payload["f"]))
        if cursor.offset < 0 or cursor.depth < 1:
            raise ValueError("negative offset or depth")
        return cursor
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError) as exc:
        raise ApiError(
            422,
            "validation_error",
            "cursor: not a cursor issued by this service; send next_cursor as received",
            "cursor",
        ) from exc


def resume(token: str, offset: int, build_id: str, collection: str, print_: str, max_depth: int) -> Cursor:
    """The cursor a request sends, checked against the serving build and the request's query and options."""
    if offset:
        raise ApiError(422, "validation_error", "cursor: send either offset or cursor, not both", "cursor")
    cursor = decode_cursor(token)
    if cursor.build != build_id:
        raise ApiError(
            409,
            "cursor_expired",
            f"cursor: issued by build {cursor.build}, but collection {collection!r} now serves build {build_id}; "
            "the ranking it pages through is gone, so search again without a cursor",
            "cursor",
        )
    if cursor.collection != collection or cursor.fingerprint != print_ or cursor.depth > max_depth:
        raise ApiError(
            422,
            "validation_error",
            "cursor: issued for another query, collection or options; send the same query and options as the "
            "first page (only k may change)",
            "cursor",
        )
    return cursor
