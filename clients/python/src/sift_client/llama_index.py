"""A LlamaIndex retriever over Sift's `/v1/search` (`pip install "./clients/python[llamaindex]"`).

    retriever = SiftRetriever(base_url="http://127.0.0.1:8000", k=5, filters={"topic": "astronomy"})
    nodes = retriever.retrieve("how do stars form?")         # or await retriever.aretrieve(...)

Each `NodeWithScore` holds a `TextNode` whose id is the passage id, whose text is the passage, with the
passage's character offsets in its document (`start_char_idx`, `end_char_idx`), the document as its SOURCE
relationship, and in `metadata` the doc id, score, explain per stage, build id and the document's metadata.
Explain and build id are kept out of what LLMs and embedders see.
"""

from __future__ import annotations

from typing import Any, Literal

from llama_index.core.callbacks import CallbackManager
from llama_index.core.retrievers import BaseRetriever
from llama_index.core.schema import NodeRelationship, NodeWithScore, QueryBundle, RelatedNodeInfo, TextNode

from sift_client._hits import AsyncClients, hit_metadata, hit_text
from sift_client._hits import search_options as sift_options
from sift_client.client import AsyncSiftClient, SiftClient
from sift_client.models import SearchOptions, SearchResponse

_HIDDEN = ["explain", "bundle", "mode", "score", "position", "start", "end", "passage_id"]


class SiftRetriever(BaseRetriever):
    """Sift's two-stage search as a LlamaIndex retriever. Unset options take the server's defaults."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        k: int = 10,
        mode: Literal["bm25", "dense", "hybrid"] | None = None,
        collection: str | None = None,
        filters: dict[str, Any] | None = None,
        rerank: bool | None = None,
        search_options: dict[str, Any] | None = None,
        timeout: float = 60.0,
        max_retries: int = 2,
        callback_manager: CallbackManager | None = None,
        verbose: bool = False,
    ) -> None:
        if k < 1:
            raise ValueError("k must be >= 1")
        super().__init__(callback_manager=callback_manager, verbose=verbose)
        fields = {"k": k, "mode": mode, "collection": collection, "filters": filters, "rerank": rerank}
        self.options: SearchOptions = sift_options(search_options, fields)
        settings: dict[str, Any] = {"api_key": api_key, "timeout": timeout, "max_retries": max_retries}
        self.client = SiftClient(base_url, **settings)
        self.async_clients = AsyncClients(lambda: AsyncSiftClient(base_url, **settings))

    @staticmethod
    def _nodes(page: SearchResponse) -> list[NodeWithScore]:
        nodes = []
        for hit in page.hits:
            node = TextNode(
                id_=hit.passage_id,
                text=hit_text(hit),
                metadata=hit_metadata(hit, page),
                start_char_idx=hit.start,
                end_char_idx=hit.end,
                excluded_llm_metadata_keys=list(_HIDDEN),
                excluded_embed_metadata_keys=list(_HIDDEN),
                relationships={NodeRelationship.SOURCE: RelatedNodeInfo(node_id=hit.doc_id)},
            )
            nodes.append(NodeWithScore(node=node, score=hit.score))
        return nodes

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return self._nodes(self.client.search(query_bundle.query_str, **self.options))

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return self._nodes(await self.async_clients.get().search(query_bundle.query_str, **self.options))
