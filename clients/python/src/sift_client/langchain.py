"""A LangChain retriever over Sift's `/v1/search` (`pip install "./clients/python[langchain]"`).

    retriever = SiftRetriever(base_url="http://127.0.0.1:8000", k=5, mode="hybrid")
    docs = retriever.invoke("how do stars form?")                  # or await retriever.ainvoke(...)
    docs = retriever.invoke("...", filters={"topic": "astronomy"})  # per-call options override the fields

Each `Document` holds the passage text as `page_content`, the passage id as `id`, and in `metadata` the
doc id, score, character offsets, each stage's explain, the build id and the document's own metadata.
Errors are the client's (`sift_client.errors`), raised through LangChain's callbacks as any retriever's are.
"""

from __future__ import annotations

from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, Field, PrivateAttr, SecretStr

from sift_client._hits import AsyncClients, hit_metadata, hit_text, search_options
from sift_client.client import AsyncSiftClient, SiftClient
from sift_client.models import SearchOptions, SearchResponse


class SiftRetriever(BaseRetriever):
    """Sift's two-stage search as a LangChain retriever. Unset options take the server's defaults."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    base_url: str | None = Field(None, description="Sift's URL (default $SIFT_URL, else http://127.0.0.1:8000)")
    api_key: SecretStr | None = Field(None, description="API key (default $SIFT_API_KEY)")
    k: int = Field(10, ge=1, description="passages returned")
    mode: Literal["bm25", "dense", "hybrid"] | None = None
    collection: str | None = None
    filters: dict[str, Any] | None = None
    rerank: bool | None = None
    search_options: dict[str, Any] = Field(default_factory=dict, description="any other /v1/search option")
    timeout: float = 60.0
    max_retries: int = 2

    _client: SiftClient = PrivateAttr()
    _aclients: AsyncClients = PrivateAttr()

    def model_post_init(self, context: Any) -> None:
        key = self.api_key.get_secret_value() if self.api_key is not None else None
        settings: dict[str, Any] = {"api_key": key, "timeout": self.timeout, "max_retries": self.max_retries}
        self._client = SiftClient(self.base_url, **settings)
        self._aclients = AsyncClients(lambda: AsyncSiftClient(self.base_url, **settings))

    def _options(self, overrides: dict[str, Any]) -> SearchOptions:
        fields = {
            "k": self.k,
            "mode": self.mode,
            "collection": self.collection,
            "filters": self.filters,
            "rerank": self.rerank,
        }
        return search_options(self.search_options, fields, overrides)

    @property
    def client(self) -> SiftClient:
        return self._client

    @property
    def async_client(self) -> AsyncSiftClient:
        """The async client of the running event loop."""
        return self._aclients.get()

    @staticmethod
    def _documents(page: SearchResponse) -> list[Document]:
        return [Document(id=h.passage_id, page_content=hit_text(h), metadata=hit_metadata(h, page)) for h in page.hits]

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[Document]:
        return self._documents(self.client.search(query, **self._options(kwargs)))

    async def _aget_relevant_documents(
        self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[Document]:
        return self._documents(await self.async_client.search(query, **self._options(kwargs)))
