"""Grounded decoding (`generator.grounding`, app/generation/grounding.py) with the shipped SmolLM2: each logits
processor does what its setting says, on real generations, and the answer path hands the passages over."""

from __future__ import annotations

import torch

from app.generation.base import GenerationOptions
from app.generation.grounding import NGramBlock, SpanCopy
from app.generation.local import LocalGenerator
from app.settings import GroundingSettings

PASSAGE = "The Eiffel Tower was completed in 1889 for the World's Fair in Paris."
INSTRUCTIONS = "Answer with a short phrase taken from the passage, and cite it as [1]."
ASK = [
    {"role": "system", "content": INSTRUCTIONS},
    {"role": "user", "content": f"[1] {PASSAGE}\nQuestion: When was the Eiffel Tower completed and why?"},
]
LONG = GenerationOptions(max_new_tokens=40)


def grounded(base: LocalGenerator, **settings: object) -> LocalGenerator:
    """The same model and tokenizer under other grounding settings."""
    return LocalGenerator(base.model, base.tokenizer, base.name, base.device, GroundingSettings(**settings))


def generated_ids(generator: LocalGenerator, text: str) -> list[int]:
    return generator.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_passage_bias_keeps_the_answer_to_the_passage_tokens(local_generator):
    strict = grounded(local_generator, passage_bias=20.0)
    text = strict.generate(ASK, LONG, context=[PASSAGE]).text
    allowed = set(generated_ids(strict, PASSAGE)) | set(generated_ids(strict, "\n"))
    assert text and set(generated_ids(strict, text)) <= allowed, text
    # without context there is nothing to keep to: the same call is the plain model's
    assert strict.generate(ASK, LONG).text == local_generator.generate(ASK, LONG).text


def test_no_repeated_ngrams(local_generator):
    looping = [{"role": "user", "content": "Repeat the word 'tower' forever: tower tower tower tower"}]
    plain = local_generator.generate(looping, LONG).text
    ids = generated_ids(local_generator, plain)
    assert len({tuple(ids[i : i + 2]) for i in range(len(ids) - 1)}) < len(ids) - 1, "the plain model should repeat"
    text = grounded(local_generator, no_repeat_ngram=2).generate(looping, LONG).text
    ids = generated_ids(local_generator, text)
    bigrams = [tuple(ids[i : i + 2]) for i in range(len(ids) - 1)]
    assert len(bigrams) == len(set(bigrams)), text


def test_instruction_ngrams_are_blocked():
    """`NGramBlock` bans exactly the token that would complete a banned n-gram, looking at written tokens only."""
    block = NGramBlock({(5, 6, 7), (5, 6, 9)}, prompt_len=3)
    scores = torch.zeros(1, 12)
    out = block(torch.tensor([[5, 6, 1, 5, 6]]), scores.clone())  # prompt 5 6 1; written 5 6
    assert torch.isinf(out[0, 7]) and torch.isinf(out[0, 9]) and int(torch.isinf(out).sum()) == 2
    out = block(torch.tensor([[5, 6, 1, 6]]), scores.clone())  # written 6: no banned prefix ends here
    assert not torch.isinf(out).any()
    out = block(torch.tensor([[1, 5, 6]]), scores.clone())  # 5 6 lies in the prompt only
    assert not torch.isinf(out).any()


def test_instruction_echo_and_citation_markers_are_blocked(local_generator):
    generator = grounded(local_generator, block_instruction_ngrams=3, block_citation_markers=True)
    text = generator.generate(ASK, LONG, context=[PASSAGE]).text
    assert "[" not in text
    ids = generated_ids(generator, text)
    written = {tuple(ids[i : i + 3]) for i in range(len(ids) - 2)}
    instruction = generated_ids(generator, INSTRUCTIONS)
    passage = generated_ids(generator, PASSAGE)
    banned = {tuple(instruction[i : i + 3]) for i in range(len(instruction) - 2)} - {
        tuple(passage[i : i + 3]) for i in range(len(passage) - 2)
    }
    assert not written & banned, text
    streamed = "".join(generator.stream(ASK, LONG, context=[PASSAGE]))
    assert streamed == text  # the stream decodes under the same processors


def test_stop_at_ends_every_generation(local_generator):
    generator = grounded(local_generator, stop_at=["\n"])
    multi = [{"role": "user", "content": "List three French cities, one per line."}]
    text = generator.generate(multi, LONG).text
    assert text and "\n" not in text
    assert "\n" in local_generator.generate(multi, LONG).text, "the plain model should write several lines"


def test_the_answer_path_grounds_in_the_prompt_passages(example_pipeline, local_generator):
    import asyncio

    from app.eval.qa import qa_answerer

    strict = grounded(local_generator, passage_bias=20.0)
    answerer = qa_answerer(example_pipeline, "generative", strict)
    passage = {"doc_id": "p", "passage_id": "p#0", "title": "", "text": PASSAGE}
    prepared = answerer.given("When was the Eiffel Tower completed?", [passage])
    result = asyncio.run(answerer.answer(prepared, LONG))
    allowed = set(generated_ids(strict, PASSAGE)) | set(generated_ids(strict, "\n"))
    assert result.text and set(generated_ids(strict, result.text)) <= allowed, result.text


def test_question_ngrams_are_not_restated(local_generator):
    question = "When was the Eiffel Tower completed?"
    ask = [{"role": "user", "content": f"{PASSAGE}\nQuestion: {question} Answer in a full sentence."}]
    tokenizer = local_generator.tokenizer

    def trigrams(ids: list[int]) -> set[tuple[int, ...]]:
        return {tuple(ids[i : i + 3]) for i in range(len(ids) - 2)}

    asked = trigrams(generated_ids(local_generator, question)) | trigrams(
        generated_ids(local_generator, " " + question)
    )
    plain = local_generator.generate(ask, LONG, context=[PASSAGE], avoid=[question]).text
    assert trigrams(generated_ids(local_generator, plain)) & asked, f"the plain model should restate: {plain}"
    text = (
        grounded(local_generator, block_question_ngrams=3).generate(ask, LONG, context=[PASSAGE], avoid=[question]).text
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert text and not trigrams(ids) & asked, text


def test_span_copy_allows_only_runs_of_passage_tokens():
    """`SpanCopy` keeps what is written a contiguous run of one passage's tokens (never across two passages),
    lets the first token be a word's spaceless twin, and lets the answer end only once something is written."""
    copy = SpanCopy([[10, 11, 12, 11, 13], [20, 21]], twins={11: 31}, ends=[0], eos=[0], prompt_len=2)
    allowed = lambda out: set(torch.nonzero(~torch.isinf(out[0])).flatten().tolist())  # noqa: E731
    assert allowed(copy(torch.tensor([[7, 8]]), torch.zeros(1, 40))) == {10, 11, 12, 13, 20, 21, 31}
    assert allowed(copy(torch.tensor([[7, 8, 31]]), torch.zeros(1, 40))) == {12, 13, 0}  # 31 is 11's twin
    assert allowed(copy(torch.tensor([[7, 8, 31, 12]]), torch.zeros(1, 40))) == {11, 0}
    assert allowed(copy(torch.tensor([[7, 8, 31, 12, 11]]), torch.zeros(1, 40))) == {13, 0}
    assert allowed(copy(torch.tensor([[7, 8, 31, 12, 11, 13]]), torch.zeros(1, 40))) == {0}  # the passage ends
    fresh = SpanCopy([[10, 11], [20, 21]], twins={}, ends=[0, 5], eos=[0], prompt_len=0)
    assert allowed(fresh(torch.tensor([[11]]), torch.zeros(1, 40))) == {0, 5}  # 11 then 20 would cross passages
    assert allowed(fresh(torch.tensor([[10, 5]]), torch.zeros(1, 40))) == {0}  # after a newline: only the end
    # stateless: rows in any order (beam search reorders them) get what their own tokens allow
    both = fresh(torch.tensor([[20], [10]]), torch.zeros(2, 40))
    assert allowed(both[:1]) == {21, 0, 5} and allowed(both[1:]) == {11, 0, 5}


def test_copied_answers_are_phrases_of_the_passage(local_generator):
    short = [
        {"role": "system", "content": "Answer with the shortest phrase from the passage."},
        {"role": "user", "content": f"Passage: {PASSAGE}\nQuestion: In which year was the Eiffel Tower completed?"},
    ]
    text = grounded(local_generator, copy_spans=True).generate(short, LONG, context=[PASSAGE]).text.strip()
    assert text and text in PASSAGE and "1889" in text, text
