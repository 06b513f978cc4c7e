"""Model runtimes (indexer/runtime.py): every encoder Sift runs loads under ONNX Runtime fp32 and dynamic
int8, agrees with torch, and a corrupt or mismatched export is refused. Also the query-embedding cache.

Nothing here depends on the CPU's features: where a runtime falls back (torch-bf16 without native bf16, int8's
7-bit weights without VNNI), the tests expect the documented fallback, its log line and its tolerance. Run the
file under `SIFT_CPU_MASK=baseline` to take the fallback paths on any CPU (`make test-cpu-baseline`)."""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import EXAMPLES, ROOT

RUNTIMES = ("torch-bf16", "onnx", "onnx-int8")
EXACT = ("torch-bf16", "onnx")  # the same top-10 as torch float32; int8 see below
# int8 bi-encoder top-10 against torch: documents may cross rank 10 only within `tie` (cosine) of torch's 10th
# score, and at least `keep` of the 10 stay. With VNNI (8-bit weights) as before; without VNNI, the documented
# 7-bit fallback measured in indexer.runtime._quantize (worst crossing 0.0143 on this set, 9 of 10 kept)
INT8_TOP10 = {"vnni": {"tie": 0.01, "keep": 0}, "reduce_range": {"tie": 0.02, "keep": 8}}
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


def same_top(ref: np.ndarray, got: np.ndarray, tie: float, k: int = 10, keep: int = 0) -> bool:
    """The same top-k documents, except for ties at the cut-off: a document may enter or leave the top k
    only if torch scores it within `tie` of torch's k-th score (reduced precision reorders near-ties), and at
    least `keep` of the k stay."""
    ref_top = set(np.argsort(-ref, kind="stable")[:k])
    got_top = set(np.argsort(-got, kind="stable")[:k])
    cut = np.sort(ref)[::-1][k - 1]
    return len(ref_top & got_top) >= keep and all(abs(ref[i] - cut) <= tie for i in ref_top ^ got_top)


def fallback_reason(flags: tuple[str, ...]) -> str:
    """The reason `indexer.runtime` logs for lacking all of `flags`, from /proc/cpuinfo and SIFT_CPU_MASK."""
    from indexer.runtime import _proc_cpu_flags

    present = [flag for flag in flags if flag in _proc_cpu_flags()]
    if present:  # the CPU has them: only the mask can hide them, and the reason names the ones it hid
        assert os.environ.get("SIFT_CPU_MASK"), "a fallback on a CPU that has the flags, without a mask"
        return f"{'/'.join(present)} hidden by SIFT_CPU_MASK="
    return f"this CPU has no {'/'.join(flags)}"


def loaded_as_documented(runtime: str, loaded: str, logged: str) -> str:
    """Check that a model loaded for `runtime` runs what `resolve_runtime` documents for this CPU, and that its
    load logged each fallback with its reason (`logged`: the log text of the load); returns what runs."""
    from indexer.runtime import BF16_FLAGS, VNNI_FLAGS, cpu_isa, int8_reduce_range, resolve_runtime

    expected = resolve_runtime(runtime, "cpu")  # torch-bf16 without native bf16: torch
    assert loaded == expected
    if expected != runtime:
        assert runtime == "torch-bf16" and expected == "torch"
        reason = f"running torch-bf16 as torch: no native bfloat16 ({fallback_reason(BF16_FLAGS)}"
        assert reason in logged, logged
    if runtime == "onnx-int8" and int8_reduce_range(cpu_isa()):
        reason = f"onnx-int8 quantises weights to 7 bits (reduce_range): no VNNI ({fallback_reason(VNNI_FLAGS)}"
        assert reason in logged, logged
    return expected


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_bi_encoder_runtime_agrees_with_torch(runtime, cache_dir, corpus, encoder, caplog):
    from indexer.encoders import load_encoder
    from indexer.runtime import cpu_isa, int8_reduce_range

    with caplog.at_level(logging.INFO, logger="indexer.runtime"):
        model = load_encoder("default", "cpu", runtime, cache_dir=cache_dir)
    actual = loaded_as_documented(runtime, model.sift_runtime, caplog.text)  # without native bf16: torch
    exact = actual in ("torch", "onnx")  # float32: torch's own vectors
    assert type(model[0].model).__name__ == ("BertModel" if actual.startswith("torch") else "OnnxModule")
    assert actual == "torch" or model[0].model.agreement >= 0.99  # verified at load unless torch itself
    ref_p = encoder.encode(corpus, normalize_embeddings=True)
    ref_q = encoder.encode(QUERIES, normalize_embeddings=True)
    got_p = model.encode(corpus, normalize_embeddings=True)
    got_q = model.encode(QUERIES, normalize_embeddings=True)
    cos = np.concatenate([(ref_p * got_p).sum(1), (ref_q * got_q).sum(1)])
    assert cos.min() >= (0.9999 if exact else 0.98), cos.min()
    assert cos.mean() >= (0.9999 if exact else 0.99), cos.mean()
    if exact:
        assert top(got_p, got_q) == top(ref_p, ref_q)  # fp32: the same ranking, order included
    else:  # the same top-10 documents, near-ties at rank 10 excepted (bf16: cosines within 0.01)
        tolerance = {"tie": 0.01}
        if actual == "onnx-int8":
            tolerance = INT8_TOP10["reduce_range" if int8_reduce_range(cpu_isa()) else "vnni"]
        for q, g in zip(ref_q, got_q):
            ref, got = ref_p @ q, got_p @ g
            ref_top, got_top = set(np.argsort(-ref, kind="stable")[:10]), set(np.argsort(-got, kind="stable")[:10])
            margins = sorted(round(float(abs(ref[i] - np.sort(ref)[-10])), 4) for i in ref_top ^ got_top)
            print(f"{actual} on {cpu_isa()}: {len(ref_top & got_top)}/10 kept, crossings at {margins}")
            assert same_top(ref, got, **tolerance), (tolerance, margins)
    # the query path's direct encoder (tokenizer → session → numpy pooling) gives the wrapper's vectors, for a
    # single query and for a batch longer than its chunk, in order; torch runtimes keep the wrapper's path
    from app.retrieval.queries import DirectEncoder
    from indexer.encoders import unit_rows

    direct = DirectEncoder.of(model)
    if actual.startswith("torch"):
        assert direct is None
    else:
        assert direct is not None
        many = QUERIES + corpus[:40]
        wrapped = model.encode(many, normalize_embeddings=True)
        # (dynamic int8 scales activations per batch, so other batches give slightly other vectors)
        batched = float((unit_rows(direct.encode(many, batch_size=8)) * wrapped).sum(1).min())
        assert batched >= (0.9999 if exact else 0.98), batched
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
def loaded_reranker(runtime: str, cache_dir) -> tuple[object, str]:  # noqa: ANN001
    """Each cross-encoder runtime loaded once for the module's tests, with what `indexer.runtime` logged."""
    from app.retrieval.reranker import Reranker

    records: list[logging.LogRecord] = []
    handler, logger = logging.Handler(logging.INFO), logging.getLogger("indexer.runtime")
    handler.emit = records.append
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        loaded = Reranker.load(RERANKER, 128, "cpu", runtime=runtime, cache_dir=cache_dir)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return loaded, "\n".join(record.getMessage() for record in records)


def reranker(runtime: str, cache_dir) -> object:  # noqa: ANN001
    loaded, logged = loaded_reranker(runtime, cache_dir)
    loaded_as_documented(runtime, loaded.runtime, logged)
    return loaded


def cross_encoder_rankings(runtime: str, cache_dir, corpus: list[str]):  # noqa: ANN001, ANN201
    for query in QUERIES:
        pairs = [(query, passage) for passage in corpus[:30]]
        yield reranker("torch", cache_dir).score(pairs), reranker(runtime, cache_dir).score(pairs)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_cross_encoder_runtime_agrees_with_torch(runtime, cache_dir, corpus):
    actual = reranker(runtime, cache_dir).runtime  # torch-bf16 without native bf16: torch
    for ref, got in cross_encoder_rankings(runtime, cache_dir, corpus):
        assert cosine(ref, got) >= 0.99
        ref_top = list(np.argsort(-ref, kind="stable")[:10])
        got_top = list(np.argsort(-got, kind="stable")[:10])
        assert got_top[0] == ref_top[0]
        if actual in ("torch", "onnx"):  # float32 (torch-bf16 without native bf16 runs as torch)
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
def test_reader_runtime_agrees_with_torch(runtime, cache_dir, corpus, torch_reader, caplog):
    from app.generation.reader import ExtractiveReader

    with caplog.at_level(logging.INFO, logger="indexer.runtime"):
        reader = ExtractiveReader.load(READER, "cpu", runtime=runtime, cache_dir=cache_dir)
    loaded_as_documented(runtime, reader.runtime, caplog.text)  # torch-bf16 without native bf16: torch
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


# a CPU with every feature Sift looks for (AVX-512 VNNI and BF16, AMX, AVX-VNNI)
EVERYTHING = frozenset(
    "fpu sse4_2 avx avx2 fma f16c avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile avx_vnni".split()
)
FALLBACK_MASKS = ("avx512_bf16,amx_bf16,avx512_vnni,avx_vnni", "baseline")


@pytest.mark.parametrize("mask", FALLBACK_MASKS)
def test_cpu_mask_forces_the_no_bf16_no_vnni_fallbacks(mask, monkeypatch, caplog, tmp_path):
    """`SIFT_CPU_MASK` hides CPU flags: on a CPU with everything, torch-bf16 then runs as torch (logged, with
    the mask as the reason), int8 takes the non-VNNI recipe (7-bit weights) and its export is cached under the
    masked instruction set, never the unmasked one's. Without the mask the CPU's flags decide."""
    import torch

    from indexer import runtime as rt

    monkeypatch.setattr(rt, "_proc_cpu_flags", lambda: EVERYTHING)
    quantized: list[dict] = []  # the arguments `_quantize` gives ONNX Runtime's quantiser

    def quantize_dynamic(source: str, dest: str, **options) -> None:  # noqa: ANN003
        quantized.append(options)
        Path(dest).write_bytes(b"int8")

    def export(model, tokenizer, task, dest, max_length) -> None:  # noqa: ANN001 - no torch export here
        dest.write_bytes(b"fp32")

    monkeypatch.setattr("onnxruntime.quantization.quantize_dynamic", quantize_dynamic)
    monkeypatch.setattr(rt, "_export", export)
    model = torch.nn.Linear(2, 2)

    def exported() -> dict:
        return json.loads(
            (rt.get_export(model, None, "feature-extraction", "onnx-int8", tmp_path) / "meta.json").read_text()
        )

    monkeypatch.delenv("SIFT_CPU_MASK", raising=False)
    with caplog.at_level(logging.INFO, logger="indexer.runtime"):
        assert rt.resolve_runtime("torch-bf16", "cpu") == "torch-bf16"
    assert caplog.text == ""
    assert rt.cpu_has_bf16() and rt.cpu_isa() == "avx512_vnni" and not rt.int8_reduce_range(rt.cpu_isa())
    assert exported()["isa"] == "avx512_vnni" and quantized[-1]["reduce_range"] is False

    monkeypatch.setenv("SIFT_CPU_MASK", mask)  # read at each call: no cache to clear
    with caplog.at_level(logging.INFO, logger="indexer.runtime"):
        assert rt.resolve_runtime("torch-bf16", "cpu") == "torch"
    hidden = f"hidden by SIFT_CPU_MASK={mask}"
    assert f"running torch-bf16 as torch: no native bfloat16 (avx512_bf16/amx_bf16 {hidden})" in caplog.text
    assert rt._lacks(rt.VNNI_FLAGS) == f"avx512_vnni/avx_vnni {hidden}"  # int8's logged reason (runtime_model)
    assert not rt.cpu_has_bf16() and rt.int8_reduce_range(rt.cpu_isa())
    assert rt.cpu_isa() == ("avx2" if mask == "baseline" else "avx512")  # baseline hides AVX-512 too
    assert rt._cpu_flags() == EVERYTHING - {"avx512_bf16", "amx_bf16", "avx512_vnni", "avx_vnni"} - (
        {"avx512f", "avx512bw", "amx_tile"} if mask == "baseline" else set()
    )
    folders = {p.name for p in tmp_path.iterdir() if not p.name.startswith(".")}
    meta = exported()  # not the VNNI export made above: another key, exported again with 7-bit weights
    assert meta["isa"] == rt.cpu_isa() and quantized[-1]["reduce_range"] is True and len(quantized) == 2
    assert len({p.name for p in tmp_path.iterdir() if not p.name.startswith(".")} - folders) == 1

    monkeypatch.delenv("SIFT_CPU_MASK")  # the mask gone, the VNNI export is found again
    assert exported()["isa"] == "avx512_vnni" and len(quantized) == 2


def test_without_a_mask_this_cpus_flags_decide(monkeypatch, caplog):
    """The real /proc/cpuinfo, read afresh: native bf16 decides torch-bf16, VNNI decides int8's recipe."""
    from indexer import runtime as rt

    monkeypatch.delenv("SIFT_CPU_MASK", raising=False)
    rt._proc_cpu_flags.cache_clear()
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    flags = next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())
    assert rt._cpu_flags() == flags
    bf16, vnni = bool(flags & {"avx512_bf16", "amx_bf16"}), bool(flags & {"avx512_vnni", "avx_vnni"})
    with caplog.at_level(logging.INFO, logger="indexer.runtime"):
        assert rt.resolve_runtime("torch-bf16", "cpu") == ("torch-bf16" if bf16 else "torch")
    assert ("this CPU has no avx512_bf16/amx_bf16" in caplog.text) is not bf16
    assert rt.cpu_has_bf16() is bf16 and rt.int8_reduce_range(rt.cpu_isa()) is not vnni


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
    """A server's thread policy (`app.threads.share_cores`, applied by `Models.warm_up` to the models it
    loaded): numpy's BLAS on one thread and FAISS's own BLAS left alone; the models' ONNX Runtime sessions
    reopen without spin-waiting, a model it was not given (a build's) keeps ONNX Runtime's default. Run in a
    fresh process: numpy's BLAS threads are per process."""
    import subprocess
    import sys

    code = r"""
import json, numpy, faiss, onnx, onnxruntime
from onnx import TensorProto, helper
from threadpoolctl import threadpool_info
from app.threads import share_cores
from indexer.runtime import OnnxModel

graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["last_hidden_state"])], "g",
    [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [None, None])],
    [helper.make_tensor_value_info("last_hidden_state", TensorProto.INT64, [None, None])])
path = "%s"
onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
other = OnnxModel(path, None, "onnx", 2)
after = OnnxModel(path, None, "onnx", 2)
blas = lambda: {"numpy" if "numpy" in i["filepath"] else "faiss" if "faiss" in i["filepath"] else "other": i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}
blas_before = blas()
applied = share_cores([after], spin_wait=False, blas_threads=1)
after.run({"input_ids": numpy.array([[1]])})  # reopens its session with the policy
def spin(m):
    try:
        return m.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
    except RuntimeError:  # not set: ONNX Runtime's default (spinning)
        return "default"
print(json.dumps({"applied": applied, "before": spin(other), "after": spin(after),
    "blas_before": blas_before, "blas_after": blas(),
    "out": after.run({"input_ids": numpy.array([[1, 2]])})[0].tolist()}))
""" % (tmp_path / "identity.onnx")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["applied"] == {"onnx_spin_wait": False, "onnx_sessions": 1, "numpy_blas_threads": 1}
    assert report["before"] == "default" and report["after"] == "0"  # only the models given the policy
    assert report["blas_after"]["numpy"] == 1
    assert report["blas_before"]["numpy"] > 1 or (os.cpu_count() or 1) == 1  # it was numpy's default before
    assert report["blas_after"]["faiss"] == report["blas_before"]["faiss"]  # FAISS's own BLAS: not touched
    assert report["out"] == [[1, 2]]  # the session still runs
