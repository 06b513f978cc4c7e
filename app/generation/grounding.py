"""Grounded decoding for the local generator: logits processors, chosen by `generator.grounding`, that keep a
generated answer to the passages it was given.

- `PassageBias`: a logit bonus for every token that occurs in the passages (and for end of sequence), so the
  model prefers copying from its context to inventing;
- no repeated n-grams: transformers' own `no_repeat_ngram_size`;
- `NGramBlock`: never completes an n-gram of the prompt's instructions that the passages do not contain (a small
  model otherwise echoes "Answer with a short phrase…");
- `NGramBlock` again for the question's n-grams (in either tokenization), so a short answer gives the answer
  instead of restating the question;
- citation markers suppressed (`[`-bearing tokens), for short answers scored as text;
- `stop_at`: stop sequences added to every generation (the end of the answer).

Everything here is per call and read-only after construction: no state crosses generations.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from app.settings import GroundingSettings

if TYPE_CHECKING:
    import torch

Message = dict[str, str]


def _ids(tokenizer: Any, text: str) -> list[int]:  # a Hugging Face tokenizer
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class PassageBias:
    """Adds `bias` to the logits of the tokens in `allowed` (a transformers LogitsProcessor)."""

    def __init__(self, allowed: Sequence[int], bias: float) -> None:
        import torch

        self.allowed = torch.tensor(sorted(set(allowed)), dtype=torch.long)
        self.bias = bias

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, self.allowed.to(scores.device)] += self.bias
        return scores


class NGramBlock:
    """Bans the token that would complete any of `ngrams` given the last n-1 generated tokens (tokens of the
    prompt do not count: only what the model writes is checked)."""

    def __init__(self, ngrams: set[tuple[int, ...]], prompt_len: int) -> None:
        self.prompt_len = prompt_len
        self.size = len(next(iter(ngrams))) if ngrams else 0
        self.next_of: dict[tuple[int, ...], set[int]] = {}
        for gram in ngrams:
            self.next_of.setdefault(gram[:-1], set()).add(gram[-1])

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if not self.size:
            return scores
        for row in range(input_ids.shape[0]):
            written = input_ids[row, self.prompt_len :].tolist()
            if len(written) < self.size - 1:
                continue
            banned = self.next_of.get(tuple(written[len(written) - self.size + 1 :]))
            if banned:
                scores[row, list(banned)] = float("-inf")
        return scores


def _variants(tokenizer: Any, text: str) -> list[list[int]]:
    """`text`'s tokens as they open a reply and as they follow a space (BPE vocabularies tell them apart)."""
    return [_ids(tokenizer, text), _ids(tokenizer, " " + text)]


def _ngrams(ids: list[int], n: int) -> set[tuple[int, ...]]:
    return {tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)}


class Grounding:
    """The grounding of one generator: its settings and tokenizer, and the token lists made from them once."""

    def __init__(self, settings: GroundingSettings, tokenizer: Any) -> None:  # a Hugging Face tokenizer
        self.settings = settings
        self.tokenizer = tokenizer
        # every vocabulary token whose text holds `[` (the start of a citation marker)
        self.brackets = (
            [i for i in range(len(tokenizer)) if "[" in tokenizer.decode([i])]
            if settings.block_citation_markers
            else []
        )
        ends = tokenizer.eos_token_id
        self.ends = [e for e in (ends if isinstance(ends, list) else [ends]) if e is not None] + _ids(tokenizer, "\n")

    def kwargs(
        self, messages: list[Message], context: Sequence[str], prompt_len: int, avoid: Sequence[str] = ()
    ) -> dict[str, Any]:
        """Extra `model.generate` keyword arguments for one generation: `logits_processor`,
        `no_repeat_ngram_size` and `suppress_tokens` as the settings ask (nothing when they ask for nothing).
        `context` holds the passage texts the answer should keep to; without any, the passage bias and the
        instruction block do not apply."""
        from transformers import LogitsProcessorList

        settings, tokenizer = self.settings, self.tokenizer
        processors: list[Any] = []
        out: dict[str, Any] = {}
        passage_ids = [i for text in context for i in _ids(tokenizer, text)]
        if settings.passage_bias and passage_ids:
            processors.append(PassageBias(passage_ids + self.ends, settings.passage_bias))
        n = settings.block_instruction_ngrams
        if n and passage_ids:
            instructions = "\n".join(m["content"] for m in messages if m["role"] in ("system", "developer"))
            banned = _ngrams(_ids(tokenizer, instructions), n) - _ngrams(passage_ids, n)
            if banned:
                processors.append(NGramBlock(banned, prompt_len))
        q = settings.block_question_ngrams
        if q and avoid:
            restated = set().union(*(_ngrams(ids, q) for text in avoid for ids in _variants(tokenizer, text)))
            if restated:
                processors.append(NGramBlock(restated, prompt_len))
        if processors:
            out["logits_processor"] = LogitsProcessorList(processors)
        if settings.no_repeat_ngram:
            out["no_repeat_ngram_size"] = settings.no_repeat_ngram
        if self.brackets:
            out["suppress_tokens"] = self.brackets
        return out
