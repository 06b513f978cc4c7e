"""What every framework integration keeps of a hit: the passage text, and the rest as metadata."""

from __future__ import annotations

from typing import Any

from sift_client.models import SearchHit, SearchResponse


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
