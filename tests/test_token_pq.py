"""Compressed (product-quantised) token vectors: the store's round trip and checks, MaxSim by table look-up
equal to MaxSim over the decoded vectors, the int8 → pq converter (`sift index convert`, no model), the form
kept by updates and reshards, and MaxSim rankings that agree with int8's on the example corpus."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess

import numpy as np
import pytest

from indexer.commands import sift_command
from indexer.tokens import (
    CODEBOOK_FILE,
    ROTATION_FILE,
    ProductQuantizer,
    TokenForm,
    TokenStore,
    TokenStoreError,
    TokenWriter,
)
from tests.conftest import ROOT

QUERIES = (
    "how do vaccines train the immune system",
    "baking bread with sourdough",
    "python programming",
    "why do tides rise and fall",
    "when was the Eiffel Tower built",
    "how do stars form",
)


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    v = rng.normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def sift(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*sift_command(), *args], capture_output=True, text=True, cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def int8_index(int8_example_index):
    return int8_example_index


@pytest.fixture(scope="module")
def pq_index(int8_index, tmp_path_factory):
    """That build converted to pq by `sift index convert` (the model does not run)."""
    out = tmp_path_factory.mktemp("pq") / "index"
    done = sift("index", "convert", "--from", str(int8_index), "--out", str(out), "--token-vectors", "pq")
    assert done.returncode == 0, done.stderr
    assert "converted:" in done.stdout
    return out


def test_pq_store_round_trip_scores_codes_by_lookup(tmp_path):
    rng = np.random.default_rng(0)
    passages = [unit(rng, n, 64) for n in (300, 1, 0, 57)]
    with TokenWriter(tmp_path, TokenForm("pq", 8)) as writer:
        for p in passages:
            writer.add(p * 3.0)  # stored unit-normalised
        meta = writer.close()
    assert meta["dtype"] == "pq" and meta["pq"] == {"m": 8, "centroids": 256, "rotation": "opq", "bytes_per_token": 8}
    assert not (tmp_path / "tokens.spill.int8").exists()  # the spill is gone once encoded
    store = TokenStore.open(tmp_path, 4, expect=meta)
    assert store.data.dtype == np.uint8 and store.data.shape == (358, 8)  # 8 bytes a token, not 64 values
    assert (tmp_path / "tokens.pq.bin").stat().st_size == 358 * 8
    assert store.pq is not None and store.pq.codebook.shape == (8, 256, 8) and store.pq.rotation is not None
    assert np.allclose(store.pq.rotation @ store.pq.rotation.T, np.eye(64), atol=1e-4)  # orthonormal
    # look-up tables give exactly the inner products with the decoded vectors
    query = unit(rng, 7, 64)
    decoded = [store.vectors(r) for r in range(4)]
    expected = [float((query @ d.T).max(axis=1).mean()) if len(d) else 0.0 for d in decoded]
    got = store.maxsim(query, [0, 1, 2, 3])
    assert np.allclose(got, expected, atol=1e-5)
    # and approximate the true MaxSim; a passage of one token is its own centroid (trained on 358 tokens)
    true = [float((query @ p.T).max(axis=1).mean()) if len(p) else 0.0 for p in passages]
    assert np.abs(got - true).max() < 0.15 and got[2] == 0.0
    assert np.abs(decoded[1] - passages[1]).max() < 0.25


def test_converting_int8_trains_the_codebook_a_fresh_pq_build_would(tmp_path):
    """int8 → pq copies the stored int8 rows and scales into the pq writer's spill (nothing re-quantised): the
    codebook, rotation and codes equal those of a pq writer fed the same vectors, so a converted build and a
    fresh build of the same corpus score alike."""
    rng = np.random.default_rng(3)
    passages = [unit(rng, n, 64) for n in (300, 5, 0, 700, 1)]
    for name, form in (("int8", TokenForm("int8")), ("fresh", TokenForm("pq", 8))):
        with TokenWriter(tmp_path / name, form) as writer:
            for p in passages:
                writer.add(p)
            writer.close()
    source = TokenStore.open(tmp_path / "int8", len(passages))
    with TokenWriter(tmp_path / "converted", TokenForm("pq", 8)) as writer:
        writer.add_stored(source, range(len(passages)))
        writer.close()
    fresh, converted = (TokenStore.open(tmp_path / n, len(passages)) for n in ("fresh", "converted"))
    assert fresh.pq is not None and converted.pq is not None and fresh.pq.rotation is not None
    assert np.array_equal(fresh.pq.codebook, converted.pq.codebook)
    assert np.array_equal(fresh.pq.rotation, converted.pq.rotation)  # type: ignore[arg-type]
    assert np.array_equal(fresh.offsets, converted.offsets) and np.array_equal(fresh.data, converted.data)


def test_opq_learned_on_its_own_rows_is_the_rotation_of_the_whole_sample(monkeypatch):
    """A pq writer reads only the rows OPQ trains on (`opq_rows`: faiss's own subsample of a larger sample),
    learns the rotation, then reads the whole sample for k-means: one working set in memory at a time, and the
    same rotation and codebook as training on the whole sample at once."""
    import indexer.tokens as tokens

    monkeypatch.setattr(tokens, "OPQ_TRAIN_POINTS", 2000)  # so that a small sample is subsampled
    sample = unit(np.random.default_rng(4), 5000, 32)
    rows = ProductQuantizer.opq_rows(len(sample))
    assert len(rows) == 2000 and len(set(rows.tolist())) == 2000 and rows.max() < 5000
    whole = ProductQuantizer.train(sample, 4)
    rotation = ProductQuantizer.learn_rotation(sample[rows], 4)
    assert whole.rotation is not None and np.array_equal(rotation, whole.rotation)
    parts = ProductQuantizer.train(sample, 4, rotate=rotation)
    assert np.array_equal(parts.codebook, whole.codebook)
    assert np.array_equal(ProductQuantizer.opq_rows(1500), np.arange(1500))  # small samples: every row


def test_fewer_tokens_than_centroids_are_their_own_centroids(tmp_path):
    rng = np.random.default_rng(1)
    vectors = unit(rng, 40, 32)
    with TokenWriter(tmp_path, TokenForm("pq", 4)) as writer:
        writer.add(vectors)
        writer.close()
    store = TokenStore.open(tmp_path, 1)
    assert np.allclose(store.vectors(0), vectors, atol=0.5 / 127)  # as exact as the int8 spill they went through


def test_a_damaged_or_mismatched_pq_store_is_refused(tmp_path):
    rng = np.random.default_rng(2)
    with TokenWriter(tmp_path, TokenForm("pq", 4)) as writer:
        writer.add(unit(rng, 600, 32))
        meta = writer.close()
    TokenStore.open(tmp_path, 1, expect=meta)
    with pytest.raises(TokenStoreError, match="manifest records int8"):
        TokenStore.open(tmp_path, 1, expect={**meta, "dtype": "int8", "pq": None})
    with pytest.raises(TokenStoreError, match="manifest records"):
        TokenStore.open(tmp_path, 1, expect={**meta, "pq": {**meta["pq"], "m": 8}})  # type: ignore[dict-item]
    codebook = np.load(tmp_path / CODEBOOK_FILE)
    np.save(tmp_path / CODEBOOK_FILE, codebook[:, :128])  # half the centroids
    with pytest.raises(TokenStoreError, match="codebook"):
        TokenStore.open(tmp_path, 1)
    np.save(tmp_path / CODEBOOK_FILE, codebook)
    rotation = np.load(tmp_path / ROTATION_FILE)
    np.save(tmp_path / ROTATION_FILE, rotation[:16])
    with pytest.raises(TokenStoreError, match="rotation"):
        TokenStore.open(tmp_path, 1)
    np.save(tmp_path / ROTATION_FILE, rotation)
    data = tmp_path / "tokens.pq.bin"
    with open(data, "r+b") as handle:
        handle.truncate(data.stat().st_size - 4)  # half a token's codes
    with pytest.raises(TokenStoreError, match="truncated or corrupt"):
        TokenStore.open(tmp_path, 1)
    (tmp_path / CODEBOOK_FILE).unlink()
    with pytest.raises(TokenStoreError):
        TokenStore.open(tmp_path, 1)


def test_pq_sub_spaces_must_divide_the_dimension(tmp_path):
    with TokenWriter(tmp_path, TokenForm("pq", 5)) as writer, pytest.raises(TokenStoreError, match="token_pq_m"):
        writer.add(np.ones((3, 32), dtype=np.float32))
    with pytest.raises(ValueError, match="dtype"):
        TokenForm("int4")  # type: ignore[arg-type]


def test_convert_writes_pq_and_records_it(int8_index, pq_index):
    from indexer.bundle import open_bundle

    source, converted = open_bundle(int8_index), open_bundle(pq_index, verify=True)  # checksums hold
    meta = converted.manifest["dense"]["token_vectors"]
    assert (
        meta["dtype"] == "pq"
        and meta["pq"]["m"] == 32
        and meta["tokens"] == source.manifest["dense"]["token_vectors"]["tokens"]
    )
    assert converted.manifest["config"]["dense"]["token_vectors"] == "pq"  # updates keep the form
    assert converted.manifest["build"]["kind"] == "convert" and converted.manifest["parent"] == source.build_id
    assert {"dense/tokens.pq.bin", "dense/tokens.codebook.npy", "dense/tokens.rotation.npy"} <= set(
        converted.manifest["files"]
    )
    int8 = TokenStore.open(source.path("dense"))
    pq = TokenStore.open(converted.path("dense"))
    tokens = int(pq.offsets[-1])
    # bytes per token: 32 codes against 384 int8 values and a float32 scale (the codebook is per bundle)
    assert (converted.path("dense") / "tokens.pq.bin").stat().st_size * 12 == tokens * 384
    per_bundle = sum((converted.path("dense") / f).stat().st_size for f in (CODEBOOK_FILE, ROTATION_FILE))
    assert int8.nbytes / (pq.nbytes - per_bundle) > 11
    assert converted.manifest["counts"] == source.manifest["counts"]


def test_pq_maxsim_ranks_like_int8_on_the_example_corpus(int8_index, pq_index):
    """Codes approximate MaxSim: scores shrink (a centroid is shorter than the vectors it stands for) but keep
    their order; the served default search over the converted bundle returns the same top passages."""
    from app.services import Models, load_pipeline
    from app.settings import load_settings

    settings = load_settings(reranker={"maxsim": True})
    models = Models.load(settings, generator=False, reader=False)  # one cross-encoder for both pipelines
    pipelines = {
        name: load_pipeline(settings, index, models) for name, index in (("int8", int8_index), ("pq", pq_index))
    }
    int8, pq = pipelines["int8"], pipelines["pq"]
    assert pq.late is not None and pq.late.stored and int8.late is not None
    correlations, same_top, served = [], 0, []
    for query in QUERIES:
        hits = asyncio.run(int8.search(query, int8.options(k=20, rerank=False))).hits
        rows = [h.idx for h in hits]
        a, b = int8.late.score(query, rows, []), pq.late.score(query, rows, [])
        correlations.append(float(np.corrcoef(a, b)[0, 1]))
        same_top += int(np.argmax(a) == np.argmax(b))
        tops = {
            name: [h.passage_id for h in asyncio.run(p.search(query, p.options(k=3))).hits]
            for name, p in pipelines.items()
        }
        served.append(tops["int8"][0] == tops["pq"][0])
        assert set(tops["int8"]) == set(tops["pq"]), (query, tops)  # the same three passages served
    assert min(correlations) > 0.95, correlations  # measured 0.964-0.998 (opq32, the convert default)
    assert same_top == len(QUERIES)
    # the same top passage served for every query but at most one near-tie: "python programming" has no
    # passage about Python; its int8 top two (garbage collection, Turing) are 0.12 apart in fused score, and one
    # codebook measured swaps them
    assert sum(served) >= len(QUERIES) - 1, served


def test_update_and_reshard_keep_the_pq_form_and_codebook(pq_index, tmp_path):
    from indexer.build import reshard_bundle
    from indexer.bundle import open_bundle
    from indexer.update import update_bundle

    copy = tmp_path / "index"
    shutil.copytree(pq_index, copy, symlinks=True)
    parent = open_bundle(copy)
    parent_store = TokenStore.open(parent.path("dense"))
    added = tmp_path / "add.jsonl"
    added.write_text(
        json.dumps({"_id": "new-1", "title": "Tea", "text": "Green tea is steamed, black tea oxidised."}) + "\n"
    )
    update_bundle(copy, add=added, show_progress=False)
    child = open_bundle(copy, verify=True)
    store = TokenStore.open(
        child.path("dense"), child.manifest["counts"]["passages"], child.manifest["dense"]["token_vectors"]
    )
    assert store.dtype == "pq" and store.pq is not None and store.pq.same(parent_store.pq)
    assert len(store.offsets) == len(parent_store.offsets) + 1
    assert np.array_equal(store.data[: int(parent_store.offsets[-1])], parent_store.data)  # kept codes as stored
    new = store.vectors(len(store.offsets) - 2)  # the new passage, encoded with the kept codebook
    norms = np.linalg.norm(new, axis=1)  # unit vectors' codes: centroids are a little shorter than their members
    assert new.shape[0] > 5 and 0.5 < norms.min() and norms.max() < 1.05, norms

    sharded = reshard_bundle(copy, tmp_path / "sharded", 2, show_progress=False).path
    rows = 0
    for name in ("shard-000", "shard-001"):
        shard = open_bundle(sharded / name, verify=False)
        part = TokenStore.open(
            shard.path("dense"), shard.manifest["counts"]["passages"], shard.manifest["dense"]["token_vectors"]
        )
        assert part.dtype == "pq" and part.pq is not None and part.pq.same(store.pq)
        n = int(part.offsets[-1])
        assert np.array_equal(part.data, store.data[rows : rows + n])
        rows += n
    assert rows == int(store.offsets[-1])


def test_convert_refuses_what_it_cannot_convert(int8_index, tmp_path):
    done = sift(
        "index", "convert", "--from", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--token-vectors", "pq"
    )
    assert done.returncode == 1 and "error:" in done.stderr
    done = sift("index", "convert", "--from", str(int8_index), "--out", str(tmp_path / "o"), "--token-vectors", "int4")
    assert done.returncode == 2 and "int4" in done.stderr


@pytest.mark.parametrize("rotate", [True, False])
def test_product_quantizer_tables_match_decoding(rotate):
    rng = np.random.default_rng(3)
    sample = unit(rng, 3000, 48)
    pq = ProductQuantizer.train(sample, 12, rotate=rotate)
    assert (pq.rotation is not None) == rotate
    vectors = unit(rng, 50, 48)
    codes = pq.encode(vectors)
    query = unit(rng, 5, 48)
    assert codes.shape == (50, 12) and codes.dtype == np.uint8
    assert np.allclose(pq.inner_products(pq.tables(query), codes), pq.decode(codes) @ query.T, atol=1e-5)
    assert np.abs(pq.decode(codes) @ query.T - vectors @ query.T).max() < 0.5  # an approximation of the truth


def test_sift_index_build_writes_pq_by_default(tmp_path, pq_index):
    """The shipped `index.dense.token_vectors: pq`: OPQ-rotated codes of 32 bytes a token, trained at the
    build's close on its own tokens, recorded in the manifest and its config; the codebook is the one the
    int8 build of the same corpus converted to (`sift index convert`) trained."""
    from indexer.bundle import open_bundle

    out = tmp_path / "index"
    args = ["index", "build", "--input", str(ROOT / "examples" / "corpus.jsonl"), "--out", str(out), "--no-progress"]
    done = sift(*args)
    assert done.returncode == 0, done.stderr
    info = open_bundle(out, verify=True)
    meta = info.manifest["dense"]["token_vectors"]
    assert meta["dtype"] == "pq" and meta["pq"] == {"m": 32, "centroids": 256, "rotation": "opq", "bytes_per_token": 32}
    assert info.manifest["config"]["dense"]["token_vectors"] == "pq"
    assert not (info.path("dense") / "tokens.spill.int8").exists()
    store = TokenStore.open(info.path("dense"), info.manifest["counts"]["passages"], meta)
    assert store.data.shape == (meta["tokens"], 32) and meta["tokens"] > 50 * meta["passages"]
    converted = TokenStore.open(open_bundle(pq_index).path("dense"))
    assert store.pq is not None and converted.pq is not None and store.pq.rotation is not None
    assert np.array_equal(store.pq.codebook, converted.pq.codebook) and np.array_equal(store.data, converted.data)


def test_convert_in_place_publishes_a_new_current_build(int8_index, tmp_path):
    """`sift index convert --from X --out X` (as the README shows it): a new build becomes current, the int8
    one stays published beside it (a rollback target), and a server reading the folder finds pq codes."""
    from indexer.bundle import list_builds, open_bundle

    copy = tmp_path / "index"
    shutil.copytree(int8_index, copy, symlinks=True)
    before = open_bundle(copy).build_id
    done = sift("index", "convert", "--from", str(copy), "--out", str(copy), "--no-progress")
    assert done.returncode == 0, done.stderr
    after = open_bundle(copy, verify=True)
    assert after.build_id != before and after.manifest["parent"] == before
    assert after.manifest["dense"]["token_vectors"]["dtype"] == "pq"
    assert list_builds(copy) == sorted([before, after.build_id])


def test_one_codebook_over_several_spills_is_the_codebook_of_their_concatenation(tmp_path):
    """A sharded build's shards train one codebook over all their spills (`train_on_spills`): the same tokens
    picked in the same order as one writer of the whole corpus picks, so the same rotation, codebook and codes."""
    from indexer.tokens import train_on_spills

    rng = np.random.default_rng(7)
    passages = [rng.standard_normal((int(rng.integers(5, 40)), 32)).astype(np.float32) for _ in range(300)]
    form = TokenForm("pq", 4, sample=2000, rotate=True)
    with TokenWriter(tmp_path / "whole", form) as writer:
        for vectors in passages:
            writer.add(vectors)
        writer.close()
    whole = TokenStore.open(tmp_path / "whole", len(passages))
    parts = [TokenWriter(tmp_path / "a", form), TokenWriter(tmp_path / "b", form), TokenWriter(tmp_path / "c", form)]
    cuts = [0, 120, 121, 300]  # a one-passage shard among them
    for writer, lo, hi in zip(parts, cuts, cuts[1:], strict=False):
        for vectors in passages[lo:hi]:
            writer.add(vectors)
    codebook = train_on_spills(parts, form)
    assert codebook.same(whole.pq)
    codes = []
    for writer, name, lo, hi in zip(parts, "abc", cuts, cuts[1:], strict=False):
        writer.close(codebook)
        store = TokenStore.open(tmp_path / name, hi - lo)
        assert store.pq is not None and store.pq.same(whole.pq)
        codes.append(np.asarray(store.data))
    np.testing.assert_array_equal(np.concatenate(codes), np.asarray(whole.data))


def test_spill_rows_reads_any_order_into_a_given_slice(tmp_path):
    """`spill_rows` gives the spilled tokens asked for, in the order asked, into `out` when given (how
    `train_on_spills` fills its sample without holding it twice); `out` of the wrong shape is refused."""
    rng = np.random.default_rng(3)
    passages = [rng.standard_normal((int(rng.integers(3, 9)), 16)).astype(np.float32) for _ in range(40)]
    writer = TokenWriter(tmp_path / "s", TokenForm("pq", 4, sample=500, rotate=False))
    for vectors in passages:
        writer.add(vectors)
    which = np.array([17, 2, 2, 100, 0, writer.spilled_tokens - 1], dtype=np.int64)
    fresh = writer.spill_rows(which)
    units = np.concatenate([v / np.linalg.norm(v, axis=1, keepdims=True) for v in passages])
    np.testing.assert_allclose(fresh, units[which], atol=0.02)  # int8 with per-token scales
    big = np.full((8, 16), 7.0, dtype=np.float32)
    returned = writer.spill_rows(which, out=big[1:7])
    assert returned.base is big or returned is big[1:7] or np.shares_memory(returned, big)
    np.testing.assert_array_equal(big[1:7], fresh)
    assert (big[0] == 7.0).all() and (big[7] == 7.0).all()
    with pytest.raises(ValueError, match="out must be float32"):
        writer.spill_rows(which, out=np.empty((5, 16), dtype=np.float32))
    writer.close()
