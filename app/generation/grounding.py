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
- `stop_at`: stop sequences added to every generation (the end of the answer);
- `SpanCopy` (`copy_spans`): the hardest form of the passage bias: every token written continues a run of
  tokens copied from the passages (a phrase of them, as an extractive answer is), and the answer may end
  after any of them; for short answers, not for chat.

Every processor is made per call and keeps no state between its calls: no state crosses generations.
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


class SpanCopy:
    """Allows only the tokens that keep what was written a contiguous run of some passage's tokens, and the
    end tokens once a token was written; after an end token (a newline, say) only the end of sequence (a
    transformers LogitsProcessor).

    The first token may also be a word's form without its leading space (a reply opens without one), where the
    vocabulary has it. Stateless between calls: the run is found anew from each row's written tokens, so beam
    search's reordering of rows cannot confuse it."""

    def __init__(
        self,
        passages: Sequence[list[int]],
        twins: dict[int, int],
        ends: Sequence[int],
        eos: Sequence[int],
        prompt_len: int,
    ) -> None:
        self.tokens = [t for ids in passages for t in [*ids, -1]]  # -1 between passages: a run never crosses
        self.starts: dict[int, list[int]] = {}  # an opening token (or a spaceless twin) -> its positions
        for i, t in enumerate(self.tokens):
            if t >= 0:
                self.starts.setdefault(t, []).append(i)
                twin = twins.get(t)
                if twin is not None and twin != t:
                    self.starts.setdefault(twin, []).append(i)
        self.ends, self.eos = set(ends), list(eos)
        self.prompt_len = prompt_len

    def allowed(self, written: list[int]) -> list[int]:
        """The tokens that may follow `written` (this generation's tokens so far)."""
        if not written:
            return sorted(self.starts)
        if written[-1] in self.ends:
            return self.eos
        runs = self.starts.get(written[0], [])
        for step, token in enumerate(written[1:], start=1):
            runs = [i for i in runs if i + step < len(self.tokens) and self.tokens[i + step] == token]
        step = len(written)
        follow = {self.tokens[i + step] for i in runs if i + step < len(self.tokens) and self.tokens[i + step] >= 0}
        return sorted(follow | self.ends) if runs else self.eos

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        import torch

        for row in range(input_ids.shape[0]):
            keep = self.allowed(input_ids[row, self.prompt_len :].tolist()) or self.eos
            mask = torch.full_like(scores[row], float("-inf"))
            mask[torch.tensor(keep, dtype=torch.long, device=scores.device)] = 0.0
            scores[row] = scores[row] + mask
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
        self._twins: dict[int, int] | None = None  # made on first use (copy_spans only)
        # every vocabulary token whose text holds `[` (the start of a citation marker)
        self.brackets = (
            [i for i in range(len(tokenizer)) if "[" in tokenizer.decode([i])]
            if settings.block_citation_markers
            else []
        )
        ends = tokenizer.eos_token_id
        self.eos = [e for e in (ends if isinstance(ends, list) else [ends]) if e is not None]
        self.ends = self.eos + _ids(tokenizer, "\n")

    def twins(self) -> dict[int, int]:
        """Token -> the same text without its leading space, where the vocabulary has both (made once)."""
        if self._twins is None:
            vocab = self.tokenizer.get_vocab()
            marks = ("Ġ", "▁")
            self._twins = {i: vocab[t[1:]] for t, i in vocab.items() if t[:1] in marks and t[1:] in vocab}
        return self._twins

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
        if settings.copy_spans and passage_ids:
            processors.append(
                SpanCopy([_ids(tokenizer, text) for text in context], self.twins(), self.ends, self.eos, prompt_len)
            )
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
