"""`sift encoder train`: adapt the bi-encoder to a corpus without labels (in the spirit of GPL), optionally
with labelled pairs beside.

Data. Training groups (a query, one positive passage, negatives; `app.training.reranker.Group`) come from
- label-free pseudo-queries cut from the corpus itself (`pseudo_query_groups`: one sentence of a passage is
  the query, the rest of the passage the positive; the rule `app.eval.pseudo` validates with);
- BEIR train qrels (`--beir`) and SQuAD questions of the allowed articles (`--squad`), when given.
Negatives are mined over the corpus by BM25 and by the base bi-encoder (ranks 3–30, never the positive).

Teacher. Sift's own second stage scores every (query, text) pair of every group once, before training
(`app.training.teacher.Teacher`): the cross-encoder's logits (`reranker.model` at `reranker.max_length`) and
MaxSim over the base bi-encoder's token vectors, each z-normalised over all the pairs, fused with
`reranker.weights`. The positive's teacher margin over each negative, put on the student's cosine scale (times
the spread of the base model's cosines over the same pairs), is the target of a Margin-MSE term.

Loss. Contrastive (in-batch and mined negatives, cosine × `scale`, cross-entropy towards the positive) plus
`margin_weight` × Margin-MSE on the teacher's margins. A mined negative the teacher ranks above the positive
is left out of the contrastive term (a likely unjudged positive); the margin term still uses it.

Control. A fixed share of the pseudo-query groups is held out; every `validate_every` steps (and at the end of
each epoch) the student ranks a pool of passages (every held-out positive and negative, plus random corpus
passages up to `validation_pool`) for each held-out query, and MRR@10 of its positive decides which model is
kept (step 0, the base model, included: a run that does not help keeps the base). Checkpoints every
`checkpoint_every` steps resume an interrupted run (`resume`); the groups and teacher scores are written
once beside them. `max_seconds` stops a run early, keeping the best model so far.

Invariants: the saved folder is a complete sentence-transformers model (its `max_seq_length` that of the
base); `training_log.json` beside it records the data, the teacher, the history and the throughput.
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

from app.training.common import Group, Scored, epoch_batches, pairs_of, set_seed
from app.training.reranker import _save_checkpoint
from app.training.teacher import Teacher, margins_on_scale

if TYPE_CHECKING:
    import torch
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)


@dataclass
class EncoderTrainConfig:
    """How `train_encoder` runs (the CLI's options; defaults are the recipe the README measures)."""

    base: str = "sentence-transformers/all-MiniLM-L6-v2"
    out: Path = Path("models/encoder")
    max_length: int = 256  # passage tokens (the build's dual-encoder window)
    query_length: int = 64
    epochs: int = 1
    batch_size: int = 16  # groups per step (each contributes its query, positive and negatives)
    negatives: int = 2  # mined negatives per group used in a step
    lr: float = 2e-5
    warmup: float = 0.1
    scale: float = 20.0  # cosine → logit scale of the contrastive and margin terms
    margin_weight: float = 1.0  # weight of the teacher's Margin-MSE term (0: contrastive only)
    seed: int = 13
    validation: float = 0.05  # share of the pseudo-query groups held out
    validation_pool: int = 1000  # passages each held-out query is ranked among
    validate_every: int = 0  # steps between validations (0: once per epoch)
    checkpoint_every: int = 50
    max_seconds: float | None = None
    device: str | None = None
    resume: bool = True


def score_groups(
    groups: Sequence[Group], teacher: Teacher | None, encoder: SentenceTransformer, progress: bool = True
) -> list[Scored]:
    """Each group with the teacher's margins put on `encoder`'s cosine scale (`margins_on_scale`: z-units times
    the spread of the base model's cosines over the same pairs)."""
    if teacher is None:
        return [Scored(g, []) for g in groups]
    pairs = pairs_of(groups)
    fused = teacher.scores(pairs, progress)
    queries = encoder.encode([g.query for g in groups], batch_size=64, normalize_embeddings=True)
    texts = encoder.encode([t for _, t in pairs], batch_size=32, normalize_embeddings=True, show_progress_bar=progress)
    cosines, offset = [], 0
    for i, g in enumerate(groups):
        n = 1 + len(g.negatives)
        cosines.append(texts[offset : offset + n] @ queries[i])
        offset += n
    return margins_on_scale(groups, fused, np.concatenate(cosines))


def validation_pool(held_out: Sequence[Group], corpus: Sequence[str], size: int, rng: random.Random) -> list[str]:
    """Texts each held-out query is ranked among: every held-out positive and negative, then random corpus
    texts up to `size` (fewer when the corpus is smaller); deduplicated, in a fixed order. A corpus text that
    contains a held-out query is left out: it is the document the query was cut from, intact, and would
    outrank the positive (the same document without the sentence) by an exact copy."""
    pool = list(dict.fromkeys(t for g in held_out for t in [g.positive, *g.negatives]))
    seen = set(pool)
    queries = [g.query for g in held_out]
    extra = [t for t in corpus if t not in seen and not any(q in t for q in queries)]
    rng.shuffle(extra)
    return pool + extra[: max(0, size - len(pool))]


def validate(encoder: SentenceTransformer, held_out: Sequence[Group], pool: Sequence[str]) -> dict[str, float]:
    """MRR@10 and Recall@10 of each held-out query's positive among `pool`, ranked by cosine."""
    passages = encoder.encode(list(pool), batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
    queries = encoder.encode([g.query for g in held_out], batch_size=64, normalize_embeddings=True)
    where = {t: i for i, t in enumerate(pool)}
    rr, hits = [], []
    for q, g in zip(queries, held_out):
        scores = passages @ q
        target = scores[where[g.positive]]
        rank = int((scores > target).sum())  # ties count in the positive's favour
        rr.append(1.0 / (rank + 1) if rank < 10 else 0.0)
        hits.append(1.0 if rank < 10 else 0.0)
    return {"mrr@10": float(np.mean(rr)), "recall@10": float(np.mean(hits))}


def split_validation(groups: list[Group], share: float, rng: random.Random) -> tuple[list[Group], list[Group]]:
    """(held out, rest): `share` of the pseudo-query groups (of all groups when there are none), at least one
    when `share` > 0; the held-out queries' positives leave the training groups too."""
    candidates = [i for i, g in enumerate(groups) if g.source == "pseudo"] or list(range(len(groups)))
    if share <= 0 or len(candidates) < 2:
        return [], groups
    picked = set(rng.sample(candidates, max(1, int(len(candidates) * share))))
    held = [groups[i] for i in sorted(picked)]
    positives = {g.positive for g in held}
    return held, [g for i, g in enumerate(groups) if i not in picked and g.positive not in positives]


def train_encoder(
    groups: Sequence[Scored],
    config: EncoderTrainConfig,
    corpus: Sequence[str] = (),
    teacher: dict[str, Any] | None = None,
    progress: bool = True,
    sources: dict[str, Any] | None = None,
    model: SentenceTransformer | None = None,
) -> dict[str, Any]:
    """Fine-tune `config.base` on `groups` (scored by `score_groups`; `teacher`: its description, for the log)
    and save the best model (by held-out MRR@10) to `config.out`; returns the training log (also written to
    `training_log.json` there). `corpus`: texts the validation pool draws random passages from; `model`: `config.base`
    already loaded (the one that mined and scored the groups; trained in place), else it is loaded here."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    from indexer.encoders import load_encoder

    set_seed(config.seed)
    rng = random.Random(config.seed)
    out = Path(config.out)
    checkpoint = out / "checkpoint"
    model = model if model is not None else load_encoder(config.base, config.device)
    model.max_seq_length = config.max_length
    model.float()
    device = model.device
    data_file = checkpoint / "data.json"
    if config.resume and data_file.exists():
        data = json.loads(data_file.read_text())
        held = [Group(**g) for g in data["held_out"]]
        scored = [Scored(Group(**s["group"]), s["margins"]) for s in data["train"]]
        pool = data["pool"]
        log.warning("resuming with the %d groups and teacher margins of %s", len(scored), data_file)
    else:
        usable = [s for s in groups if s.group.negatives]
        held_groups, rest = split_validation([s.group for s in usable], config.validation, rng)
        kept = {id(g) for g in rest}
        held, scored = held_groups, [s for s in usable if id(s.group) in kept]
        pool = validation_pool(held, corpus, config.validation_pool, rng) if held else []
        checkpoint.mkdir(parents=True, exist_ok=True)
        tmp = data_file.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "held_out": [asdict(g) for g in held],
                    "train": [{"group": asdict(s.group), "margins": s.margins} for s in scored],
                    "pool": pool,
                }
            )
        )
        tmp.replace(data_file)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    steps_per_epoch = math.ceil(len(scored) / config.batch_size)
    total = steps_per_epoch * config.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(config.warmup * total), total)
    state: dict[str, Any] = {"step": 0, "history": [], "best": -1.0, "best_step": None, "pairs": 0, "train_s": 0.0}
    if config.resume and (checkpoint / "state.json").exists():
        state = json.loads((checkpoint / "state.json").read_text())
        model.load_state_dict(torch.load(checkpoint / "network.pt", map_location=device))
        optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", map_location=device))
        scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", map_location=device))
        log.warning("resumed from step %d", state["step"])
    if held and state["step"] == 0 and not state["history"]:
        _validate_and_keep_best(model, held, pool, state, 0, out)
    started = time.perf_counter()
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=state["step"], desc="train encoder", unit="step", disable=not progress)
    for epoch in range(config.epochs):
        for step_in_epoch, batch in enumerate(epoch_batches(scored, config.batch_size, config.seed, epoch)):
            global_step = epoch * steps_per_epoch + step_in_epoch
            if global_step < state["step"]:
                continue
            tick = time.perf_counter()
            model.train()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=str(device).startswith("cuda")):
                loss, parts, pairs = _loss(model, batch, config)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            state["train_s"] += time.perf_counter() - tick
            state["pairs"] += pairs
            state["step"] = global_step + 1
            state.setdefault("losses", []).append(parts)
            bar.update(1)
            recent = state["losses"][-20:]
            bar.set_postfix(
                contrastive=f"{np.mean([p[0] for p in recent]):.3f}",
                margin=f"{np.mean([p[1] for p in recent]):.4f}",
                pairs_s=f"{state['pairs'] / max(state['train_s'], 1e-9):.1f}",
            )
            if held and config.validate_every and state["step"] % config.validate_every == 0:
                _validate_and_keep_best(model, held, pool, state, epoch + 1, out)
            if config.checkpoint_every and state["step"] % config.checkpoint_every == 0:
                _save_checkpoint(checkpoint, model, optimizer, scheduler, state)
            if config.max_seconds and time.perf_counter() - started > config.max_seconds:
                state["stopped"] = f"time budget of {config.max_seconds:.0f} s spent at step {state['step']}"
                break
        if held:
            if state["history"][-1]["step"] != state["step"]:
                _validate_and_keep_best(model, held, pool, state, epoch + 1, out)
        else:
            _save(model, out)
        if "stopped" in state:
            break
    bar.close()
    state["seconds"] = time.perf_counter() - started
    state["pairs_per_s"] = state["pairs"] / max(state["train_s"], 1e-9)
    state["train_groups"], state["validation_groups"], state["validation_pool"] = len(scored), len(held), len(pool)
    report = {k: v for k, v in state.items() if k != "losses"}
    report |= {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "teacher": teacher,
        "sources": sources or {},
        "loss_curve": [p[0] + config.margin_weight * p[1] for p in state.get("losses", [])][::10],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "training_log.json").write_text(json.dumps(report, indent=1))
    shutil.rmtree(checkpoint, ignore_errors=True)
    return report


def _save(model: SentenceTransformer, out: Path) -> None:
    """Save atomically enough for a reader: into a sibling folder, then swap the model files in."""
    tmp = out.with_name(out.name + ".saving")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(str(tmp))
    out.mkdir(parents=True, exist_ok=True)
    for item in tmp.iterdir():
        target = out / item.name
        if target.is_dir():
            shutil.rmtree(target)
        item.replace(target)
    tmp.rmdir()


def _validate_and_keep_best(
    model: SentenceTransformer, held: Sequence[Group], pool: Sequence[str], state: dict[str, Any], epoch: int, out: Path
) -> None:
    model.eval()
    scores = validate(model, held, pool)
    state["history"].append({"step": state["step"], "epoch": epoch, **scores})
    log.warning("validation at step %d: %s", state["step"], scores)
    if scores["mrr@10"] > state["best"]:
        state["best"], state["best_step"] = scores["mrr@10"], state["step"]
        _save(model, out)


def _embed(model: SentenceTransformer, texts: list[str], max_length: int) -> torch.Tensor:
    import torch

    features = model.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    features = {k: v.to(model.device) for k, v in features.items()}
    return torch.nn.functional.normalize(model(features)["sentence_embedding"], dim=-1)


def _loss(model: SentenceTransformer, batch: list[Scored], config: EncoderTrainConfig) -> tuple[Any, list[float], int]:
    """(loss, [contrastive, margin] as floats, training pairs: each query with its positive and its mined
    negatives). Every query is scored against every
    positive and mined negative of the batch; its own positive is the target, and its own negatives that the
    teacher ranks above that positive are masked out."""
    import torch

    n = config.negatives
    queries = [s.group.query for s in batch]
    negatives = [s.group.negatives[:n] for s in batch]
    texts = [s.group.positive for s in batch] + [t for ns in negatives for t in ns]
    q = _embed(model, queries, config.query_length)
    p = _embed(model, texts, config.max_length)
    sims = q @ p.T * config.scale  # (B, B + mined)
    mask = torch.zeros_like(sims, dtype=torch.bool)
    owner, column = [], len(batch)
    for i, s in enumerate(batch):
        for j in range(len(negatives[i])):
            if s.margins and s.margins[j] < 0:
                mask[i, column] = True
            owner.append((i, column, j))
            column += 1
    target = torch.arange(len(batch), device=sims.device)
    contrastive = torch.nn.functional.cross_entropy(sims.masked_fill(mask, float("-inf")), target)
    margin = torch.zeros((), device=sims.device)
    if config.margin_weight > 0 and all(s.margins for s in batch) and owner:
        rows = torch.tensor([i for i, _, _ in owner], device=sims.device)
        cols = torch.tensor([c for _, c, _ in owner], device=sims.device)
        student = sims[rows, rows] - sims[rows, cols]
        teacher = torch.tensor(
            [batch[i].margins[j] * config.scale for i, _, j in owner], device=sims.device, dtype=student.dtype
        )
        margin = torch.nn.functional.mse_loss(student, teacher)
    loss = contrastive + config.margin_weight * margin
    return loss, [float(contrastive.detach()), float(margin.detach())], len(batch) + len(owner)
