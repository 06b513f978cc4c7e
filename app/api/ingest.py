"""Documents in over HTTP (admin scope): upsert and delete batches, each durable before the 202, searchable
once the collection's applier has published them (`wait=true` waits for that), and each batch's state.

    POST /v1/collections/{collection}/documents          a JSON array of records, or JSONL (one per line)
    POST /v1/collections/{collection}/documents/delete   {"ids": [...]}
    GET  /v1/collections/{collection}/tasks/{task}       enqueued | applied | searchable

Validates, calls the collection's `Ingestor` (app/ingesting.py) and shapes; limits are `ingest.*`. A batch
with any bad record is refused whole (422 naming the record and field): nothing of it is written.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from app.api.errors import ApiError
from app.api.routes import ADMIN, ERRORS, collection_of
from app.api.schemas import NON_BLANK, JsonModel, Text, non_blank_items
from app.ingesting import BacklogFull, Ingestor
from app.services import Services
from indexer.ingest import IngestLogError

router = APIRouter()

JSONL_TYPES = ("application/x-ndjson", "application/jsonl", "application/x-jsonlines", "application/json-lines")
CollectionName = Path(..., description="the collection (see /v1/collections)", examples=["default"])
WAIT = Query(False, description="return once the change is searchable (read-your-writes), up to ingest.wait_timeout_s")


class DocumentIn(JsonModel):
    """One document, as `sift index build` reads a JSONL record: `_id`, `text`, optional `title` and
    `metadata` (filters and facets read it); other fields are ignored. An existing `_id` is replaced."""

    model_config = ConfigDict(extra="allow")
    id: str = Field(
        ...,
        alias="_id",
        min_length=1,
        max_length=512,
        description="document id (non-blank); its passages are `<_id>#<n>`",
        json_schema_extra={"pattern": NON_BLANK},
    )
    title: str | None = Field(None, description="title (indexed with the text)")
    text: str = Field(..., description="the document's text")
    metadata: dict[str, Any] | None = Field(None, description="metadata for filters and facets")

    @field_validator("id")
    @classmethod
    def _id_non_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("_id must contain non-whitespace text")
        return value


DOCUMENTS = TypeAdapter(list[DocumentIn])
DOCUMENTS_SCHEMA = {
    "type": "array",
    "minItems": 1,
    "items": DocumentIn.model_json_schema(by_alias=True),
    "description": "documents, at most ingest.max_documents_per_batch (JSONL with content-type application/x-ndjson "
    "is read as well)",
}


class DeleteRequest(JsonModel):
    model_config = ConfigDict(extra="forbid")
    ids: list[Text] = Field(
        ...,
        min_length=1,
        description="document ids to delete (an id the collection lacks is ignored); at most "
        "ingest.max_documents_per_batch",
        examples=[["astro-001"]],
    )

    @field_validator("ids")
    @classmethod
    def _ids_non_blank(cls, value: list[str]) -> list[str]:
        return non_blank_items(value, "ids")


class TaskResponse(JsonModel):
    task: int = Field(..., description="the batch's number: GET /v1/collections/{collection}/tasks/{task}")
    collection: str
    status: Literal["enqueued", "applied", "searchable"] = Field(
        ...,
        description="enqueued: durable, not yet in a published build; applied: published, not yet served by "
        "this process; searchable: served here",
    )
    documents: int | None = Field(None, description="documents or ids in the batch (on submission)")
    last_apply_error: str | None = Field(None, description="why the last apply failed (it is retried)")


RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    200: {"model": TaskResponse, "description": "wait=true: the batch is searchable"},
    202: {"model": TaskResponse, "description": "accepted and durable; searchable once applied"},
    503: {"model": ERRORS[422]["model"], "description": "the ingest log could not be written; retry"},
}


def _ingestor(request: Request, collection: str) -> Ingestor:
    services: Services = request.app.state.services
    if not services.settings.ingest.enabled:
        raise ApiError(404, "ingest_disabled", "documents over HTTP are turned off on this server (ingest.enabled)")
    return services.ingestor(collection_of(request, collection).name)


def _records(body: bytes, content_type: str) -> list[Any]:
    """The request's records: a JSON array, or one JSON object per line for a JSONL content type."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(422, "validation_error", f"body: not valid UTF-8 (byte {exc.start})", "body") from exc
    if content_type.split(";")[0].strip().lower() in JSONL_TYPES:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ApiError(
                        422, "validation_error", f"line {number}: malformed JSON ({exc.msg})", "body"
                    ) from exc
        return records
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ApiError(
            422, "validation_error", f"body: malformed JSON ({exc.msg}); send a JSON array of documents", "body"
        ) from exc
    if not isinstance(parsed, list):
        raise ApiError(422, "validation_error", "body: expected a JSON array of documents", "body")
    return parsed


def _check_count(ingestor: Ingestor, count: int, what: str) -> None:
    limit = ingestor.settings.max_documents_per_batch
    if count > limit:
        raise ApiError(
            413,
            "too_many_documents",
            f"{count} {what} in one request; at most {limit} (ingest.max_documents_per_batch): split the batch",
            what,
        )


async def _submit(ingestor: Ingestor, op: Literal["upsert", "delete"], items: list[Any], wait: bool) -> JSONResponse:
    try:
        seq = await ingestor.accept(op, items)
    except BacklogFull as exc:
        retry = str(int(exc.retry_after_s + 0.999))
        raise ApiError(429, "ingest_backlog_full", str(exc), headers={"Retry-After": retry}) from exc
    except IngestLogError as exc:
        raise ApiError(
            503, "ingest_unavailable", f"{exc}; nothing was accepted: retry", headers={"Retry-After": "5"}
        ) from exc
    status: Literal["enqueued", "searchable"] = "enqueued"
    if wait and await ingestor.wait_searchable(seq, ingestor.settings.wait_timeout_s):
        status = "searchable"
    body = TaskResponse(task=seq, collection=ingestor.collection.name, status=status, documents=len(items))
    return JSONResponse(body.model_dump(exclude_none=True), status_code=200 if status == "searchable" else 202)


@router.post(
    "/v1/collections/{collection}/documents",
    tags=["ingest"],
    status_code=202,
    response_model=None,
    responses=RESPONSES,
    dependencies=ADMIN,
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": DOCUMENTS_SCHEMA}}}},
)
async def upsert_documents(request: Request, collection: str = CollectionName, wait: bool = WAIT) -> JSONResponse:
    """Add or replace documents (by `_id`): durable on return (202); searchable once applied as one
    incremental update with the other pending batches (`wait=true` returns then, 200). A batch with any bad
    record is refused whole: 422 naming the record and field."""
    ingestor = _ingestor(request, collection)
    records = _records(await request.body(), request.headers.get("content-type", ""))
    if not records:
        raise ApiError(422, "validation_error", "body: no documents; send at least one", "body")
    _check_count(ingestor, len(records), "documents")
    try:
        documents = DOCUMENTS.validate_python(records)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", "documents", *e["loc"])} for e in exc.errors()]) from exc
    items = [document.model_dump(by_alias=True, exclude_none=True) for document in documents]
    return await _submit(ingestor, "upsert", items, wait)


@router.post(
    "/v1/collections/{collection}/documents/delete",
    tags=["ingest"],
    status_code=202,
    response_model=None,
    responses=RESPONSES,
    dependencies=ADMIN,
)
async def delete_documents(
    request: Request, body: DeleteRequest, collection: str = CollectionName, wait: bool = WAIT
) -> JSONResponse:
    """Delete documents by id (all their passages); durable on return (202), searchable once applied."""
    ingestor = _ingestor(request, collection)
    _check_count(ingestor, len(body.ids), "ids")
    return await _submit(ingestor, "delete", list(dict.fromkeys(body.ids)), wait)


@router.get(
    "/v1/collections/{collection}/tasks/{task}",
    tags=["ingest"],
    response_model=TaskResponse,
    response_model_exclude_none=True,
    responses=ERRORS,
    dependencies=ADMIN,
)
async def task_status(
    request: Request,
    collection: str = CollectionName,
    task: int = Path(..., ge=1, description="a batch's number, as its submission returned it"),
) -> dict[str, Any]:
    """A submitted batch's state: enqueued, applied (published) or searchable (served here)."""
    ingestor = _ingestor(request, collection)
    state = ingestor.task(task)
    if state is None:
        raise ApiError(404, "unknown_task", f"no batch {task} was submitted to {collection}", "task")
    return state
