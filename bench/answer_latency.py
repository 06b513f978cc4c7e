"""Answer latency on this CPU, in one run: the local generator's time to first token and tokens/s
(streaming, default answer prompt, 3 passages), and the whole answer per question (retrieval + answering)
for `answer.mode: generative` and `extractive` (the shipped reader over the best 3 passages).

    python bench/answer_latency.py [--runs 5] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, append_report, progress  # noqa: E402

QUESTIONS = [
    "When was the Eiffel Tower completed?",
    "How do vaccines train the immune system?",
    "Why does bread rise?",
    "What causes tides?",
    "Who invented basketball?",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--bundle", type=Path, default=ROOT / "var" / "index")
    args = parser.parse_args()

    from app.answering import Answerer
    from app.generation import GenerationOptions
    from app.generation.local import LocalGenerator
    from app.generation.reader import ExtractiveReader
    from app.services import load_pipeline
    from app.settings import load_settings

    settings = load_settings(bundle=args.bundle)
    started = time.perf_counter()
    generator = LocalGenerator.load("smollm2", settings.generator.cache_dir, "cpu")
    load_s = time.perf_counter() - started
    reader = Answerer(load_pipeline(settings), generator, settings.answer)
    options = GenerationOptions(max_new_tokens=args.max_new_tokens)
    prepared = [asyncio.run(reader.prepare(q, reader.pipeline.options(k=5))) for q in QUESTIONS]
    list(generator.stream(prepared[0].messages, options))  # warm-up
    ttft, rates, prompt_tokens = [], [], []
    bar = progress(args.runs * len(prepared), "generator runs")
    for _ in range(args.runs):
        for p in prepared:
            bar.update()
            t0 = time.perf_counter()
            first = None
            text = ""
            for piece in generator.stream(p.messages, options):
                first = first or time.perf_counter()
                text += piece
            end = time.perf_counter()
            tokens = generator.count_tokens(text)
            ttft.append((first - t0) * 1000)
            rates.append((tokens - 1) / (end - first) if tokens > 1 and end > first else 0.0)
            prompt_tokens.append(sum(generator.count_tokens(m["content"]) for m in p.messages))
    body = f"""SmolLM2-135M-Instruct (fp32, CPU, greedy), streaming through `LocalGenerator.stream`; {len(QUESTIONS)} questions ×
{args.runs} runs after a warm-up; prompts of {min(prompt_tokens)}–{max(prompt_tokens)} tokens (answer template, 3 passages);
up to {args.max_new_tokens} new tokens. Model load from the cached fp32 copy: {load_s:.1f} s.

| metric | median | p90 |
|---|---:|---:|
| time to first token, ms | {statistics.median(ttft):.0f} | {sorted(ttft)[int(0.9 * len(ttft))]:.0f} |
| decode speed, tokens/s | {statistics.median(rates):.1f} | {sorted(rates)[int(0.9 * len(rates))]:.1f} |
"""
    # whole answers per mode, same process, same questions, same retrieval
    extractive = Answerer(
        reader.pipeline,
        None,
        settings.answer.model_copy(update={"mode": "extractive", "passages": 3}),
        reader=ExtractiveReader.load(settings.answer.reader or "models/sift-reader-minilm-l6", "cpu"),
    )
    per_mode = {}
    for name, answerer in (
        ("generative (SmolLM2, 3 passages)", reader),
        ("extractive (reader, 3 passages)", extractive),
    ):
        asyncio.run(
            answerer.answer(asyncio.run(answerer.prepare(QUESTIONS[0], answerer.pipeline.options(k=5))), options)
        )
        times, answers = [], {}
        bar = progress(args.runs * len(QUESTIONS), name)
        for _ in range(args.runs):
            for q in QUESTIONS:
                bar.update()
                t0 = time.perf_counter()
                prepared = asyncio.run(answerer.prepare(q, answerer.pipeline.options(k=5)))
                result = asyncio.run(answerer.answer(prepared, options))
                times.append((time.perf_counter() - t0) * 1000)
                answers[q] = result.text if result.answered else "(declined)"
        per_mode[name] = (times, answers)
    rows = "\n".join(
        f"| {name} | {statistics.median(t):.0f} | {sorted(t)[int(0.95 * (len(t) - 1))]:.0f} | {len(t)} |"
        for name, (t, _) in per_mode.items()
    )
    examples = "\n".join(f"| {q} | {per_mode[n][1][q][:80]} |" for n in per_mode for q in QUESTIONS[:3])
    body += f"""
Whole answer per question (retrieval + answer, non-streamed, `Answerer.prepare` + `Answerer.answer`), same run:

| answer mode | p50 ms | p95 ms | answers |
|---|---:|---:|---:|
{rows}

| question | answer (generative rows first, then extractive) |
|---|---|
{examples}
"""
    append_report("Answer latency: local generator and extractive reader (bench/answer_latency.py)", body)


if __name__ == "__main__":
    main()
