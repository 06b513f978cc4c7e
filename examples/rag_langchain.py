"""Answer a question with citations: Sift retrieves (both stages), any OpenAI-compatible chat model writes.

    pip install "./clients/python[langchain]" langchain-openai   # from the repository root (`make install` has both)
    make run                                                 # Sift on :8000, in another terminal
    OPENAI_API_KEY=sk-... python examples/rag_langchain.py "How do stars form?" --model gpt-4o-mini
    # or a local model server (vLLM, llama.cpp, Ollama):
    python examples/rag_langchain.py "How do stars form?" --base-url http://127.0.0.1:11434/v1 --model llama3.2

A LangChain chain: Sift's retriever → a prompt that numbers the passages → the chat model → the answer, then
the passages it cites as [n] (with their Sift passage ids and character offsets). Sift's URL and key come from
--sift-url / SIFT_URL and SIFT_API_KEY; the model's from --base-url / OPENAI_BASE_URL and OPENAI_API_KEY.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from langchain_core.documents import Document
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda, RunnablePassthrough
from langchain_openai import ChatOpenAI
from sift_client.langchain import SiftRetriever

SYSTEM = (
    "Answer the question using only the numbered passages. Cite each passage you use as [n]. "
    "If the passages do not answer the question, say you do not know."
)
PROMPT = ChatPromptTemplate.from_messages([("system", SYSTEM), ("human", "{context}\n\nQuestion: {question}")])


def numbered(docs: list[Document]) -> str:
    return "\n\n".join(f"[{n}] {d.metadata['title']}\n{d.page_content}" for n, d in enumerate(docs, 1))


def cited(answer: str, docs: list[Document]) -> list[int]:
    """The passage numbers the answer cites, in order of first citation."""
    seen: list[int] = []
    for match in re.findall(r"\[(\d+)\]", answer):
        n = int(match)
        if 1 <= n <= len(docs) and n not in seen:
            seen.append(n)
    return seen


def main() -> int:
    parser = argparse.ArgumentParser(description="RAG with citations: Sift's search + an OpenAI-compatible model")
    parser.add_argument("question")
    parser.add_argument("--sift-url", default=os.environ.get("SIFT_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--collection", default=None, help="the Sift collection to search (default: the server's)")
    parser.add_argument("-k", type=int, default=4, help="passages given to the model")
    parser.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL"), help="the model server's /v1 URL")
    parser.add_argument("--model", default=os.environ.get("OPENAI_MODEL", "gpt-4o-mini"))
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args()

    retriever = SiftRetriever(base_url=args.sift_url, k=args.k, collection=args.collection)
    model = ChatOpenAI(
        model=args.model,
        base_url=args.base_url,
        api_key=os.environ.get("OPENAI_API_KEY") or "not-needed",  # local servers take any key
        temperature=0,
        max_tokens=args.max_tokens,
    )
    # retrieve once; the same passages feed the prompt and the citations
    prompt_input = RunnableLambda(lambda x: {"context": numbered(x["docs"]), "question": x["question"]})
    chain = RunnablePassthrough.assign(docs=lambda x: retriever.invoke(x["question"])).assign(
        answer=prompt_input | PROMPT | model | StrOutputParser()
    )
    result = chain.invoke({"question": args.question})
    docs, answer = result["docs"], result["answer"].strip()
    numbers = cited(answer, docs)
    sources = [
        {
            "n": n,
            "passage_id": docs[n - 1].id,
            "title": docs[n - 1].metadata["title"],
            "start": docs[n - 1].metadata["start"],
            "end": docs[n - 1].metadata["end"],
        }
        for n in numbers
    ]
    retrieved = [d.id for d in docs]
    if args.json:
        print(json.dumps({"question": args.question, "answer": answer, "citations": sources, "retrieved": retrieved}))
        return 0
    print(answer)
    print("\nSources:" if sources else "\nThe answer cites no passage; retrieved:")
    for s in sources:
        print(f"  [{s['n']}] {s['title']} ({s['passage_id']}, characters {s['start']}-{s['end']})")
    if not sources:
        for n, d in enumerate(docs, 1):
            print(f"  [{n}] {d.metadata['title']} ({d.id})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
