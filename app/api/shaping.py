"""Turn pipeline results into API responses: explain blocks, snippets and highlights.

Search responses are plain dicts in the shape of `SearchResponse` (the OpenAPI schema), serialised once by
orjson in `FastJSON`: no pydantic model per hit is built and then validated again on the way out. The
shape is checked against the schema by the tests (tests/test_api.py, the schema fuzzer in test_fuzz.py)."""

from __future__ import annotations

import bisect
import functools
import html
import re
from typing import Any

import orjson
from fastapi.responses import Response

from app.pipeline import RETRIEVERS_BY_MODE, SearchOptions, SearchResult

_WORD = re.compile(r"\w\w+", re.UNICODE)
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])(?:/[^\s/'\"(),;]+)+/?")
PRIVATE_KEYS = {"host"}


def redact(value: Any) -> Any:
    """`value` without what tells where things live: absolute paths keep only their last two components
    (`.../<build id>/docstore.sqlite`), host names are dropped. For responses to callers without the admin
    scope."""
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items() if k not in PRIVATE_KEYS}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return _ABSOLUTE_PATH.sub(lambda m: ".../" + "/".join(m.group(0).rstrip("/").split("/")[-2:]), value)
    return value


@functools.lru_cache(maxsize=1024)
def _terms_pattern(terms: frozenset[str]) -> re.Pattern[str]:
    """Whole words (as `_WORD` splits them) equal to one of `terms`, any case: one regex scan of a passage
    instead of a Python test per word (the snippet is on every hit of a `return_text: false` search)."""
    alternatives = "|".join(re.escape(t) for t in sorted(terms, key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE | re.UNICODE)


def snippet(text: str, query: str, chars: int, highlight: bool) -> str:
    """A window of about `chars` characters around the densest cluster of query terms."""
    terms = {t.lower() for t in _WORD.findall(query)}
    matches = list(_terms_pattern(frozenset(terms)).finditer(text)) if terms else []
    if len(text) <= chars:
        start, end = 0, len(text)
    else:
        best = 0
        if matches:
            # matches in a window of `chars` starting at each match (starts are sorted): the first densest wins
            starts = [m.start() for m in matches]
            counts = [bisect.bisect_left(starts, s + chars) - i for i, s in enumerate(starts)]
            best = max(0, starts[counts.index(max(counts))] - chars // 6)
        start = best
        end = min(len(text), start + chars)
        while start > 0 and not text[start - 1].isspace():
            start -= 1
    window = text[start:end]
    if highlight and terms:
        pieces, last = [], 0
        for m in _WORD.finditer(window):
            if m.group().lower() in terms:
                pieces += [html.escape(window[last : m.start()]), f"<mark>{html.escape(m.group())}</mark>"]
                last = m.end()
        window = "".join(pieces) + html.escape(window[last:])
    return ("…" if start > 0 else "") + window + ("…" if end < len(text) else "")


class FastJSON(Response):
    """application/json rendered by orjson (numpy scalars and arrays included; NaN/Inf become null)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def explain(stages: dict[str, Any], options: SearchOptions) -> dict[str, dict[str, Any] | None]:
    names = list(RETRIEVERS_BY_MODE[options.mode])
    if len(names) > 1:
        names.append("fused")
    if options.rerank:
        names.append("rerank")
        if "maxsim" in stages:  # MaxSim as a stage of the combined second stage
            names.append("maxsim")
    out: dict[str, dict[str, Any] | None] = {}
    for name in names:
        stage = stages.get(name)
        out[name] = {"score": stage.score, "rank": stage.rank, "note": stage.note} if stage else None
    return out


def search_response(
    query: str,
    result: SearchResult,
    options: SearchOptions,
    bundle_id: str,
    return_text: bool,
    highlight: bool,
    snippet_chars: int = 240,
    next_cursor: str | None = None,
) -> dict[str, Any]:
    """A `SearchResponse` as a dict (see the module docstring)."""
    hits = []
    for hit in result.hits:
        passage = result.passages[hit.idx]
        text = passage["text"]
        hits.append(
            {
                "doc_id": hit.doc_id,
                "passage_id": hit.passage_id,
                "title": passage["title"],
                "text": text if return_text else None,
                "snippet": snippet(text, query, snippet_chars, highlight) if (highlight or not return_text) else None,
                "score": float(hit.score),
                "position": passage["position"],
                "start": passage["start"],
                "end": passage["end"],
                "metadata": passage["metadata"],
                "explain": explain(hit.stages, options),
            }
        )
    response = {
        "query": query,
        "mode": options.mode,
        "hits": hits,
        "timings_ms": result.timings_ms,
        "bundle": bundle_id,
        "offset": options.offset,
        "next_cursor": next_cursor,
    }
    if result.facets is not None:
        response["facets"] = result.facets
    return response
