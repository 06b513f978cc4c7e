"""`sift reader train`: fine-tune a span-extraction head (start/end token logits) on a local encoder.

Data: SQuAD-format files. For SQuAD v1.1 dev only articles 0–23 may be used (24–47 are the held-out
evaluation articles of `sift eval qa`; asking for them is refused). A fixed share of the *paragraphs* is held
out for validation (so no validation question shares its paragraph with a training question); EM/F1 on them
(official normalisation) is measured every `validate_every` steps and the best model is kept. Long passages
are read in overlapping windows (`stride`); a window that does not contain the answer is trained to point at
[CLS]. Checkpoints every `checkpoint_every` steps make a rerun resume. The saved model is fp16 by default and
carries `calibration.json` (Platt scaling of the span score against exact match on validation).
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from app.eval.qa import EVAL_ARTICLES, exact_match, f1
from app.training.common import set_seed

if TYPE_CHECKING:
    from app.generation.reader import ExtractiveReader

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QAExample:
    id: str
    question: str
    context: str
    answers: tuple[str, ...]
    answer_start: int  # character offset of the first answer in `context`
    paragraph: str


def load_examples(path: Path, articles: Sequence[int]) -> list[QAExample]:
    """Questions of the given articles; SQuAD v1.1 dev's evaluation articles are refused."""
    path = Path(path)
    if path.name == "dev-v1.1.json" and set(articles) & set(EVAL_ARTICLES):
        raise ValueError("SQuAD v1.1 dev articles 24–47 are held out for evaluation; train on articles 0–23 only")
    data = json.loads(path.read_text(encoding="utf-8"))["data"]
    out = []
    for a in articles:
        if a >= len(data):
            raise ValueError(f"{path} has {len(data)} articles; article {a} does not exist")
        for p, paragraph in enumerate(data[a]["paragraphs"]):
            for qa in paragraph["qas"]:
                if not qa["answers"]:
                    continue
                first = qa["answers"][0]
                answers = tuple(dict.fromkeys(x["text"] for x in qa["answers"]))
                out.append(
                    QAExample(
                        qa["id"], qa["question"], paragraph["context"], answers, first["answer_start"], f"a{a}-p{p}"
                    )
                )
    return out


def split_by_paragraph(
    examples: Sequence[QAExample], share: float, seed: int
) -> tuple[list[QAExample], list[QAExample]]:
    paragraphs = sorted({e.paragraph for e in examples})
    random.Random(seed).shuffle(paragraphs)
    held = set(paragraphs[: max(1, round(len(paragraphs) * share))]) if share > 0 else set()
    return [e for e in examples if e.paragraph not in held], [e for e in examples if e.paragraph in held]


@dataclass
class ReaderTrainConfig:
    base: str = "sentence-transformers/all-MiniLM-L6-v2"
    out: Path = Path("models/reader")
    max_length: int = 384
    stride: int = 128
    max_answer_tokens: int = 30
    epochs: int = 2
    batch_size: int = 16
    lr: float = 5e-5
    warmup: float = 0.1
    weight_decay: float = 0.01
    seed: int = 13
    validation: float = 0.05
    validate_every: int = 0  # steps; 0 = after each epoch
    checkpoint_every: int = 200
    max_steps: int | None = None
    device: str | None = None
    fp16: bool = True
    max_seconds: float | None = None  # time budget: stop (validating and keeping the best) once spent


def training_features(tokenizer: Any, examples: Sequence[QAExample], max_length: int, stride: int) -> dict[str, Any]:
    """Windows with start/end token labels ([CLS] = 0 when the answer is not inside the window)."""
    from app.generation.reader import features

    enc, offsets = features(
        tokenizer, [e.question for e in examples], [e.context for e in examples], max_length, stride
    )
    starts, ends = [], []
    for w, owner in enumerate(enc["overflow_to_sample_mapping"]):
        example = examples[int(owner)]
        a_start = example.answer_start
        a_end = a_start + len(example.answers[0])
        s = e = 0
        window = [(t, o) for t, o in enumerate(offsets[w]) if o is not None]
        if window and window[0][1][0] <= a_start and window[-1][1][1] >= a_end:
            s = next(t for t, o in window if o[0] <= a_start < o[1] or o[0] >= a_start)
            e = next(t for t, o in reversed(window) if o[0] < a_end <= o[1] or o[1] <= a_end)
            if e < s:
                s = e = 0
        starts.append(s)
        ends.append(e)
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in enc]
    out = {n: enc[n] for n in names}
    out["start_positions"] = np.asarray(starts)
    out["end_positions"] = np.asarray(ends)
    return out


def evaluate_reader(reader: ExtractiveReader, examples: Sequence[QAExample]) -> tuple[dict[str, float], list[Any]]:
    """EM/F1 (×100) of the reader with each question's own paragraph, and the predicted spans."""
    spans = []
    for i in range(0, len(examples), 32):
        chunk = examples[i : i + 32]
        spans += reader.read_many([e.question for e in chunk], [[e.context] for e in chunk])
    preds = [s.text if s else "" for s in spans]
    em = [exact_match(p, e.answers) for p, e in zip(preds, examples)]
    f = [f1(p, e.answers) for p, e in zip(preds, examples)]
    return {"em": 100 * float(np.mean(em)), "f1": 100 * float(np.mean(f)), "questions": len(examples)}, spans


def train(
    examples: list[QAExample],
    config: ReaderTrainConfig,
    progress: bool = True,
    validation: list[QAExample] | None = None,
) -> dict:
    """Fine-tune and save the best model (by validation F1) to `config.out`. Returns the training state."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer, get_linear_schedule_with_warmup

    from app.generation.reader import CALIBRATION_FILE, Calibration, ExtractiveReader
    from indexer.encoders import pick_device, resolve_model_path

    set_seed(config.seed)
    device = pick_device(config.device)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if validation is None:
        examples, validation = split_by_paragraph(examples, config.validation, config.seed)
    base = resolve_model_path(config.base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    # num_labels=2: a start and an end logit (a cross-encoder checkpoint says 1)
    model = AutoModelForQuestionAnswering.from_pretrained(base, num_labels=2).float().to(device)
    feats = training_features(tokenizer, examples, config.max_length, config.stride)
    n = len(feats["input_ids"])
    steps_per_epoch = math.ceil(n / config.batch_size)
    total = steps_per_epoch * config.epochs
    if config.max_steps:
        total = min(total, config.max_steps)
    no_decay = ("bias", "LayerNorm.weight", "layer_norm")
    params = [
        {
            "params": [p for name, p in model.named_parameters() if not any(x in name for x in no_decay)],
            "weight_decay": config.weight_decay,
        },
        {
            "params": [p for name, p in model.named_parameters() if any(x in name for x in no_decay)],
            "weight_decay": 0.0,
        },
    ]
    optimizer = torch.optim.AdamW(params, lr=config.lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(total * config.warmup), total)
    state: dict[str, Any] = {
        "step": 0,
        "best_f1": -1.0,
        "history": [],
        "seconds": 0.0,
        "config": _jsonable(config),
        "train_questions": len(examples),
        "train_windows": n,
        "validation_questions": len(validation),
    }
    ckpt = out / "checkpoint"
    if (ckpt / "state.json").is_file():
        saved = torch.load(ckpt / "trainer.pt", map_location=device, weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = json.loads((ckpt / "state.json").read_text())
        log.warning("resuming from step %d", state["step"])
    reader = ExtractiveReader(model, tokenizer, config.max_length, config.stride, config.max_answer_tokens)
    use_bf16 = device.startswith("cuda")
    started = time.perf_counter() - state["seconds"]
    order_rng = np.random.default_rng(config.seed)
    orders = [order_rng.permutation(n) for _ in range(config.epochs)]
    bar = tqdm(total=total, initial=state["step"], desc="reader train", disable=not progress, unit="step")

    def validate() -> None:
        model.eval()
        scores, spans = evaluate_reader(reader, validation)
        model.train()
        entry = {"step": state["step"], **scores, "loss": state.get("last_loss")}
        state["history"].append(entry)
        log.warning("validation %s", json.dumps(entry))
        bar.write(f"step {state['step']}: validation EM {scores['em']:.1f} F1 {scores['f1']:.1f}")
        if scores["f1"] > state["best_f1"]:
            state["best_f1"] = scores["f1"]
            correct = [exact_match(s.text if s else "", e.answers) for s, e in zip(spans, validation)]
            calib = Calibration.fit([s.score if s else -50.0 for s in spans], correct)
            _save_model(model, tokenizer, out, config.fp16)
            (out / CALIBRATION_FILE).write_text(json.dumps(asdict(calib)))
            state["best"] = entry

    model.train()
    losses: list[float] = []
    while state["step"] < total:
        epoch, pos = divmod(state["step"], steps_per_epoch)
        idx = orders[epoch][pos * config.batch_size : (pos + 1) * config.batch_size]
        batch = {k: torch.as_tensor(v[idx], device=device) for k, v in feats.items()}
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        losses.append(float(loss.detach()))
        state["last_loss"] = float(np.mean(losses[-50:]))
        bar.update(1)
        bar.set_postfix(loss=f"{state['last_loss']:.3f}")
        if config.max_seconds and time.perf_counter() - started > config.max_seconds:
            state["stopped"] = f"time budget of {config.max_seconds:.0f} s spent at step {state['step']}"
            total = state["step"]
        end_of_epoch = state["step"] % steps_per_epoch == 0 or state["step"] == total
        if (
            (config.validate_every and state["step"] % config.validate_every == 0)
            or (not config.validate_every and end_of_epoch)
            or state["step"] == total
        ):
            if not state["history"] or state["history"][-1]["step"] != state["step"]:
                validate()
        if config.checkpoint_every and state["step"] % config.checkpoint_every == 0 and state["step"] < total:
            state["seconds"] = time.perf_counter() - started
            ckpt.mkdir(exist_ok=True)
            torch.save(
                {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                ckpt / "trainer.pt",
            )
            (ckpt / "state.json").write_text(json.dumps(state))
    bar.close()
    state["seconds"] = time.perf_counter() - started
    (out / "training_log.json").write_text(json.dumps(state, indent=1))
    shutil.rmtree(ckpt, ignore_errors=True)
    return state


def _save_model(model: Any, tokenizer: Any, out: Path, fp16: bool) -> None:  # a transformers QA model, its tokenizer
    import copy

    import torch

    to_save = copy.deepcopy(model).to("cpu")
    if fp16:
        to_save = to_save.to(torch.float16)
    to_save.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _jsonable(config: ReaderTrainConfig) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}
