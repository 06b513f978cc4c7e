"""Zero-shot tagging by prompt: a template and a verbalizer turn a language model into a classifier with no
training data (`LabelSet` in indexer/config.py).

    text ─► template(text) + prefix ─► model ─► log P(next word) ─► − log P(next word | empty text) ─► labels

- A causal LM (`CausalWordScorer`, SmolLM2 by default) reads the template as the user's turn of its chat
  template, then `prefix` as the start of its answer; the distribution of the next token is the slot.
  A fill-mask model (`MaskWordScorer`) reads `template`, `prefix` and its mask token; the mask is the slot.
- A word is scored by the log-probability of its first token in the slot, so labels whose words start with the
  same token tie on them: `Tagger.check` refuses such a set (a build's configuration), `Tagger.conflicts`
  names them (`/v1/classify` answers with a warning; the token counts for the label listed first).
- Calibration: the same prompt with an empty text gives each word's prior; subtracting it removes the
  template's and the model's preference for some words over others (contextual calibration).
- A label's score is the mean probability ratio over its words (log-sum-exp minus log n); the label
  probabilities are their softmax. Ties go to the label listed first (deterministic).

Invariants: `Tagger.probabilities` depends only on the texts, the label set and the model (no state but
the calibration cache, which is a pure function of those); batching and order do not change a text's scores.
The build job (indexer/pipeline.py) and the server (`POST /v1/classify`) both call `Tagger`.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from indexer.config import TEXT_SLOT, LabelSet, TaggingSettings
from indexer.encoders import pick_device, resolve_model_path
from indexer.lm import SMOLLM2, cached_smollm2, default_cache_dir

log = logging.getLogger(__name__)


class LabelSetError(ValueError):
    """A label set this model cannot score as given (e.g. two labels' words start with the same token)."""


class WordScorer(Protocol):
    """A language model with one slot where a word goes: the log-probabilities of every vocabulary token
    there, for prompts made from a label set's template and prefix."""

    name: str

    def slot_logprobs(self, texts: Sequence[str], label_set: LabelSet, progress: bool = False) -> np.ndarray:
        """float32 [texts, vocabulary]: log P(token in the slot | the prompt around each text); `progress`: a
        bar with ETA over the texts."""
        ...

    def word_token(self, word: str) -> int:
        """The token a word starts with when it fills the slot."""
        ...


class _HFScorer:
    """What both scorers share: a Hugging Face tokenizer and model, truncation, batching, one call at a time."""

    def __init__(self, model: Any, tokenizer: Any, name: str, device: str, max_tokens: int, batch_size: int) -> None:
        self.model, self.tokenizer, self.name, self.device = model, tokenizer, name, device
        self.max_tokens, self.batch_size = max_tokens, batch_size
        self._lock = threading.RLock()  # the model and the tokenizer (whose padding side a batch sets) alike

    def _cut(self, text: str) -> str:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= self.max_tokens else self.tokenizer.decode(ids[: self.max_tokens])

    def prompt(self, text: str, label_set: LabelSet) -> str:
        raise NotImplementedError

    def _batch(self, prompts: list[str]) -> np.ndarray:
        raise NotImplementedError

    def word_token(self, word: str) -> int:
        # a word after a space: RoBERTa/GPT-style vocabularies mark it, WordPiece ignores it
        with self._lock:
            ids = self.tokenizer(" " + word.strip(), add_special_tokens=False)["input_ids"]
        if not ids:
            raise LabelSetError(f"the word {word!r} has no token in this model's vocabulary; choose another")
        return int(ids[0])

    def slot_logprobs(self, texts: Sequence[str], label_set: LabelSet, progress: bool = False) -> np.ndarray:
        from tqdm.auto import tqdm

        out: np.ndarray | None = None
        with self._lock, tqdm(total=len(texts), desc="tag", unit="passage", disable=not progress) as bar:
            prompts = [self.prompt(self._cut(t) if t else t, label_set) for t in texts]
            # similar lengths batch together (less padding); results go back in input order
            order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                rows = self._batch([prompts[i] for i in chunk])
                if out is None:
                    out = np.empty((len(prompts), rows.shape[1]), dtype=np.float32)
                out[chunk] = rows
                bar.update(len(chunk))
        return out if out is not None else np.zeros((0, 0), dtype=np.float32)


class CausalWordScorer(_HFScorer):
    """A causal LM: the slot is the token after `prefix`, at the start of the model's reply (chat template when
    the tokenizer has one, with `system` as the system turn, None: the template's default; else `template`
    and `prefix` on two lines)."""

    system: str | None = None

    def prompt(self, text: str, label_set: LabelSet) -> str:
        user = label_set.template.replace(TEXT_SLOT, text)  # every `{text}`
        if getattr(self.tokenizer, "chat_template", None):
            system = [] if self.system is None else [{"role": "system", "content": self.system}]
            head = self.tokenizer.apply_chat_template(
                [*system, {"role": "user", "content": user}], add_generation_prompt=True, tokenize=False
            )
            return f"{head}{label_set.prefix}"
        return f"{user}\n{label_set.prefix}"

    def _batch(self, prompts: list[str]) -> np.ndarray:
        import torch

        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        mask = enc["attention_mask"].to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens count from 0
        with torch.inference_mode():
            logits = self.model(
                input_ids=enc["input_ids"].to(self.device),
                attention_mask=mask,
                position_ids=positions,
                logits_to_keep=1,  # only the slot's (the last position's) logits
            ).logits[:, -1, :]
            return torch.log_softmax(logits.float(), dim=-1).cpu().numpy()


class MaskWordScorer(_HFScorer):
    """A fill-mask model: the slot is its mask token, right after `prefix`."""

    def prompt(self, text: str, label_set: LabelSet) -> str:
        return f"{label_set.template.replace(TEXT_SLOT, text)}\n{label_set.prefix} {self.tokenizer.mask_token}."

    def _batch(self, prompts: list[str]) -> np.ndarray:
        import torch

        self.tokenizer.padding_side = "right"
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, truncation=True)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        masks = enc["input_ids"] == self.tokenizer.mask_token_id
        if not bool(masks.any(dim=1).all()):
            raise LabelSetError(
                "the prompt is longer than the model reads: shorten the template or index.tagging.max_tokens"
            )
        # the last mask of each prompt is the slot (a text may hold the mask token itself)
        last = masks.shape[1] - 1 - masks.flip(dims=[1]).int().argmax(dim=1)
        with torch.inference_mode():
            logits = self.model(**enc).logits
            slot = logits[torch.arange(len(prompts), device=logits.device), last, :]
            return torch.log_softmax(slot.float(), dim=-1).cpu().numpy()


def load_scorer(settings: TaggingSettings) -> WordScorer:
    """The configured model as a `WordScorer`: `smollm2` (cached fp32 copy), or a path / hub id whose config
    says whether it is a masked LM (`*ForMaskedLM`) or a causal LM."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    from indexer.runtime import MODEL_LOADS

    with MODEL_LOADS:
        if settings.model == SMOLLM2:
            path, name = str(cached_smollm2(settings.cache_dir or default_cache_dir())), "SmolLM2-135M-Instruct"
        else:
            path, name = resolve_model_path(settings.model), settings.model
        device = pick_device(settings.device)
        config = AutoConfig.from_pretrained(path)
        masked = any(a.endswith("ForMaskedLM") for a in (config.architectures or []))
        auto = AutoModelForMaskedLM if masked else AutoModelForCausalLM
        dtype = torch.float32 if device == "cpu" else torch.float16
        model = auto.from_pretrained(path, dtype=dtype).to(device).eval()  # type: ignore[arg-type]
        tokenizer = AutoTokenizer.from_pretrained(path)
    if masked:
        return MaskWordScorer(model, tokenizer, name, device, settings.max_tokens, settings.batch_size)
    scorer = CausalWordScorer(model, tokenizer, name, device, settings.max_tokens, settings.batch_size)
    scorer.system = settings.system
    return scorer


@dataclass(frozen=True)
class Classification:
    """One text's result: the best label (None below the set's `min_score`), its probability, and the
    probabilities of every label, best first."""

    label: str | None
    score: float
    scores: dict[str, float]


class Tagger:
    """Zero-shot classification of texts with label sets, by one `WordScorer` (see the module docstring)."""

    def __init__(self, scorer: WordScorer) -> None:
        self.scorer = scorer
        # (template, prefix) -> the empty text's slot, most recent last (bounded: requests bring their own prompts)
        self._calibration: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    CALIBRATIONS_KEPT = 64

    @classmethod
    def load(cls, settings: TaggingSettings) -> Tagger:
        return cls(load_scorer(settings))

    @property
    def name(self) -> str:
        return self.scorer.name

    def tokens(self, label_set: LabelSet) -> dict[str, list[int]]:
        """Each label's verbalizer tokens (duplicates within a label dropped)."""
        return {
            label: list(dict.fromkeys(self.scorer.word_token(w) for w in words))
            for label, words in label_set.words().items()
        }

    def conflicts(self, label_set: LabelSet, tokens: Mapping[str, list[int]] | None = None) -> list[str]:
        """One message per pair of labels whose words start with the same token (they tie on it); `tokens`:
        the set's, when the caller has them."""
        owner: dict[int, str] = {}
        found = []
        for label, ids in (tokens if tokens is not None else self.tokens(label_set)).items():
            for token in ids:
                first = owner.setdefault(token, label)
                if first != label:
                    found.append(
                        f"labels {first!r} and {label!r} have words that start with the same token; give them "
                        "verbalizer words that start differently"
                    )
        return list(dict.fromkeys(found))

    def check(self, label_set: LabelSet) -> dict[str, list[int]]:
        """The set's tokens; raises `LabelSetError` when two labels' words start with the same token (the
        model could not tell them apart)."""
        tokens = self.tokens(label_set)
        found = self.conflicts(label_set, tokens)
        if found:
            raise LabelSetError(found[0])
        return tokens

    def calibration(self, label_set: LabelSet) -> np.ndarray:
        """The slot's log-probabilities for the set's prompt around an empty text (cached per prompt)."""
        key = (label_set.template, label_set.prefix)
        with self._lock:
            cached = self._calibration.get(key)
            if cached is not None:
                self._calibration.move_to_end(key)
        if cached is None:
            cached = self.scorer.slot_logprobs([""], label_set)[0]
            with self._lock:
                self._calibration[key] = cached
                while len(self._calibration) > self.CALIBRATIONS_KEPT:
                    self._calibration.popitem(last=False)
        return cached

    def label_scores(self, slot: np.ndarray, label_set: LabelSet, tokens: Mapping[str, list[int]]) -> np.ndarray:
        """[texts, labels] calibrated log scores from slot log-probabilities (`slot_logprobs`' rows)."""
        calibrated = slot - self.calibration(label_set)[None, :]
        columns = []
        for ids in tokens.values():
            part = calibrated[:, ids]
            top = part.max(axis=1, keepdims=True)
            columns.append(top[:, 0] + np.log(np.exp(part - top).mean(axis=1)))  # log of the mean ratio
        return np.stack(columns, axis=1)

    def probabilities(
        self, texts: Sequence[str], label_set: LabelSet, strict: bool = True, progress: bool = False
    ) -> np.ndarray:
        """[texts, labels] label probabilities (softmax of the calibrated scores), labels in the set's order.
        `strict`: refuse a set whose labels share a first token (`check`); else such a token counts for the
        label listed first only (the later one keeps its other words, or ties on it when it has none)."""
        tokens = self.check(label_set) if strict else self.owned_tokens(label_set)
        if not texts:
            return np.zeros((0, len(tokens)), dtype=np.float32)
        scores = self.label_scores(self.scorer.slot_logprobs(texts, label_set, progress), label_set, tokens)
        scores = scores - scores.max(axis=1, keepdims=True)
        exp = np.exp(scores)
        return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)

    def owned_tokens(self, label_set: LabelSet) -> dict[str, list[int]]:
        """Each label's tokens, a token shared with a label listed earlier dropped (kept when it is all it has)."""
        owner: dict[int, str] = {}
        out = {}
        for label, ids in self.tokens(label_set).items():
            own = [t for t in ids if owner.setdefault(t, label) == label]
            out[label] = own or ids
        return out

    def classify(
        self, texts: Sequence[str], label_set: LabelSet, strict: bool = True, progress: bool = False
    ) -> list[Classification]:
        labels = list(label_set.labels)
        results = []
        for row in self.probabilities(texts, label_set, strict, progress):
            order = np.argsort(-row, kind="stable")  # ties: the label listed first
            best = int(order[0])
            scores = {labels[int(i)]: round(float(row[int(i)]), 4) for i in order}
            label = labels[best] if row[best] >= label_set.min_score else None
            results.append(Classification(label, round(float(row[best]), 4), scores))
        return results

    def tag(
        self, texts: Sequence[str], label_sets: Mapping[str, LabelSet], progress: bool = False
    ) -> list[dict[str, Any]]:
        """Passage metadata for each text: per label set, `field` = the label (absent below `min_score`) and
        `field_scores` = the `top_scores` best labels' probabilities."""
        tags: list[dict[str, Any]] = [{} for _ in texts]
        for label_set in label_sets.values():
            for tag, result in zip(tags, self.classify(texts, label_set, progress=progress)):
                if result.label is not None:
                    tag[label_set.field] = result.label
                tag[f"{label_set.field}_scores"] = dict(list(result.scores.items())[: label_set.top_scores])
        return tags
