"""The one build pipeline (indexer/pipeline.py): no import cycle in the indexer, updates encode through the
engine, and sharded writes stream (each shard is finished as its documents arrive)."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest

from indexer.bm25 import BM25Index, index_bm25
from indexer.bundle import BM25_DIR, DENSE_DIR, DOCSTORE, open_bundle
from indexer.config import BM25Settings, DenseSettings, IndexConfig
from indexer.dense import INDEX_FILE
from indexer.docstore import Docstore
from indexer.models import Document, Passage, passage_id
from indexer.pipeline import LocalEncoding
from indexer.shards import ShardWriter, plan_shards, shard_name
from indexer.tokens import TokenForm, TokenStore
from tests.conftest import ROOT, write_jsonl

# -- the import graph -------------------------------------------------------------------------------------


def indexer_import_graph() -> dict[str, set[str]]:
    """indexer module → the indexer modules it imports, at any depth of its code (imports inside functions
    count too: a lazy import is still a cycle, only a hidden one)."""
    graph: dict[str, set[str]] = {}
    for path in sorted((ROOT / "indexer").glob("*.py")):
        module = f"indexer.{path.stem}" if path.stem != "__init__" else "indexer"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.ImportFrom):  # relative: from . import x / from .x import y
                names = [f"indexer.{node.module}" if node.module else "indexer"]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            edges |= {name for name in names if name.startswith("indexer.") and name.count(".") == 1}
        edges.discard(module)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` (a list of modules, first = last), or None when it is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_indexer_has_no_import_cycle() -> None:
    graph = indexer_import_graph()
    assert {"indexer.build", "indexer.update", "indexer.pipeline", "indexer.shards"} <= graph.keys()
    assert find_cycle(graph) is None, " → ".join(find_cycle(graph) or [])
    assert "indexer.build" not in graph["indexer.update"] and "indexer.update" not in graph["indexer.build"]
    # the check finds a cycle when there is one (a lazy import included)
    assert find_cycle({**graph, "indexer.pipeline": graph["indexer.pipeline"] | {"indexer.build"}}) is not None


# -- updates go through the engine ------------------------------------------------------------------------


class RecordingEngine(LocalEncoding):
    """The local engine, recording what it was asked to encode."""

    def __init__(self) -> None:
        super().__init__()
        self.texts: list[str] = []
        self.closed = False

    def encode(self, texts, settings, progress, tokens):  # noqa: ANN001, ANN201
        self.texts.extend(texts)
        return super().encode(texts, settings, progress, tokens)

    def close(self) -> None:
        self.closed = True
        super().close()


def _contents(out: Path) -> dict:
    info = open_bundle(out, verify=True)
    store = Docstore(info.path(DOCSTORE))
    rows = store.passage_texts()
    store.close()
    config = IndexConfig.model_validate(info.manifest["config"])
    bm25 = BM25Index.load(info.path(BM25_DIR), config.bm25, mmap=False)
    index = faiss.read_index(str(info.path(DENSE_DIR) / INDEX_FILE))
    tokens = TokenStore.open(info.path(DENSE_DIR), len(rows))
    return {
        "manifest": info.manifest,
        "rows": rows,
        "bm25": np.stack([bm25.scores(q) for q in ("how do stars form", "zebra migration", "tea")]),
        "vectors": index.reconstruct_n(0, index.ntotal),
        "tokens": tokens,
    }


def test_an_update_encodes_its_new_passages_through_the_engine(example_index, tmp_path) -> None:
    docs = [json.loads(line) for line in (ROOT / "examples" / "corpus.jsonl").read_text().splitlines()]
    changed = {**docs[5], "text": docs[5]["text"] + " Zebras also migrate here every year."}
    added = {"_id": "new-001", "title": "Zebra migration", "text": "Zebras migrate across the Serengeti."}
    write_jsonl(tmp_path / "add.jsonl", [changed, added, docs[7]])  # docs[7] is sent again unchanged
    (tmp_path / "delete.txt").write_text(docs[2]["_id"] + "\n")
    from indexer.update import update_bundle

    results = {}
    for name, engine in (("default", None), ("engine", RecordingEngine())):
        out = tmp_path / name
        shutil.copytree(example_index, out, symlinks=True)
        update_bundle(out, tmp_path / "add.jsonl", tmp_path / "delete.txt", show_progress=False, engine=engine)
        results[name] = _contents(out)
    default, recorded = results["default"], results["engine"]
    # the engine encoded exactly the changed and added passages (one each), nothing kept or resent
    assert engine.texts == [f"{changed['title']} {changed['text']}", f"{added['title']} {added['text']}"]
    assert engine.closed
    update = recorded["manifest"]["update"]
    assert update == default["manifest"]["update"]
    assert (update["added"], update["changed"], update["deleted"], update["unchanged_resent"]) == (1, 1, 1, 1)
    assert update["passages_encoded"] == 2 and update["passages_reused"] == len(recorded["rows"]) - 2
    assert recorded["manifest"]["engine"] == default["manifest"]["engine"] == {"name": "local"}
    # the same build as the default update: passages, BM25 scores, vectors, token vectors
    assert recorded["rows"] == default["rows"] and recorded["rows"][-1][0] == "new-001#0"
    np.testing.assert_allclose(recorded["bm25"], default["bm25"], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(recorded["vectors"], default["vectors"])
    np.testing.assert_array_equal(recorded["tokens"].offsets, default["tokens"].offsets)
    np.testing.assert_array_equal(np.asarray(recorded["tokens"].data), np.asarray(default["tokens"].data))
    assert recorded["manifest"]["dense"] == default["manifest"]["dense"]
    # kept passages keep the parent's vectors exactly
    parent = _contents(example_index)
    kept = {pid: i for i, (pid, _, _) in enumerate(parent["rows"])}
    row = next(i for i, (pid, _, _) in enumerate(recorded["rows"]) if pid in kept and pid.startswith(docs[9]["_id"]))
    np.testing.assert_array_equal(recorded["vectors"][row], parent["vectors"][kept[recorded["rows"][row][0]]])


def test_an_update_that_only_deletes_starts_no_engine(example_index, tmp_path) -> None:
    from indexer.update import update_bundle

    class Unstartable(LocalEncoding):
        def start(self, config):  # noqa: ANN001, ANN201
            raise AssertionError("nothing to encode: the engine must not start")

    out = tmp_path / "index"
    shutil.copytree(example_index, out, symlinks=True)
    doc_id = Docstore(open_bundle(out).path(DOCSTORE)).passage_rows()[0][1]
    (tmp_path / "delete.txt").write_text(doc_id + "\n")
    result = update_bundle(out, delete=tmp_path / "delete.txt", show_progress=False, engine=Unstartable())
    manifest = open_bundle(out).manifest
    parent = open_bundle(example_index).manifest
    assert manifest["update"]["passages_encoded"] == 0 and result.documents == parent["counts"]["documents"] - 1
    assert {k: manifest["dense"][k] for k in ("max_seq_length", "runtime", "encoded_on")} == {
        k: parent["dense"][k] for k in ("max_seq_length", "runtime", "encoded_on")
    }


# -- sharded writes stream --------------------------------------------------------------------------------

WORDS = "star tide coral bread yeast river stone cloud light graph commit zebra tea moon sun".split()


def _synthetic(n: int) -> list[tuple[Document, list[Passage], list[str]]]:
    rng = np.random.default_rng(7)
    out = []
    for i in range(n):
        doc = Document(f"d{i}", f"title {i}", "", {"i": i})
        texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 12)))) for _ in range(int(rng.integers(1, 4)))]
        passages = [Passage(passage_id(doc.id, j), doc.id, j, t, 0, len(t)) for j, t in enumerate(texts)]
        out.append((doc, passages, [f"{doc.title} {t}" for t in texts]))
    return out


def test_shard_writer_streams_and_finishes_each_shard_as_its_documents_arrive(tmp_path) -> None:
    corpus = _synthetic(40)
    sizes = [len(p) for _, p, _ in corpus]
    config = IndexConfig(dense=DenseSettings(token_vectors="float16"))
    writer = ShardWriter(tmp_path, sizes, 3, config, "b1", token_form=TokenForm("float16"))
    ranges = plan_shards(sizes, 3)
    rng = np.random.default_rng(3)
    all_vectors, all_texts, all_tokens = [], [], []
    for d, (document, passages, texts) in enumerate(corpus):
        vectors = rng.standard_normal((len(passages), 8)).astype(np.float32)
        for _ in passages:  # an engine appends each passage's token vectors, then the pipeline adds the rows
            tokens = rng.standard_normal((int(rng.integers(2, 6)), 8)).astype(np.float32)
            writer.tokens.add(tokens)
            all_tokens.append(tokens)
        writer.add([(document, passages)], texts, vectors)
        all_vectors.append(vectors)
        all_texts.extend(texts)
        if d + 1 == ranges[0][1]:  # shard 0 is complete: written and its memory released, shard 2 not begun
            shard = tmp_path / shard_name(0)
            assert (shard / DENSE_DIR / INDEX_FILE).is_file() and Docstore(shard / DOCSTORE).num_documents == d + 1
            assert not (tmp_path / shard_name(2)).exists()
            assert all(s.vectors == [] for s in writer._done)
    entry = writer.finish({"enabled": True, "dimension": 8})
    assert [e["name"] for e in entry["map"]] == [shard_name(i) for i in range(3)]
    assert entry["bm25"]["documents"] == len(all_texts)
    vectors = np.concatenate(all_vectors)
    bm25 = BM25Settings()
    whole = index_bm25(all_texts, bm25)
    query = ["star", "zebra"]
    expected = np.asarray(whole.get_scores(query), dtype=np.float32)
    got = []
    for e in entry["map"]:
        info = open_bundle(tmp_path / e["name"], verify=True)
        assert info.manifest["shard"]["offset"] == e["offset"] and info.manifest["dense"]["token_vectors"]
        lo, hi = e["offset"], e["offset"] + e["passages"]
        index = faiss.read_index(str(info.path(DENSE_DIR) / INDEX_FILE))
        np.testing.assert_array_equal(index.reconstruct_n(0, index.ntotal), vectors[lo:hi])
        store = TokenStore.open(info.path(DENSE_DIR), e["passages"])
        for row in (lo, hi - 1):
            want = all_tokens[row] / np.linalg.norm(all_tokens[row], axis=1, keepdims=True)
            np.testing.assert_allclose(store.vectors(row - lo), want, atol=2e-3)
        got.append(BM25Index.load(info.path(BM25_DIR), bm25, mmap=False).model.get_scores(query))
    np.testing.assert_allclose(np.concatenate(got), expected, rtol=0, atol=1e-5)


def test_shard_writer_refuses_a_corpus_that_is_not_the_planned_one(tmp_path) -> None:
    corpus = _synthetic(6)
    sizes = [len(p) for _, p, _ in corpus]
    writer = ShardWriter(tmp_path / "a", [*sizes[:2], sizes[2] + 1, *sizes[3:]], 2, IndexConfig(), "b")
    (tmp_path / "a").mkdir()
    writer.add([(d, p) for d, p, _ in corpus[:2]], [t for _, _, ts in corpus[:2] for t in ts], None)
    with pytest.raises(ValueError, match="input changed during the build"):
        writer.add([(corpus[2][0], corpus[2][1])], corpus[2][2], None)
    short = ShardWriter(tmp_path / "b", sizes, 2, IndexConfig(), "b")
    (tmp_path / "b").mkdir()
    short.add([(d, p) for d, p, _ in corpus[:3]], [t for _, _, ts in corpus[:3] for t in ts], None)
    with pytest.raises(ValueError, match="3 of the 6 planned documents"):
        short.finish({"enabled": False})


@pytest.mark.parametrize("dtype", ["int8", "float16"])
def test_stored_token_vectors_are_copied_exactly_through_the_file(tmp_path, monkeypatch, dtype) -> None:
    import indexer.tokens as tokens_module
    from indexer.tokens import TokenWriter

    rng = np.random.default_rng(5)
    with TokenWriter(tmp_path / "source", dtype) as writer:
        for length in (3, 1, 4, 2, 5, 1, 3, 2):
            writer.add(rng.standard_normal((length, 8)).astype(np.float32))
        writer.close()
    source = TokenStore.open(tmp_path / "source", 8)
    monkeypatch.setattr(tokens_module, "COPY_CHUNK", 24)  # a few rows per read: runs span several chunks
    rows = [3, 4, 5, 0, 7, 7, 1]  # adjacent runs, a jump back, a repeat
    with TokenWriter(tmp_path / "copy", dtype) as writer:
        writer.add_stored(source, rows[:4])
        writer.add_stored(source, [])
        writer.add_stored(source, rows[4:])
        writer.close()
    copy = TokenStore.open(tmp_path / "copy", len(rows))
    for i, row in enumerate(rows):
        start, end = int(source.offsets[row]), int(source.offsets[row + 1])
        np.testing.assert_array_equal(copy.data[copy.offsets[i] : copy.offsets[i + 1]], source.data[start:end])
        np.testing.assert_array_equal(copy.vectors(i), source.vectors(row))


def test_update_takes_the_builds_engine_option(tmp_path):
    """`sift index update --engine` is the build's option (one engine setup for both commands)."""
    from typer.testing import CliRunner

    from indexer.cli import app

    result = CliRunner().invoke(app, ["update", "--out", str(tmp_path), "--engine", "spark"])
    assert result.exit_code == 2 and "--engine must be local or ray" in result.output
