"""`POST /v1/classify`: zero-shot labels for texts, with a configured label set (`index.tagging.label_sets`,
the ones `sift index build --tag` writes) or one given in the request. Validates, calls the services'
`Classifier` (app/classifying.py) and shapes; limits are `classify.*`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.api.errors import ApiError
from app.api.routes import ERRORS, SEARCH
from app.api.schemas import NON_BLANK, JsonModel, Text, non_blank_items
from app.api.shaping import FastJSON

router = APIRouter()

Word = Annotated[str, Field(min_length=1, max_length=100, json_schema_extra={"pattern": NON_BLANK})]


class InlineLabelSet(JsonModel):
    """A label set given with the request: labels and their verbalizer words, optionally the prompt."""

    model_config = ConfigDict(extra="forbid")
    # label names: non-blank, at most 100 characters (`_labels_valid`; the document says so in propertyNames)
    labels: dict[str, list[Word]] = Field(
        ...,
        min_length=2,
        description="label -> verbalizer words (an empty list: the label itself); at least two labels, at most "
        "classify.max_labels, each with at most classify.max_words words whose first tokens differ from other labels'",
        examples=[{"sport": ["sport", "football"], "cooking": ["cooking", "recipe"], "music": []}],
        json_schema_extra={"propertyNames": {"pattern": NON_BLANK, "maxLength": 100}},
    )
    template: str | None = Field(
        None,
        min_length=6,
        max_length=2000,
        pattern=r"\{text\}",
        description="the question around the text, holding `{text}` (default: the topic question)",
        examples=["{text}\n\nWhat is the topic of this text?"],
    )
    prefix: str | None = Field(
        None, max_length=200, description="the start of the answer a label word follows", examples=["The topic is"]
    )

    @field_validator("labels")
    @classmethod
    def _labels_valid(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for label in value:
            if not label.strip() or len(label) > 100:
                raise ValueError("label names must be non-blank and at most 100 characters")
        return value


class ClassifyRequest(JsonModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"texts": ["The striker scored twice in the final."], "label_set": "topic"},
                {
                    "texts": ["Whisk the eggs with sugar, then fold in the flour."],
                    "label_set": {"labels": {"sport": [], "cooking": ["cooking", "recipe"], "music": []}},
                },
            ]
        },
    )
    texts: list[Text] = Field(
        ...,
        min_length=1,
        description="texts to label, in order (at most classify.max_texts, each at most classify.max_text_chars)",
        examples=[["Stars form inside cold clouds of molecular hydrogen."]],
    )
    label_set: Annotated[str, Field(min_length=1, max_length=100)] | InlineLabelSet = Field(
        ...,
        description="the name of a configured label set (index.tagging.label_sets, see /v1/info) or a label set",
        examples=["topic"],
    )

    @field_validator("texts")
    @classmethod
    def _texts_valid(cls, value: list[str]) -> list[str]:
        return non_blank_items(value, "texts")


class ClassifyResult(BaseModel):
    label: str | None = Field(description="the most probable label (null below the label set's min_score)")
    score: float = Field(description="its probability")
    scores: dict[str, float] = Field(description="every label's probability, most probable first")


class ClassifyResponse(BaseModel):
    model: str = Field(description="the model that scored the labels")
    label_set: str | None = Field(description="the configured label set used (null: the request's own)")
    labels: list[str] = Field(description="the label set's labels, in its order")
    results: list[ClassifyResult] = Field(description="one per text, in order")
    warnings: list[str] = Field(
        description="labels whose verbalizer words start with the same token (they tie on it; the token counts "
        "for the label listed first)"
    )


@router.post(
    "/v1/classify",
    response_model=ClassifyResponse,
    responses=ERRORS,
    tags=["classify"],
    dependencies=SEARCH,
)
async def classify(body: ClassifyRequest, request: Request) -> FastJSON:
    """Zero-shot classification by prompt: a language model scores each label's verbalizer words as the next
    word of the label set's prompt (calibrated against an empty text), as `sift index build --tag` does."""
    services = request.app.state.services
    if not services.settings.classify.enabled:
        raise ApiError(404, "not_found", "classification is disabled on this server (classify.enabled)")
    classifier = services.classifier
    if isinstance(body.label_set, str):
        label_set, name = classifier.label_set(body.label_set, None), body.label_set
    else:
        label_set, name = classifier.label_set(None, body.label_set.model_dump()), None
    classified = await classifier.classify(list(body.texts), label_set)
    return FastJSON(
        {
            "model": classified.model,
            "label_set": name,
            "labels": list(label_set.labels),
            "results": [{"label": r.label, "score": r.score, "scores": r.scores} for r in classified.results],
            "warnings": classified.warnings,
        }
    )
