"""The two records every stage shares: a source `Document` and the `Passage`s cut from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Document:
    """One source document as read from JSONL, a folder or CSV."""

    id: str
    title: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Passage:
    """A window of a document's text; `start`/`end` are character offsets into `Document.text`; `metadata`:
    the passage's own (e.g. its zero-shot tags), read over its document's."""

    id: str
    doc_id: str
    position: int
    text: str
    start: int
    end: int
    metadata: dict[str, Any] = field(default_factory=dict, hash=False)


def passage_id(doc_id: str, position: int) -> str:
    """The stable passage id used everywhere (bundle, API, run files)."""
    return f"{doc_id}#{position}"


def passage_index_text(title: str, text: str) -> str:
    """The text BM25, the dual-encoder and the reranker see for a passage: its document title, then the
    passage. Shared by the build job and the server, so both always see the same string."""
    return f"{title} {text}".strip() if title else text
