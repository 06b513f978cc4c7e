"""A Haystack retriever component over Sift's `/v1/search` (`pip install "./clients/python[haystack]"`).

    from haystack import Pipeline
    pipeline = Pipeline()
    pipeline.add_component("retriever", SiftRetriever(url="http://127.0.0.1:8000", top_k=5))
    pipeline.run({"retriever": {"query": "how do stars form?", "filters": {"topic": "astronomy"}}})

`run(query, filters, top_k)` returns `{"documents": [Document, ...]}`: the passage id as `id`, the text as
`content`, Sift's score as `score`, and in `meta` the document's metadata (flat, so `meta.topic` filters and
reads the same key) with Sift's doc id, passage id, title, character offsets, explain per stage and build id.
`filters` take Sift's form (`{"topic": "astronomy"}`, a list for any-of) or Haystack's
(`{"field": "meta.topic", "operator": "==", "value": ...}`, `in`, and `AND` of those).
The API key is a Haystack `Secret` (default: the env var SIFT_API_KEY, when set), never serialized in clear.
Haystack 3 loads serialized pipelines only from trusted modules: `Pipeline.loads(text,
allowed_modules=["sift_client.haystack"])`.
"""

from __future__ import annotations

from typing import Any, Literal

from haystack import Document, component, default_from_dict, default_to_dict
from haystack.utils import Secret, deserialize_secrets_inplace

from sift_client._hits import AsyncClients, hit_metadata, hit_text, search_options
from sift_client.client import AsyncSiftClient, SiftClient
from sift_client.models import SearchOptions, SearchResponse


def sift_filters(filters: dict[str, Any] | None) -> dict[str, Any] | None:
    """Sift's filter form from Haystack's (equality, `in` and `AND` on `meta.*` fields); Sift's own form is
    returned as it is. Raises ValueError naming what Sift cannot filter on."""
    if not filters or "operator" not in filters:
        return filters or None
    out: dict[str, Any] = {}

    def add(condition: dict[str, Any]) -> None:
        operator = condition.get("operator")
        if operator == "AND":
            for inner in condition.get("conditions", []):
                add(inner)
            return
        field = str(condition.get("field", ""))
        if operator not in ("==", "in") or not field.startswith("meta."):
            raise ValueError(
                f"Sift filters on document metadata by equality: use 'meta.<key>' with '==' or 'in' (and AND of "
                f"those); got field {field!r} with operator {operator!r}"
            )
        key, value = field[len("meta.") :], condition.get("value")
        if operator == "in" and not isinstance(value, list | tuple):
            raise ValueError(f"'in' on {field!r} takes a list of values, got {value!r}")
        if key in out:
            raise ValueError(f"two conditions on {field!r}: Sift takes one value or one list per field")
        out[key] = list(value) if isinstance(value, tuple) else value

    add(filters)
    return out


@component
class SiftRetriever:
    """Retrieves passages from a Sift server (two-stage search). Unset options take the server's defaults."""

    def __init__(
        self,
        url: str | None = None,
        api_key: Secret | None = Secret.from_env_var("SIFT_API_KEY", strict=False),
        top_k: int = 10,
        mode: Literal["bm25", "dense", "hybrid"] | None = None,
        collection: str | None = None,
        filters: dict[str, Any] | None = None,
        rerank: bool | None = None,
        timeout: float = 60.0,
        max_retries: int = 2,
    ) -> None:
        if top_k < 1:
            raise ValueError("top_k must be >= 1")
        self.url = url
        self.api_key = api_key
        self.top_k = top_k
        self.mode = mode
        self.collection = collection
        self.filters = filters
        sift_filters(filters)  # refuse unsupported filters at construction, not at the first run
        self.rerank = rerank
        self.timeout = timeout
        self.max_retries = max_retries
        self._client: SiftClient | None = None
        self._aclients = AsyncClients(lambda: AsyncSiftClient(self.url, **self._settings()))

    def _settings(self) -> dict[str, Any]:
        key = self.api_key.resolve_value() if self.api_key is not None else None
        return {"api_key": key or None, "timeout": self.timeout, "max_retries": self.max_retries}

    def warm_up(self) -> None:
        if self._client is None:
            self._client = SiftClient(self.url, **self._settings())

    def _options(self, filters: dict[str, Any] | None, top_k: int | None) -> SearchOptions:
        return search_options(
            {
                "k": top_k if top_k is not None else self.top_k,
                "mode": self.mode,
                "collection": self.collection,
                "filters": sift_filters(filters if filters is not None else self.filters),
                "rerank": self.rerank,
            }
        )

    @staticmethod
    def _documents(page: SearchResponse) -> dict[str, list[Document]]:
        documents = []
        for hit in page.hits:
            # flat, as Haystack's filters address it (`meta.topic`): the document's metadata, then Sift's keys
            # (which win a clash: a document's own `title` or `score` cannot hide Sift's)
            sift = hit_metadata(hit, page)
            own = sift.pop("metadata")
            sift.pop("score")
            meta = {**own, **sift}
            documents.append(Document(id=hit.passage_id, content=hit_text(hit), meta=meta, score=hit.score))
        return {"documents": documents}

    @component.output_types(documents=list[Document])
    def run(self, query: str, filters: dict[str, Any] | None = None, top_k: int | None = None) -> dict[str, Any]:
        """The best `top_k` passages for `query`; `filters` and `top_k` override the component's for this run."""
        self.warm_up()
        assert self._client is not None
        return self._documents(self._client.search(query, **self._options(filters, top_k)))

    @component.output_types(documents=list[Document])
    async def run_async(
        self, query: str, filters: dict[str, Any] | None = None, top_k: int | None = None
    ) -> dict[str, Any]:
        return self._documents(await self._aclients.get().search(query, **self._options(filters, top_k)))

    def to_dict(self) -> dict[str, Any]:
        return default_to_dict(
            self,
            url=self.url,
            api_key=self.api_key.to_dict() if self.api_key is not None else None,
            top_k=self.top_k,
            mode=self.mode,
            collection=self.collection,
            filters=self.filters,
            rerank=self.rerank,
            timeout=self.timeout,
            max_retries=self.max_retries,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SiftRetriever:
        deserialize_secrets_inplace(data["init_parameters"], keys=["api_key"])
        return default_from_dict(cls, data)
