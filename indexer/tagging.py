"""Zero-shot tagging by prompt: a template and a verbalizer turn a language model into a classifier with no
training data (`LabelSet` in indexer/config.py).

    text ─► template(text) + prefix ─► model ─► log P(word) ─► − c · log P(word | empty text) ─► labels

- A causal LM (`CausalWordScorer`, SmolLM2 by default) reads the template as the user's turn of its chat
  template, then `prefix` as the start of its answer; a word is scored by the probability of its whole token
  sequence there (the first token from the prompt's last position, the rest in one extra pass over every word's
  tokens at once, each word attending to the prompt's cache and its own earlier tokens only).
- A fill-mask model (`MaskWordScorer`) reads `template`, `prefix` and its mask token; a word is scored by its
  first token in the mask.
- Two labels whose words score the same tokens (`WordScorer.word_key`) cannot be told apart: `Tagger.check`
  refuses such a set (a build's configuration), `Tagger.conflicts` names them (`/v1/classify` answers with a
  warning; the word counts for the label listed first).
- Calibration: the same prompt with an empty text gives each word's prior; subtracting `calibration` (c, the
  label set's strength, 1: all of it) times it removes the template's and the model's preference for some
  words over others (contextual calibration).
- A label's score is the mean probability ratio over its words (log-sum-exp minus log n); the label
  probabilities are their softmax. Ties go to the label listed first (deterministic).
- Prior (batch calibration): a set may carry each label's mean probability over unlabelled texts of the corpus
  (`LabelSet.prior`, measured by `Tagger.estimate_prior` or `sift eval classify`); the label scores (after the
  ensemble's mean) less `prior_strength` times its log stop a label the model favours for every text from
  winning everywhere.
- Prompt ensembling: a set may add prompts (`LabelSet.ensemble`, each with its own template, prefix, words and
  calibration); a label's score is then the mean of its scores under every prompt, at one model pass per prompt.

Invariants: `Tagger.probabilities` depends only on the texts, the label set and the model (no state but
the calibration cache, which is a pure function of those); batching and order do not change a text's scores
beyond the runtime's rounding (bfloat16 on a CPU with native support, `index.tagging.runtime`).
The build job (indexer/pipeline.py) and the server (`POST /v1/classify`) both call `Tagger`.
"""

from __future__ import annotations

import functools
import inspect
import logging
import random
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np

from indexer.config import TEXT_SLOT, IndexConfig, LabelSet, TaggingSettings
from indexer.encoders import pick_device, resolve_model_path
from indexer.lm import SMOLLM2, cached_smollm2, default_cache_dir
from indexer.sources import ReadReport

log = logging.getLogger(__name__)


_HEAD_MARK = "\x00sift-text\x00"  # stands for the passage when the prompt's head is cut off


class LabelSetError(ValueError):
    """A label set this model cannot score as given (e.g. two labels with words that score the same tokens)."""


class WordScorer(Protocol):
    """A language model with one slot where a word goes: the log-probabilities of words there, for prompts made
    from a label set's template and prefix."""

    name: str

    def word_logprobs(
        self, texts: Sequence[str], label_set: LabelSet, words: Sequence[str], progress: bool = False
    ) -> np.ndarray:
        """float32 [texts, words]: log P(word in the slot | the prompt around each text); `progress`: a bar
        with ETA over the texts."""
        ...

    def word_key(self, word: str) -> tuple[int, ...]:
        """The tokens a word is scored by when it fills the slot (two words with the same key score alike)."""
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

    def _batch(self, prompts: list[str], keys: list[tuple[int, ...]], head: str) -> np.ndarray:
        """float32 [prompts, words]: each key's log-probability in each prompt's slot; `head`: the text every
        prompt of the label set starts with (before the passage)."""
        raise NotImplementedError

    def _tokens(self, word: str) -> list[int]:
        # a word after a space: RoBERTa/GPT-style vocabularies mark it, WordPiece ignores it
        with self._lock:
            ids = self.tokenizer(" " + word.strip(), add_special_tokens=False)["input_ids"]
        if not ids:
            raise LabelSetError(f"the word {word!r} has no token in this model's vocabulary; choose another")
        return [int(i) for i in ids]

    def word_key(self, word: str) -> tuple[int, ...]:
        return tuple(self._tokens(word))

    def word_logprobs(
        self, texts: Sequence[str], label_set: LabelSet, words: Sequence[str], progress: bool = False
    ) -> np.ndarray:
        from tqdm.auto import tqdm

        keys = [self.word_key(w) for w in words]
        out = np.empty((len(texts), len(keys)), dtype=np.float32)
        with self._lock, tqdm(total=len(texts), desc="tag", unit="passage", disable=not progress) as bar:
            prompts = [self.prompt(self._cut(t) if t else t, label_set) for t in texts]
            head = self.prompt(_HEAD_MARK, label_set).partition(_HEAD_MARK)[0]
            # similar lengths batch together (less padding); results go back in input order
            order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                out[chunk] = self._batch([prompts[i] for i in chunk], keys, head)
                bar.update(len(chunk))
        return out


class CausalWordScorer(_HFScorer):
    """A causal LM: the slot is what follows `prefix`, at the start of the model's reply (chat template when
    the tokenizer has one, with `system` as the system turn, None: the template's default; else `template`
    and `prefix` on two lines). A word's score is the log-probability of all its tokens."""

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

    HEADS_KEPT = 8
    TREE_TOKENS = 256

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._heads: OrderedDict[tuple[int, ...], list[tuple[Any, Any]]] = OrderedDict()  # head -> its cache

    def _batch(self, prompts: list[str], keys: list[tuple[int, ...]], head: str) -> np.ndarray:
        import torch

        ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        # the head (chat turns, template before the passage; its last token dropped, as it may merge with the
        # passage's first) is read once per label set and its cache reused, when every prompt starts with its
        # tokens (else the whole prompts are read)
        head_ids = self.tokenizer(head, add_special_tokens=False)["input_ids"][:-1] if head else []
        h = (
            len(head_ids)
            if head_ids and all(len(x) > len(head_ids) and x[: len(head_ids)] == head_ids for x in ids)
            else 0
        )
        width = max(len(x) - h for x in ids)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        inputs = torch.tensor([[pad] * (width - len(x) + h) + x[h:] for x in ids], device=self.device)
        own = torch.tensor([[0] * (width - len(x) + h) + [1] * (len(x) - h) for x in ids], device=self.device)
        mask = torch.cat([torch.ones((len(ids), h), dtype=own.dtype, device=self.device), own], dim=1)
        lengths = mask.sum(-1)
        positions = h + (own.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens count on from the head
        cache = self._head_cache(tuple(head_ids), len(ids)) if h else None
        # every word's tokens but its last, in one sequence: (word, offset in the word) of each
        tree = [(w, j) for w, key in enumerate(keys) for j in range(len(key) - 1)]
        with torch.inference_mode():
            out = self.model(
                input_ids=inputs,
                attention_mask=mask,
                position_ids=positions,
                use_cache=bool(tree),
                logits_to_keep=1,  # only the slot's (the last position's) logits
                **_cache_kwarg(self.model, cache),
            )
            first = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)
            scores = first[:, [key[0] for key in keys]]
            if tree:
                cache = _cache_of(out)
                # at most TREE_TOKENS words' tokens per pass (memory: [tokens, vocabulary] logits per prompt),
                # each pass after the prompt's cache alone
                for chunk in _chunks(tree, self.TREE_TOKENS):
                    scores = scores + self._rest(cache, mask, lengths, keys, chunk)
                    cache.crop(-len(chunk))  # back to the prompt alone
            return scores.cpu().numpy()

    def _head_cache(self, head: tuple[int, ...], batch: int) -> Any:
        """A fresh cache holding the head's keys and values for `batch` prompts (the head is read once)."""
        import torch

        layers = self._heads.get(head)
        if layers is None:
            with torch.inference_mode():
                out = self.model(input_ids=torch.tensor([head], device=self.device), use_cache=True, logits_to_keep=1)
            layers = _layers_of(_cache_of(out))
            self._heads[head] = layers
            while len(self._heads) > self.HEADS_KEPT:
                self._heads.popitem(last=False)
        self._heads.move_to_end(head)
        return _cache_from([(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in layers])

    def _rest(self, cache: Any, mask: Any, lengths: Any, keys: list[tuple[int, ...]], tree: list) -> Any:
        """[prompts, words] log-probability of the `tree` tokens of each word (its tokens after the first): read
        as one sequence after the prompt's cache, each attending to the prompt and its own earlier tokens. The
        output head is applied as is (a model that post-processes its logits, e.g. soft-capping, would score
        these tokens unlike the first)."""
        import torch

        batch, n = mask.shape[0], len(tree)
        owner = torch.tensor([w for w, _ in tree], device=self.device)
        offset = torch.tensor([j for _, j in tree], device=self.device)
        inputs = torch.tensor([keys[w][j] for w, j in tree], device=self.device)
        targets = torch.tensor([keys[w][j + 1] for w, j in tree], device=self.device)
        own = (owner[:, None] == owner[None, :]) & (offset[None, :] <= offset[:, None])  # [n, n]
        attend = torch.cat([mask.bool()[:, None, :].expand(batch, n, -1), own.expand(batch, n, n)], dim=-1)
        dtype = next(self.model.parameters()).dtype
        additive = torch.zeros(attend.shape, dtype=dtype, device=self.device).masked_fill(
            ~attend, torch.finfo(dtype).min
        )
        hidden = self.model.base_model(
            input_ids=inputs.expand(batch, n),
            attention_mask=additive[:, None],  # additive: every attention implementation reads it alike
            position_ids=lengths[:, None] + offset[None, :],
            **_cache_kwarg(self.model.base_model, cache),
        ).last_hidden_state
        head = self.model.get_output_embeddings()
        rest = torch.zeros((batch, len(keys)), device=self.device)
        for row in range(batch):  # one prompt's logits at a time: [n, vocabulary] stays small
            logprobs = torch.log_softmax(head(hidden[row]).float(), dim=-1)
            picked = logprobs.gather(1, targets[:, None])[:, 0]
            rest[row].index_add_(0, owner, picked)
        return rest


def _cache_kwarg(model: Any, cache: Any) -> dict[str, Any]:
    """A model call's cache argument: `cache` in transformers 5, `past_key_values` before."""
    return {} if cache is None else {_cache_name(cast(Hashable, type(model))): cache}


@functools.cache
def _cache_name(model_class: Any) -> str:  # once per model class (holds the class, never a model)
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _chunks(tree: list[tuple[int, int]], size: int) -> list[list[tuple[int, int]]]:
    """`tree` cut into runs of at most `size` tokens, never splitting a word (a longer word is a run alone)."""
    words: dict[int, list[tuple[int, int]]] = {}
    for item in tree:
        words.setdefault(item[0], []).append(item)
    out: list[list[tuple[int, int]]] = [[]]
    for items in words.values():
        if out[-1] and len(out[-1]) + len(items) > size:
            out.append([])
        out[-1].extend(items)
    return out


def _layers_of(cache: Any) -> list[tuple[Any, Any]]:
    """Each layer's (keys, values) of a dynamic cache, in either transformers' layout."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [(k, v) for k, v in cache.to_legacy_cache()]


def _cache_from(layers: list[tuple[Any, Any]]) -> Any:
    from transformers import DynamicCache

    if hasattr(DynamicCache, "from_legacy_cache"):
        return DynamicCache.from_legacy_cache(tuple(layers))
    return DynamicCache(layers)


class MaskWordScorer(_HFScorer):
    """A fill-mask model: the slot is its mask token, right after `prefix`; a word is scored by its first token
    there."""

    def prompt(self, text: str, label_set: LabelSet) -> str:
        return f"{label_set.template.replace(TEXT_SLOT, text)}\n{label_set.prefix} {self.tokenizer.mask_token}."

    def word_key(self, word: str) -> tuple[int, ...]:
        return tuple(self._tokens(word)[:1])

    def slot_logprobs(self, texts: Sequence[str], label_set: LabelSet) -> np.ndarray:
        """float32 [texts, vocabulary]: log P(token in the mask | the prompt around each text)."""
        if not texts:
            return np.zeros((0, self.model.config.vocab_size), dtype=np.float32)
        with self._lock:
            prompts = [self.prompt(self._cut(t) if t else t, label_set) for t in texts]
            return np.concatenate(
                [self._slot(prompts[i : i + self.batch_size]) for i in range(0, len(prompts), self.batch_size)]
            )

    def _batch(self, prompts: list[str], keys: list[tuple[int, ...]], head: str) -> np.ndarray:
        return self._slot(prompts)[:, [key[0] for key in keys]]

    def _slot(self, prompts: list[str]) -> np.ndarray:
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
    says whether it is a masked LM (`*ForMaskedLM`) or a causal LM; on the CPU in bfloat16 where
    `settings.runtime` is torch-bf16 and the CPU computes it natively, else float32 (on CUDA: float16 for
    torch-bf16, float32 for torch)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    from indexer.runtime import MODEL_LOADS, resolve_runtime

    with MODEL_LOADS:
        if settings.model == SMOLLM2:
            path, name = str(cached_smollm2(settings.cache_dir or default_cache_dir())), "SmolLM2-135M-Instruct"
        else:
            path, name = resolve_model_path(settings.model), settings.model
        device = pick_device(settings.device)
        config = AutoConfig.from_pretrained(path)
        masked = any(a.endswith("ForMaskedLM") for a in (config.architectures or []))
        auto = AutoModelForMaskedLM if masked else AutoModelForCausalLM
        dtype = {"torch-fp16": torch.float16, "torch-bf16": torch.bfloat16}.get(
            resolve_runtime(settings.runtime, device), torch.float32
        )
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


@dataclass(frozen=True)
class Verbalizer:
    """A label set's words as the model scores them: `words` (distinct, in order) and, per label, the indices
    of its words there."""

    words: list[str]
    columns: dict[str, list[int]]


def softmax(scores: np.ndarray) -> np.ndarray:
    """[texts, labels] label probabilities from label scores (rows sum to 1)."""
    exp = np.exp(scores - scores.max(axis=1, keepdims=True))
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


PRIOR_FLOOR = 1e-6  # the smallest prior a label gets (a prior must be above 0)


def prior_vector(probabilities: np.ndarray) -> np.ndarray:
    """[labels] each label's mean over the rows of `probabilities` ([texts, labels], measured without a
    prior), floored at `PRIOR_FLOOR`: a prior in the labels' order."""
    return np.maximum(probabilities.mean(axis=0), PRIOR_FLOOR)


def prior_of(probabilities: np.ndarray, label_set: LabelSet) -> dict[str, float]:
    """A set's `prior` (`prior_vector`) from its label probabilities over unlabelled texts."""
    return {label: float(p) for label, p in zip(label_set.labels, prior_vector(probabilities), strict=True)}


class Tagger:
    """Zero-shot classification of texts with label sets, by one `WordScorer` (see the module docstring)."""

    def __init__(self, scorer: WordScorer) -> None:
        self.scorer = scorer
        # (template, prefix) -> word -> the empty text's score, most recently used prompt last (bounded: requests
        # bring their own prompts and words)
        self._calibration: OrderedDict[tuple[str, str], dict[str, float]] = OrderedDict()
        self._lock = threading.Lock()

    CALIBRATIONS_KEPT = 64  # prompts
    CALIBRATED_WORDS_KEPT = 4096  # words per prompt (requests bring their own)

    @classmethod
    def load(cls, settings: TaggingSettings) -> Tagger:
        return cls(load_scorer(settings))

    @property
    def name(self) -> str:
        return self.scorer.name

    def keys(self, label_set: LabelSet) -> dict[str, list[tuple[tuple[int, ...], str]]]:
        """Each label's (key, word) pairs, a word with the same key as an earlier one of the label dropped."""
        out: dict[str, list[tuple[tuple[int, ...], str]]] = {}
        for label, words in label_set.words().items():
            seen: dict[tuple[int, ...], str] = {}
            for word in words:
                seen.setdefault(self.scorer.word_key(word), word)
            out[label] = list(seen.items())
        return out

    def conflicts(
        self, label_set: LabelSet, keys: Mapping[str, list[tuple[tuple[int, ...], str]]] | None = None
    ) -> list[str]:
        """One message per pair of labels with words the model scores by the same tokens (they tie on them);
        for a set with an ensemble, each prompt's verbalizer is checked."""
        if keys is None and label_set.ensemble:
            return list(
                dict.fromkeys(
                    f"prompt {i + 1} of {len(label_set.ensemble) + 1}: {message}" if i else message
                    for i, part in enumerate(label_set.prompts())
                    for message in self.conflicts(part)
                )
            )
        owner: dict[tuple[int, ...], str] = {}
        found = []
        for label, pairs in (keys if keys is not None else self.keys(label_set)).items():
            for key, word in pairs:
                first = owner.setdefault(key, label)
                if first != label:
                    found.append(
                        f"labels {first!r} and {label!r} have words the model scores by the same tokens "
                        f"({word!r}); give them different verbalizer words"
                    )
        return list(dict.fromkeys(found))

    def verbalizer(self, label_set: LabelSet, strict: bool = True) -> Verbalizer:
        """The set's distinct words and each label's columns. `strict`: raise `LabelSetError` when two labels
        have words with the same key (`conflicts`); else such a word counts for the label listed first only
        (a later label keeps its other words, or ties on it when it has none)."""
        if label_set.ensemble:
            raise ValueError("a label set with an ensemble has one verbalizer per prompt: use prompts()")
        keys = self.keys(label_set)
        if strict:
            found = self.conflicts(label_set, keys)
            if found:
                raise LabelSetError(found[0])
        column: dict[tuple[int, ...], int] = {}
        owner: dict[tuple[int, ...], str] = {}
        words: list[str] = []
        columns: dict[str, list[int]] = {}
        for label, pairs in keys.items():
            for key, word in pairs:
                if key not in column:
                    column[key] = len(words)
                    words.append(word)
            own = [column[k] for k, _ in pairs if owner.setdefault(k, label) == label]
            columns[label] = own or [column[k] for k, _ in pairs]
        return Verbalizer(words, columns)

    def check(self, label_set: LabelSet) -> list[Verbalizer]:
        """Each prompt's verbalizer; raises `LabelSetError` when two labels' words score the same tokens."""
        return [self.verbalizer(part, strict=True) for part in label_set.prompts()]

    def calibration(self, label_set: LabelSet, words: Sequence[str]) -> np.ndarray:
        """The words' log-probabilities for the set's prompt around an empty text. Cached per prompt and word
        (a word's score does not depend on the words read beside it), so only words not seen with this prompt
        are read."""
        key = (label_set.template, label_set.prefix)
        with self._lock:  # only the words asked for are read (a prompt may keep thousands)
            kept = self._calibration.get(key, {})
            known = {w: kept[w] for w in words if w in kept}
            if key in self._calibration:
                self._calibration.move_to_end(key)
        missing = [w for w in dict.fromkeys(words) if w not in known]
        if missing:
            fresh = dict(zip(missing, self.scorer.word_logprobs([""], label_set, missing)[0].tolist()))
            known.update(fresh)
            with self._lock:
                kept = self._calibration.setdefault(key, {})
                if len(kept) + len(fresh) > self.CALIBRATED_WORDS_KEPT:
                    kept.clear()
                kept.update(fresh)
                self._calibration.move_to_end(key)
                while len(self._calibration) > self.CALIBRATIONS_KEPT:
                    self._calibration.popitem(last=False)
        return np.array([known[w] for w in words], dtype=np.float32)

    def calibrated(self, scores: np.ndarray, label_set: LabelSet, words: Sequence[str]) -> np.ndarray:
        """`word_logprobs` rows less the set's `calibration` strength times the empty text's."""
        return scores - label_set.calibration * self.calibration(label_set, words)[None, :]

    def label_scores(self, scores: np.ndarray, label_set: LabelSet, verbalizer: Verbalizer) -> np.ndarray:
        """[texts, labels] calibrated log scores from the verbalizer words' `word_logprobs` rows."""
        calibrated = self.calibrated(scores, label_set, verbalizer.words)
        columns = []
        for ids in verbalizer.columns.values():
            part = calibrated[:, ids]
            top = part.max(axis=1, keepdims=True)
            columns.append(top[:, 0] + np.log(np.exp(part - top).mean(axis=1)))  # log of the mean ratio
        return np.stack(columns, axis=1)

    def set_scores(
        self,
        label_set: LabelSet,
        raw: Callable[[int, LabelSet, Verbalizer], np.ndarray],
        strict: bool = False,
    ) -> np.ndarray:
        """[texts, labels] the set's calibrated label scores: the mean over its prompts (`LabelSet.prompts`) of
        each prompt's `label_scores`, its words' `word_logprobs` read by `raw(i, prompt, verbalizer)`, less
        `prior_strength` times the log of the set's `prior` when it has one."""
        parts = label_set.prompts()
        verbalizers = [self.verbalizer(p, strict) for p in parts]  # every prompt's errors before any model pass
        scored = [self.label_scores(raw(i, p, v), p, v) for i, (p, v) in enumerate(zip(parts, verbalizers))]
        mean = scored[0] if len(scored) == 1 else np.stack(scored).mean(axis=0, dtype=np.float32)
        if label_set.prior and label_set.prior_strength:
            if set(label_set.prior) != set(label_set.labels):  # a copy made without validation may reach here
                raise ValueError("prior must give every label of the set, and only those, a probability")
            prior = np.array([label_set.prior[label] for label in label_set.labels], dtype=np.float32)
            mean = mean - label_set.prior_strength * np.log(prior)[None, :]
        return mean

    def estimate_prior(self, texts: Sequence[str], label_set: LabelSet, progress: bool = False) -> dict[str, float]:
        """The set's `prior` measured on `texts` (unlabelled; a few hundred like those it will tag): each label's
        mean probability with the set's own prior left out. Raises `ValueError` without texts."""
        if not texts:
            raise ValueError("a prior needs texts to be measured on")
        return prior_of(
            self.probabilities(texts, label_set.model_copy(update={"prior": {}}), progress=progress), label_set
        )

    def probabilities(
        self, texts: Sequence[str], label_set: LabelSet, strict: bool = True, progress: bool = False
    ) -> np.ndarray:
        """[texts, labels] label probabilities (softmax of the calibrated scores; with an ensemble, of their
        mean over the prompts), labels in the set's order; `strict` as in `verbalizer`."""
        if not texts:
            for part in label_set.prompts():
                self.verbalizer(part, strict)  # the same errors as with texts
            return np.zeros((0, len(label_set.labels)), dtype=np.float32)
        scores = self.set_scores(
            label_set,
            lambda i, part, verbalizer: self.scorer.word_logprobs(texts, part, verbalizer.words, progress and i == 0),
            strict,
        )
        return softmax(scores)

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


def sample_passages(
    path: Path,
    config: IndexConfig,
    size: int,
    seed: int = 0,
    skip_bad: bool = False,
    progress: bool = False,
    report: ReadReport | None = None,
) -> list[str]:
    """Up to `size` of the corpus's passages at `path`, as a build chunks and tags them (`passage_index_text`:
    the title, then the passage), drawn uniformly by reservoir sampling with `seed`, in corpus order: the texts
    `Tagger.estimate_prior` measures a label set's prior on for that corpus (`sift index prior`). `report`
    counts the documents read and the bad records skipped (`skip_bad`)."""
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from indexer.chunking import Chunker
    from indexer.models import passage_index_text
    from indexer.sources import read_documents

    chunker = Chunker(AutoTokenizer.from_pretrained(resolve_model_path(config.dense.model)), config.chunking)
    rng = random.Random(seed)
    kept: list[tuple[int, str]] = []
    seen = 0
    documents = read_documents(path, skip_bad=skip_bad, csv_columns=config.csv, report=report)
    for document, passages in tqdm(chunker.chunk(documents), desc="read", unit="doc", disable=not progress):
        for passage in passages:
            text = passage_index_text(document.title, passage.text)
            if len(kept) < size:
                kept.append((seen, text))
            else:
                slot = rng.randrange(seen + 1)
                if slot < size:
                    kept[slot] = (seen, text)
            seen += 1
    return [text for _, text in sorted(kept)]
