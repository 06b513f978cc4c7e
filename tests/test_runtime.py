"""Model runtimes (indexer/runtime.py): every encoder Sift runs loads under ONNX Runtime fp32 and dynamic
int8, agrees with torch, and a corrupt or mismatched export is refused. Also the query-embedding cache."""

from __future__ import annotations

import functools
import json
import os
import shutil

import numpy as np
import pytest

from tests.conftest import EXAMPLES, ROOT

RUNTIMES = ("torch-bf16", "onnx", "onnx-int8")
EXACT = ("torch-bf16", "onnx")  # the same top-10 as torch float32; int8 see below
RERANKER = "models/sift-reranker-minilm-l6"
READER = "models/sift-reader-minilm-l6"
QUERIES = [
    "how do stars form",
    "what happens when a star runs out of fuel",
    "causes of inflation",
    "how do vaccines work",
    "photosynthesis in plants",
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One export cache for the module: each (model, runtime) is exported once, as in production."""
    return tmp_path_factory.mktemp("runtimes")


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    records = [json.loads(line) for line in EXAMPLES.read_text(encoding="utf-8").splitlines()]
    return [f"{r['title']} {r['text']}" for r in records[:60]]


def top(vectors: np.ndarray, queries: np.ndarray, k: int = 10) -> list[list[int]]:
    return [list(np.argsort(-(vectors @ q), kind="stable")[:k]) for q in queries]


def same_top(ref: np.ndarray, got: np.ndarray, tie: float, k: int = 10) -> bool:
    """The same top-k documents, except for ties at the cut-off: a document may enter or leave the top k
    only if torch scores it within `tie` of torch's k-th score (reduced precision reorders near-ties)."""
    ref_top = set(np.argsort(-ref, kind="stable")[:k])
    got_top = set(np.argsort(-got, kind="stable")[:k])
    cut = np.sort(ref)[::-1][k - 1]
    return all(abs(ref[i] - cut) <= tie for i in ref_top ^ got_top)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_bi_encoder_runtime_agrees_with_torch(runtime, cache_dir, corpus, encoder):
    from indexer.encoders import load_encoder

    model = load_encoder("default", "cpu", runtime, cache_dir=cache_dir)
    assert model.sift_runtime == runtime
    assert type(model[0].model).__name__ == ("BertModel" if runtime == "torch-bf16" else "OnnxModule")
    assert model[0].model.agreement >= 0.99
    ref_p = encoder.encode(corpus, normalize_embeddings=True)
    ref_q = encoder.encode(QUERIES, normalize_embeddings=True)
    got_p = model.encode(corpus, normalize_embeddings=True)
    got_q = model.encode(QUERIES, normalize_embeddings=True)
    cos = np.concatenate([(ref_p * got_p).sum(1), (ref_q * got_q).sum(1)])
    assert cos.min() >= (0.9999 if runtime == "onnx" else 0.98), cos.min()
    assert cos.mean() >= (0.9999 if runtime == "onnx" else 0.99), cos.mean()
    if runtime == "onnx":
        assert top(got_p, got_q) == top(ref_p, ref_q)  # fp32: the same ranking, order included
    else:  # the same top-10 documents, near-ties at rank 10 (cosines within 0.01) excepted
        assert all(same_top(ref_p @ q, got_p @ g, tie=0.01) for q, g in zip(ref_q, got_q))
    # the query path's direct encoder (tokenizer → session → numpy pooling) gives the wrapper's vectors, for a
    # single query and for a batch longer than its chunk, in order; torch runtimes keep the wrapper's path
    from indexer.encoders import unit_rows
    from indexer.runtime import DirectEncoder

    direct = DirectEncoder.of(model)
    if runtime == "torch-bf16":
        assert direct is None
    else:
        assert direct is not None
        many = QUERIES + corpus[:40]
        wrapped = model.encode(many, normalize_embeddings=True)
        # (dynamic int8 scales activations per batch, so other batches give slightly other vectors)
        batched = float((unit_rows(direct.encode(many, batch_size=8)) * wrapped).sum(1).min())
        assert batched >= (0.9999 if runtime == "onnx" else 0.98), batched
        for query in QUERIES:  # one query alone, as the server encodes it: the same input, the same vector
            one = float(
                (unit_rows(direct.encode([query]))[0] * model.encode([query], normalize_embeddings=True)[0]).sum()
            )
            assert one >= 0.9999, (query, one)
    # MaxSim runs on the same encoder: its token vectors come from the ONNX session too
    tokens = model.encode(["how do stars form"], output_value="token_embeddings")[0]
    ref_tokens = encoder.encode(["how do stars form"], output_value="token_embeddings")[0]
    assert tokens.shape == ref_tokens.shape
    assert float(np.corrcoef(tokens.float().numpy().ravel(), ref_tokens.numpy().ravel())[0, 1]) >= 0.99


@functools.cache
def reranker(runtime: str, cache_dir) -> object:  # noqa: ANN001
    """Each cross-encoder runtime loaded once for the module's tests."""
    from app.retrieval.reranker import Reranker

    loaded = Reranker.load(RERANKER, 128, "cpu", runtime=runtime, cache_dir=cache_dir)
    assert loaded.runtime == runtime
    return loaded


def cross_encoder_rankings(runtime: str, cache_dir, corpus: list[str]):  # noqa: ANN001, ANN201
    for query in QUERIES:
        pairs = [(query, passage) for passage in corpus[:30]]
        yield reranker("torch", cache_dir).score(pairs), reranker(runtime, cache_dir).score(pairs)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_cross_encoder_runtime_agrees_with_torch(runtime, cache_dir, corpus):
    for ref, got in cross_encoder_rankings(runtime, cache_dir, corpus):
        assert cosine(ref, got) >= 0.99
        ref_top = list(np.argsort(-ref, kind="stable")[:10])
        got_top = list(np.argsort(-got, kind="stable")[:10])
        assert got_top[0] == ref_top[0]
        if runtime == "onnx":
            assert np.allclose(ref, got, atol=1e-3) and got_top == ref_top
        elif runtime in EXACT:  # near-ties at rank 10 (logits within 0.1) excepted
            assert same_top(ref, got, tie=0.1)


@pytest.mark.xfail(
    strict=True,
    reason="known limitation: dynamic int8 keeps cosine >= 0.99 but moves candidates across rank 10 that torch "
    "scores apart by more than 0.1; int8 is therefore not the default cross-encoder runtime (docs/benchmarks.md)",
)
def test_int8_cross_encoder_keeps_the_top_10(cache_dir, corpus):
    for ref, got in cross_encoder_rankings("onnx-int8", cache_dir, corpus):
        assert same_top(ref, got, tie=0.1)


@pytest.fixture(scope="module")
def torch_reader():
    from app.generation.reader import ExtractiveReader

    return ExtractiveReader.load(READER, "cpu")


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_reader_runtime_agrees_with_torch(runtime, cache_dir, corpus, torch_reader):
    from app.generation.reader import ExtractiveReader

    reader = ExtractiveReader.load(READER, "cpu", runtime=runtime, cache_dir=cache_dir)
    assert reader.runtime == runtime
    questions = ["At what temperature does hydrogen fusion begin?", "What do stars form inside?"]
    contexts = [corpus[0], corpus[0]]
    ref_start, ref_end, _, _ = torch_reader.logits(questions, contexts)
    start, end, _, _ = reader.logits(questions, contexts)
    assert list(start.argmax(1)) == list(ref_start.argmax(1))
    assert list(end.argmax(1)) == list(ref_end.argmax(1))
    assert float(np.corrcoef(start.ravel(), ref_start.ravel())[0, 1]) >= 0.99


def test_corrupt_export_is_refused(cache_dir, tmp_path):
    from indexer.encoders import load_encoder
    from indexer.runtime import RuntimeMismatch, export_folder, weights_fingerprint

    torch_model = load_encoder("default", "cpu")
    load_encoder("default", "cpu", "onnx", cache_dir=cache_dir)  # exported (or found) in the module cache
    folder = export_folder(weights_fingerprint(torch_model[0].model), "feature-extraction", "onnx", cache_dir)
    assert (folder / "meta.json").is_file()
    copy = tmp_path / "cache"
    shutil.copytree(folder, copy / folder.name)
    onnx_file = copy / folder.name / "model.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the weights
    onnx_file.write_bytes(bytes(data))
    with pytest.raises(RuntimeMismatch, match="corrupt or replaced"):
        load_encoder("default", "cpu", "onnx", cache_dir=copy)
    (copy / folder.name / "meta.json").write_text("{not json")
    with pytest.raises(RuntimeMismatch, match="unreadable"):
        load_encoder("default", "cpu", "onnx", cache_dir=copy)


def test_mismatched_export_is_refused(cache_dir, tmp_path):
    """An intact export of *other* weights placed where this model's export belongs (a stale or swapped
    cache) loads fine but disagrees with the torch model on the probes: refused."""
    import torch

    from indexer.encoders import load_encoder
    from indexer.runtime import RuntimeMismatch, export_folder, weights_fingerprint

    load_encoder("default", "cpu", "onnx", cache_dir=cache_dir)
    changed = load_encoder("default", "cpu")
    good = export_folder(weights_fingerprint(changed[0].model), "feature-extraction", "onnx", cache_dir)
    assert (good / "meta.json").is_file()
    with torch.no_grad():  # another model: the last layer's feed-forward weights scrambled
        weight = changed[0].model.encoder.layer[-1].output.dense.weight
        weight.copy_(weight[torch.randperm(weight.shape[0], generator=torch.Generator().manual_seed(0))])
    target = export_folder(weights_fingerprint(changed[0].model), "feature-extraction", "onnx", tmp_path)
    shutil.copytree(good, target)
    from indexer.runtime import use_runtime

    with pytest.raises(RuntimeMismatch, match="agrees with torch at cosine"):
        use_runtime(changed, "feature-extraction", "onnx", cache_dir=tmp_path)


def test_unknown_runtime_is_refused():
    from indexer.runtime import resolve_runtime

    with pytest.raises(ValueError, match="unknown runtime 'tensorrt'"):
        resolve_runtime("tensorrt", "cpu")
    assert resolve_runtime("onnx-int8", "cuda:0") == "torch-fp16"  # a GPU keeps torch, in fp16
    assert resolve_runtime("torch", "cuda:0") == "torch"


def test_build_records_runtime_and_server_reports_it(cache_dir, tmp_path, monkeypatch):
    from app.services import load_pipeline
    from app.settings import load_settings
    from indexer.build import build_bundle
    from indexer.bundle import open_bundle
    from indexer.config import IndexConfig

    monkeypatch.setenv("SIFT_RUNTIME_CACHE", str(cache_dir))
    config = IndexConfig(dense={"runtime": "onnx"})
    build_bundle(EXAMPLES, tmp_path / "index", config, show_progress=False)
    manifest = open_bundle(tmp_path / "index").manifest
    assert manifest["dense"]["runtime"] == "onnx"
    assert manifest["config"]["dense"]["runtime"] == "onnx"
    settings = load_settings(
        bundle=tmp_path / "index", reranker={"model": None}, runtime={"queries": "onnx-int8", "cache_dir": cache_dir}
    )
    pipeline = load_pipeline(settings)
    assert pipeline.runtimes() == {"passages": "onnx", "queries": "onnx-int8", "reranker": None, "maxsim": None}
    hits, _ = pipeline.coarse(["how do stars form"], pipeline.options(mode="dense", k=3, rerank=False))
    assert hits[0][0].doc_id == "astro-001"


def test_query_cache_returns_identical_vectors_and_counts(encoder):
    from app.retrieval.cache import QueryCache

    calls: list[list[str]] = []

    def encode(texts: list[str]) -> np.ndarray:
        calls.append(list(texts))
        return encoder.encode(texts, normalize_embeddings=True)

    cache = QueryCache(size=3)
    key = ("minilm", "torch", True)
    first = cache.encode(key, ["how do stars form", "causes of inflation"], encode)
    again = cache.encode(key, ["how do stars form", "  how do   stars form ", "causes of inflation"], encode)
    assert calls == [["how do stars form", "causes of inflation"]]  # the second call encoded nothing
    assert np.array_equal(again[0], first[0]) and np.array_equal(again[1], first[0])
    assert np.array_equal(again[2], first[1])
    assert (cache.hits, cache.misses) == (3, 2)
    again[0][:] = 0  # callers get copies
    assert np.array_equal(cache.encode(key, ["how do stars form"], encode)[0], first[0])
    cache.encode(key, ["a", "b"], encode)  # LRU: size 3 keeps the 3 most recent
    assert len(cache) == 3
    cache.encode(key, ["causes of inflation"], encode)
    assert calls[-1] == ["causes of inflation"]  # evicted, so encoded again
    other = cache.encode(("other-model", "torch", True), ["a"], encode)  # another model never hits
    assert calls[-1] == ["a"] and np.array_equal(other[0], encode(["a"])[0])


def test_share_cores_sets_the_servers_thread_policy(tmp_path):
    """A server's thread policy (`indexer.runtime.share_cores`, applied by `Models.warm_up`): numpy's BLAS on
    one thread and FAISS's own BLAS left alone; ONNX Runtime sessions opened afterwards do not spin-wait,
    sessions opened before it kept ONNX Runtime's default. Run in a fresh process: the policy is per process."""
    import subprocess
    import sys

    code = r"""
import json, numpy, faiss, onnx, onnxruntime
from onnx import TensorProto, helper
from threadpoolctl import threadpool_info
from indexer.runtime import OnnxModel, share_cores

graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["last_hidden_state"])], "g",
    [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [None, None])],
    [helper.make_tensor_value_info("last_hidden_state", TensorProto.INT64, [None, None])])
path = "%s"
onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
before = OnnxModel(path, None, "onnx", 2)
blas = lambda: {"numpy" if "numpy" in i["filepath"] else "faiss" if "faiss" in i["filepath"] else "other": i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}
blas_before = blas()
applied = share_cores(spin_wait=False, blas_threads=1)
after = OnnxModel(path, None, "onnx", 2)
def spin(m):
    try:
        return m.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
    except RuntimeError:  # not set: ONNX Runtime's default (spinning)
        return "default"
print(json.dumps({"applied": applied, "before": spin(before), "after": spin(after),
    "blas_before": blas_before, "blas_after": blas(),
    "out": after.run({"input_ids": numpy.array([[1, 2]])})[0].tolist()}))
""" % (tmp_path / "identity.onnx")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["applied"] == {"onnx_spin_wait": False, "numpy_blas_threads": 1}
    assert report["before"] == "default" and report["after"] == "0"  # only sessions opened after the policy
    assert report["blas_after"]["numpy"] == 1
    assert report["blas_before"]["numpy"] > 1 or (os.cpu_count() or 1) == 1  # it was numpy's default before
    assert report["blas_after"]["faiss"] == report["blas_before"]["faiss"]  # FAISS's own BLAS: not touched
    assert report["out"] == [[1, 2]]  # the session still runs
