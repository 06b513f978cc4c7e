"""Split documents into passages by tokens of the dual-encoder's tokenizer.

A document of at most `window` tokens stays whole; a longer one becomes windows of `window` tokens that
overlap by `overlap` tokens. Each passage keeps its character offsets into the document text, so the
text of a passage is always `document.text[start:end]`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Protocol

from indexer.config import ChunkingSettings
from indexer.models import Document, Passage, passage_id


class OffsetTokenizer(Protocol):
    """What the chunker needs from a tokenizer: a Hugging Face *fast* tokenizer satisfies it."""

    def __call__(self, text: list[str], **kwargs: Any) -> Mapping[str, Any]:
        """Encodings with `offset_mapping` (with `return_offsets_mapping=True`): (start, end) per token."""
        ...


class Chunker:
    """Cuts `Document`s into `Passage`s with a tokenizer that reports character offsets."""

    def __init__(self, tokenizer: OffsetTokenizer, config: ChunkingSettings | None = None) -> None:
        self.tokenizer = tokenizer
        self.config = config or ChunkingSettings()

    def spans(self, texts: list[str]) -> list[list[tuple[int, int]]]:
        """Character spans of each window for each text (empty text → no spans)."""
        encoded = self.tokenizer(
            texts, add_special_tokens=False, return_offsets_mapping=True, truncation=False, verbose=False
        )
        result = []
        for text, offsets in zip(texts, encoded["offset_mapping"]):
            offsets = [(s, e) for s, e in offsets if e > s]
            result.append(self._windows(text, offsets))
        return result

    def _windows(self, text: str, offsets: list[tuple[int, int]]) -> list[tuple[int, int]]:
        if not offsets:
            stripped = text.strip()
            if not stripped:
                return []
            start = text.index(stripped[0])
            return [(start, start + len(stripped))]
        window, step = self.config.window, self.config.window - self.config.overlap
        if len(offsets) <= window:
            return [(offsets[0][0], offsets[-1][1])]
        spans = []
        for first in range(0, len(offsets), step):
            last = min(first + window, len(offsets)) - 1
            spans.append((offsets[first][0], offsets[last][1]))
            if last == len(offsets) - 1:
                break
        return spans

    def chunk(self, documents: Iterable[Document], batch_size: int = 256) -> Iterator[tuple[Document, list[Passage]]]:
        """Yield each document with its passages, tokenising in batches for speed."""
        batch: list[Document] = []
        for document in documents:
            batch.append(document)
            if len(batch) >= batch_size:
                yield from self._chunk_batch(batch)
                batch = []
        if batch:
            yield from self._chunk_batch(batch)

    def _chunk_batch(self, batch: list[Document]) -> Iterator[tuple[Document, list[Passage]]]:
        for document, spans in zip(batch, self.spans([d.text for d in batch])):
            passages = [
                Passage(passage_id(document.id, i), document.id, i, document.text[s:e], s, e)
                for i, (s, e) in enumerate(spans)
            ]
            yield document, passages
