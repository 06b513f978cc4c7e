"""The framework retrievers of `sift-client` (extras `langchain`, `llamaindex`, `haystack`), each with its real
package, against a real `sift serve` (`client_server`: two collections behind a key): the same passage ids in
the same order as `/v1/search`, filters, collections and modes passed through, text, scores, offsets and explain
where each framework keeps them, async paths, and a 401 surfacing as each framework surfaces a failure."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any

import httpx
import pytest
from haystack import Document as HaystackDocument
from haystack import Pipeline
from haystack.core.errors import PipelineRuntimeError
from haystack.utils import Secret
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document as LangChainDocument
from llama_index.core.schema import NodeRelationship, NodeWithScore, TextNode
from sift_client import AuthenticationError
from sift_client.haystack import SiftRetriever as HaystackRetriever
from sift_client.haystack import sift_filters
from sift_client.langchain import SiftRetriever as LangChainRetriever
from sift_client.llama_index import SiftRetriever as LlamaIndexRetriever

from tests.conftest import ROOT
from tests.servers import free_port

QUERY = "how do stars form?"
FILTERED = "kings and empires"


def raw_ids(base: str, key: str, **body: Any) -> list[tuple[str, float]]:
    response = httpx.post(f"{base}/v1/search", json=body, headers={"authorization": f"Bearer {key}"}, timeout=60)
    assert response.status_code == 200, response.text
    return [(h["passage_id"], h["score"]) for h in response.json()["hits"]]


@pytest.fixture(scope="module")
def expected(client_server) -> dict[str, list[tuple[str, float]]]:
    """What `/v1/search` answers, by raw HTTP: the reference every framework must reproduce."""
    base, key = client_server
    return {
        "default": raw_ids(base, key, query=QUERY, k=5),
        "filtered": raw_ids(base, key, query=FILTERED, k=4, mode="dense", filters={"topic": "history"}),
        "recipes": raw_ids(base, key, query="lemons and sugar", k=2, collection="recipes"),
    }


def _same(got: list[tuple[str, float]], want: list[tuple[str, float]]) -> None:
    assert [g[0] for g in got] == [w[0] for w in want]
    assert [g[1] for g in got] == pytest.approx([w[1] for w in want], rel=1e-6)


# -- LangChain -----------------------------------------------------------------------------------------------


def test_langchain_retriever(client_server, expected):
    base, key = client_server
    retriever = LangChainRetriever(base_url=base, api_key=key, k=5)
    docs = retriever.invoke(QUERY)
    assert all(isinstance(d, LangChainDocument) for d in docs)
    _same([(d.id, d.metadata["score"]) for d in docs], expected["default"])
    first = docs[0]
    assert first.page_content.startswith("Stars form") and first.metadata["doc_id"] == "astro-001"
    assert first.metadata["passage_id"] == first.id and first.metadata["end"] > first.metadata["start"]
    assert first.metadata["explain"]["rerank"]["rank"] == 1 and first.metadata["metadata"]["topic"] == "astronomy"
    # per-call options and the retriever's own fields pass through
    history = retriever.invoke(FILTERED, k=4, mode="dense", filters={"topic": "history"})
    _same([(d.id, d.metadata["score"]) for d in history], expected["filtered"])
    assert {d.metadata["metadata"]["topic"] for d in history} == {"history"}
    recipes = LangChainRetriever(base_url=base, api_key=key, k=2, collection="recipes").invoke("lemons and sugar")
    _same([(d.id, d.metadata["score"]) for d in recipes], expected["recipes"])
    # async, and a batch through the Runnable interface
    docs_async = asyncio.run(retriever.ainvoke(QUERY))
    _same([(d.id, d.metadata["score"]) for d in docs_async], expected["default"])
    # again from another event loop (a connection pool cannot cross loops)
    history_async = asyncio.run(retriever.ainvoke(FILTERED, k=4, mode="dense", filters={"topic": "history"}))
    _same([(d.id, d.metadata["score"]) for d in history_async], expected["filtered"])
    batched = retriever.batch([QUERY, FILTERED])
    assert [d.id for d in batched[0]] == [d.id for d in docs]


class Errors(BaseCallbackHandler):
    def __init__(self) -> None:
        self.errors: list[BaseException] = []

    def on_retriever_error(self, error: BaseException, **kwargs: Any) -> None:
        self.errors.append(error)


def test_langchain_401_raises_through_the_callbacks(client_server):
    base, _ = client_server
    seen = Errors()
    retriever = LangChainRetriever(base_url=base, api_key="not-the-right-key-000", max_retries=0)
    with pytest.raises(AuthenticationError) as caught:
        retriever.invoke(QUERY, config={"callbacks": [seen]})
    assert caught.value.status_code == 401 and caught.value.error_type == "unauthorized"
    assert seen.errors == [caught.value]
    with pytest.raises(AuthenticationError):
        asyncio.run(retriever.ainvoke(QUERY))


# -- LlamaIndex ----------------------------------------------------------------------------------------------


def test_llama_index_retriever(client_server, expected):
    base, key = client_server
    retriever = LlamaIndexRetriever(base, api_key=key, k=5)
    nodes = retriever.retrieve(QUERY)
    assert all(isinstance(n, NodeWithScore) and isinstance(n.node, TextNode) for n in nodes)
    _same([(n.node.node_id, n.score) for n in nodes], expected["default"])
    first = nodes[0].node
    assert first.text.startswith("Stars form") and first.start_char_idx == 0 and first.end_char_idx > 0
    assert first.relationships[NodeRelationship.SOURCE].node_id == "astro-001"
    assert first.metadata["explain"]["rerank"]["rank"] == 1
    # what an LLM sees: the title and the document's metadata, not Sift's bookkeeping
    shown = first.get_metadata_str(mode="llm")
    assert "How stars form" in shown and "explain" not in shown and "bundle" not in shown
    history = LlamaIndexRetriever(base, api_key=key, k=4, mode="dense", filters={"topic": "history"}).retrieve(FILTERED)
    _same([(n.node.node_id, n.score) for n in history], expected["filtered"])
    recipes = LlamaIndexRetriever(base, api_key=key, k=2, collection="recipes").retrieve("lemons and sugar")
    _same([(n.node.node_id, n.score) for n in recipes], expected["recipes"])
    for _ in range(2):  # each asyncio.run is another event loop
        nodes_async = asyncio.run(retriever.aretrieve(QUERY))
        _same([(n.node.node_id, n.score) for n in nodes_async], expected["default"])


def test_llama_index_401_raises(client_server):
    base, _ = client_server
    retriever = LlamaIndexRetriever(base, api_key="not-the-right-key-000", max_retries=0)
    with pytest.raises(AuthenticationError) as caught:
        retriever.retrieve(QUERY)
    assert caught.value.error_type == "unauthorized"
    with pytest.raises(AuthenticationError):
        asyncio.run(retriever.aretrieve(QUERY))


# -- Haystack ------------------------------------------------------------------------------------------------


def test_haystack_component_in_a_pipeline(client_server, expected):
    base, key = client_server
    pipeline = Pipeline()
    pipeline.add_component("retriever", HaystackRetriever(url=base, api_key=Secret.from_token(key), top_k=5))
    docs = pipeline.run({"retriever": {"query": QUERY}})["retriever"]["documents"]
    assert all(isinstance(d, HaystackDocument) for d in docs)
    _same([(d.id, d.score) for d in docs], expected["default"])
    assert docs[0].content.startswith("Stars form") and docs[0].meta["doc_id"] == "astro-001"
    assert docs[0].meta["explain"]["rerank"]["rank"] == 1 and docs[0].meta["end"] > docs[0].meta["start"]
    # the document's metadata is flat in `meta`, where Haystack's filters address it (`meta.topic`)
    assert docs[0].meta["topic"] == "astronomy" and "metadata" not in docs[0].meta
    # run(query, filters, top_k): Sift's filter form and Haystack's give the same hits
    component = HaystackRetriever(url=base, api_key=Secret.from_token(key), mode="dense")
    sift_form = component.run(FILTERED, filters={"topic": "history"}, top_k=4)["documents"]
    assert {d.meta["topic"] for d in sift_form} == {"history"}
    haystack_form = component.run(
        FILTERED, filters={"field": "meta.topic", "operator": "==", "value": "history"}, top_k=4
    )["documents"]
    _same([(d.id, d.score) for d in sift_form], expected["filtered"])
    assert [d.id for d in haystack_form] == [d.id for d in sift_form]
    recipes = HaystackRetriever(url=base, api_key=Secret.from_token(key), collection="recipes", top_k=2)
    _same([(d.id, d.score) for d in recipes.run("lemons and sugar")["documents"]], expected["recipes"])
    # the async pipeline path
    for _ in range(2):  # each asyncio.run is another event loop
        result = asyncio.run(pipeline.run_async({"retriever": {"query": QUERY}}))
        _same([(d.id, d.score) for d in result["retriever"]["documents"]], expected["default"])


def test_haystack_serializes_without_the_key_in_clear(client_server, monkeypatch, expected):
    base, key = client_server
    monkeypatch.setenv("SIFT_API_KEY", key)
    pipeline = Pipeline()
    pipeline.add_component("retriever", HaystackRetriever(url=base, top_k=5, mode="hybrid"))
    dumped = pipeline.dumps()
    assert key not in dumped and "SIFT_API_KEY" in dumped
    loaded = Pipeline.loads(dumped, allowed_modules=["sift_client.haystack"])  # Haystack 3 asks to trust it
    docs = loaded.run({"retriever": {"query": QUERY}})["retriever"]["documents"]
    _same([(d.id, d.score) for d in docs], expected["default"])


def test_haystack_401_is_a_pipeline_error_caused_by_the_client(client_server):
    base, _ = client_server
    pipeline = Pipeline()
    retriever = HaystackRetriever(url=base, api_key=Secret.from_token("not-the-right-key-000"), max_retries=0)
    pipeline.add_component("retriever", retriever)
    with pytest.raises(PipelineRuntimeError) as caught:
        pipeline.run({"retriever": {"query": QUERY}})
    cause = caught.value.__cause__
    assert isinstance(cause, AuthenticationError) and cause.error_type == "unauthorized"
    assert "retriever" in str(caught.value)


def test_haystack_filter_translation():
    assert sift_filters({"topic": ["a", "b"]}) == {"topic": ["a", "b"]}
    both = {
        "operator": "AND",
        "conditions": [
            {"field": "meta.topic", "operator": "in", "value": ["a", "b"]},
            {"field": "meta.kind", "operator": "==", "value": "note"},
        ],
    }
    assert sift_filters(both) == {"topic": ["a", "b"], "kind": "note"}
    with pytest.raises(ValueError, match="'>'"):
        sift_filters({"field": "meta.year", "operator": ">", "value": 1900})
    with pytest.raises(ValueError, match="'content'"):
        HaystackRetriever(filters={"field": "content", "operator": "==", "value": "x"})
    with pytest.raises(ValueError, match="OR"):
        sift_filters({"operator": "OR", "conditions": []})


# -- examples/rag_langchain.py ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_model_server():
    """A plain OpenAI-compatible model server (tests/openai_server.py: SmolLM2-135M-Instruct on uvicorn)."""
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="openai-server-", suffix=".log", delete=False)
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.openai_server", "--port", str(port), "--cache-dir", str(ROOT / "var" / "models")],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the model server did not start: {open(log.name).read()[-3000:]}")
            time.sleep(0.5)
        yield f"{base}/v1"
    finally:
        process.terminate()
        process.wait(timeout=30)
        os.unlink(log.name)


def test_rag_langchain_example_answers_with_citations(client_server, chat_model_server):
    base, key = client_server
    question = "How do stars form?"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "rag_langchain.py"),
            question,
            "--base-url",
            chat_model_server,
            "--model",
            "smollm2-135m-instruct",
            "--max-tokens",
            "64",
            "--json",
        ],
        env={**os.environ, "SIFT_URL": base, "SIFT_API_KEY": key, "OPENAI_API_KEY": "local"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout)
    # the passages are Sift's two-stage hits for the question, in order
    expected = raw_ids(base, key, query=question, k=4)
    assert out["retrieved"] == [pid for pid, _ in expected]
    assert out["answer"], "the model wrote nothing"
    for citation in out["citations"]:
        assert citation["passage_id"] == out["retrieved"][citation["n"] - 1]
        assert citation["end"] > citation["start"]


def readme_client_examples() -> list[str]:
    """The Python blocks of the README's "Python client and RAG frameworks" section, then the client package's
    README's, as written."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Python client and RAG frameworks", 1)[1].split("\n## ", 1)[0]
    package = (ROOT / "clients" / "python" / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```python\n(.*?)```", section, flags=re.S) + re.findall(
        r"```python\n(.*?)```", package, flags=re.S
    )


def test_readme_client_examples_run(client_server):
    """Each example of the README's client section, run as written against a real server (only the URL is
    changed; the key comes from SIFT_API_KEY, as the README says), prints the hits it promises."""
    base, key = client_server
    blocks = readme_client_examples()
    assert len(blocks) == 5, "the README shows the client, LangChain, LlamaIndex and Haystack; the package's the client"
    env = {**os.environ, "SIFT_API_KEY": key, "HAYSTACK_TELEMETRY_ENABLED": "False"}
    printed = []
    for block in blocks:
        assert "http://localhost:8000" in block
        run = subprocess.run(
            [sys.executable, "-c", block.replace("http://localhost:8000", base)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            cwd=ROOT,
        )
        assert run.returncode == 0, f"{block}\n{run.stderr[-2000:]}"
        lines = run.stdout.splitlines()
        assert lines and lines[0].startswith("astro-001"), f"{block}\nprinted: {run.stdout[:500]}"
        printed.append(run.stdout)
    # the plain client's example also pages (offsets 0, 5, ...) and answers
    assert "\n0 [" in printed[0] and "1889" in printed[0], printed[0]
    # the package's example answers (citing the Eiffel Tower's document) and streams to its done event
    assert "hist-013" in printed[4] and printed[4].splitlines()[-1] == "done", printed[4]
