"""Chunking by dual-encoder tokens: edge cases and the offsets invariant."""

from __future__ import annotations

import pytest

from indexer.chunking import Chunker
from indexer.config import ChunkingSettings
from indexer.models import Document


def chunk(tokenizer, text: str, window: int = 8, overlap: int = 2):
    doc = Document("d", "", text)
    return next(Chunker(tokenizer, ChunkingSettings(window=window, overlap=overlap)).chunk([doc]))[1]


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_empty_and_whitespace_text_give_no_passages(tokenizer):
    assert chunk(tokenizer, "") == []
    assert chunk(tokenizer, " \n\t ") == []


def test_one_token_document_stays_whole(tokenizer):
    [passage] = chunk(tokenizer, "  hello ")
    assert (passage.text, passage.start, passage.end, passage.id, passage.position) == ("hello", 2, 7, "d#0", 0)


def test_document_of_exactly_window_tokens_is_one_passage(tokenizer):
    text = "one two three four five six seven eight"
    assert n_tokens(tokenizer, text) == 8
    [passage] = chunk(tokenizer, text, window=8)
    assert passage.text == text


def test_one_token_over_window_makes_two_overlapping_passages(tokenizer):
    text = "one two three four five six seven eight nine"
    passages = chunk(tokenizer, text, window=8, overlap=2)
    assert [p.text for p in passages] == ["one two three four five six seven eight", "seven eight nine"]


def test_very_long_document_windows_cover_everything_with_overlap(tokenizer):
    words = [f"word{i}" for i in range(3000)]
    text = " ".join(words)
    passages = chunk(tokenizer, text, window=256, overlap=32)
    assert len(passages) > 10
    assert passages[0].start == 0 and passages[-1].end == len(text)
    for p in passages:
        assert text[p.start : p.end] == p.text
        assert n_tokens(tokenizer, p.text) <= 256
    for a, b in zip(passages, passages[1:]):
        assert a.start < b.start < a.end  # consecutive windows overlap
    assert [p.position for p in passages] == list(range(len(passages)))


def test_unicode_offsets_are_character_offsets(tokenizer):
    text = "Café naïve — 日本語のテキスト 😀 Ωmega " * 20
    passages = chunk(tokenizer, text, window=16, overlap=4)
    assert len(passages) > 1
    for p in passages:
        assert text[p.start : p.end] == p.text
        assert p.text == p.text.strip()


def test_default_window_keeps_short_documents_whole(tokenizer):
    doc = Document("x", "T", "A short abstract about vitamin D.")
    passages = next(Chunker(tokenizer).chunk([doc]))[1]
    assert len(passages) == 1 and passages[0].text == doc.text


def test_invalid_config_is_rejected():
    with pytest.raises(ValueError, match="overlap"):
        ChunkingSettings(window=8, overlap=8)
    with pytest.raises(ValueError, match="window"):
        ChunkingSettings(window=0, overlap=0)
