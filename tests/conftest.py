"""Shared fixtures: the offline encoder, small corpora, a bundle over examples/, and (cached) SciFact."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Haystack (the client's framework tests) reads this when imported: no telemetry from test runs
os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")
# ../shared/data (SIFT_SHARED_DATA elsewhere): tests that need it skip without it, except under CI=true
SHARED_DATA = Path(os.environ.get("SIFT_SHARED_DATA") or ROOT.parent / "shared" / "data")
SCIFACT = SHARED_DATA / "scifact"
EXAMPLES = ROOT / "examples" / "corpus.jsonl"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REQUIRED_DATA = ("scifact/corpus.jsonl", "scifact/queries.jsonl", "scifact/qrels/test.tsv", "squad/dev-v1.1.json")


def pytest_sessionstart(session: pytest.Session) -> None:
    """Under CI=true the shared datasets are part of the contract: their absence fails the run at once."""
    if os.environ.get("CI") != "true":
        return
    missing = [name for name in REQUIRED_DATA if not (SHARED_DATA / name).exists()]
    if missing:
        pytest.exit(
            f"CI=true but the shared test data is missing under {SHARED_DATA}: {', '.join(missing)}. "
            "CI must provide ../shared/data (BEIR SciFact, SQuAD v1.1 dev); see ../shared/data/README",
            returncode=1,
        )


# the suites over ../shared/data form one pytest-xdist group (`pytest -n 2 --dist loadgroup` runs them on one
# worker, which builds the SciFact bundle while the other runs everything else; `make test` runs one process)
SHARED_DATA_WORKER = pytest.mark.xdist_group("shared-data")

needs_scifact = pytest.mark.skipif(
    not (SCIFACT / "corpus.jsonl").exists(),
    reason=f"SciFact not found at {SCIFACT} (../shared/data is provided on the team's machines and in CI)",
)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def encoder():
    from indexer.encoders import load_encoder

    return load_encoder("sentence-transformers/all-MiniLM-L6-v2", "cpu")


@pytest.fixture(scope="session")
def tokenizer(encoder):
    return encoder.tokenizer


@pytest.fixture(scope="session")
def example_index(tmp_path_factory) -> Path:
    """An index folder (with `current`) built from examples/corpus.jsonl with configs/default.yaml's index config
    (pq token vectors: servers with the default second stage read stored MaxSim codes)."""
    from indexer.build import build_bundle
    from indexer.config import load_index_config

    out = tmp_path_factory.mktemp("example-index")
    build_bundle(EXAMPLES, out, load_index_config(ROOT / "configs" / "default.yaml"), show_progress=False)
    return out


@pytest.fixture(scope="session")
def int8_example_index(tmp_path_factory) -> Path:
    """examples/corpus.jsonl with int8 token vectors (the stored form before pq; tests of int8 stores and of
    the int8 → pq converter). Tests copy it before changing it."""
    from indexer.build import build_bundle
    from indexer.config import DenseSettings, IndexConfig

    out = tmp_path_factory.mktemp("int8-index") / "index"
    build_bundle(EXAMPLES, out, IndexConfig(dense=DenseSettings(token_vectors="int8")), show_progress=False)
    return out


@pytest.fixture(scope="session")
def example_pipeline(example_index):
    from app.services import load_pipeline
    from app.settings import load_settings

    # first stage only: the reranker's tests build their own pipelines (tests/test_reranker.py); generative
    # answers, for the tests that hand the app a generator (the shipped extractive default: test_shipped_answers)
    return load_pipeline(load_settings(bundle=example_index, reranker={"model": None}, answer={"mode": "generative"}))


@pytest.fixture(scope="session")
def example_settings(example_index):
    """The settings of `example_pipeline` for a server (`tests.servers.app_client`): first stage only, generative
    answers, and no generator, so no answer backend (apps that answer configure theirs)."""
    from app.settings import load_settings

    return load_settings(
        bundle=example_index, reranker={"model": None}, answer={"mode": "generative"}, generator={"backend": "none"}
    )


def _source_key() -> str:
    digest = hashlib.sha256()
    for path in sorted((ROOT / "indexer").glob("*.py")):
        digest.update(path.read_bytes())
    digest.update((SCIFACT / "corpus.jsonl").read_bytes()[: 1 << 20])
    digest.update((ROOT / "configs" / "default.yaml").read_bytes())  # the index config it is built with
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def scifact_index() -> Path:
    """SciFact built with configs/default.yaml's index config (pq token vectors included);
    cached under .cache/ keyed by the indexer's source code and that config, so a change to either rebuilds (≈7 min
    on a 2-core CPU)."""
    from indexer.build import ensure_bundle
    from indexer.config import load_index_config

    out = ROOT / ".cache" / f"scifact-{_source_key()}"
    for stale in (ROOT / ".cache").glob("scifact-*"):
        if stale != out:
            shutil.rmtree(stale, ignore_errors=True)
    return ensure_bundle(SCIFACT / "corpus.jsonl", out, load_index_config(ROOT / "configs" / "default.yaml"))


@pytest.fixture(scope="session")
def scifact_pipeline(scifact_index):
    from app.services import load_pipeline
    from app.settings import load_settings

    # first stage only; the shipped reranker is pinned in tests/test_regression_reranker.py
    return load_pipeline(load_settings(bundle=scifact_index, reranker={"model": None}))


@pytest.fixture(scope="session")
def scifact_settings(scifact_index):
    """The settings of `scifact_pipeline` for a server (`tests.servers.app_client`): first stage only, no answer
    backend (extractive answers without a reader)."""
    from app.settings import load_settings

    return load_settings(bundle=scifact_index, reranker={"model": None}, answer={"reader": None})


@pytest.fixture(scope="session")
def local_generator():
    from app.generation.local import LocalGenerator

    return LocalGenerator.load("smollm2", ROOT / "var" / "models", "cpu")


CLIENT_KEY = "sift-client-test-key-0001"
RECIPES = [
    {"_id": "r1", "title": "Pancakes", "text": "Whisk flour, milk and eggs; fry the batter in butter until golden."},
    {"_id": "r2", "title": "Lemonade", "text": "Squeeze six lemons, add sugar syrup and cold water, then stir."},
    # an id a URL would read as structure (path, fragment, query, escape)
    {"_id": "tips/eggs#1?fresh=100%", "title": "Fresh eggs", "text": "A fresh egg sinks in a bowl of water."},
]


@pytest.fixture(scope="session")
def client_server(example_index, tmp_path_factory):
    """One real `sift serve` for the client's and the frameworks' tests (tests/test_client*.py): the shipped
    configuration (two stages, extractive answers) over two collections, `examples` (the default) and `recipes`,
    behind an API key. Yields (base URL, key)."""
    from indexer.build import build_bundle
    from tests.servers import sift_server

    recipes = tmp_path_factory.mktemp("recipes")
    build_bundle(write_jsonl(recipes / "recipes.jsonl", RECIPES), recipes / "index", show_progress=False)
    env = {
        "SIFT_COLLECTIONS": json.dumps({"examples": str(example_index), "recipes": str(recipes / "index")}),
        "SIFT_SERVER__API_KEYS": json.dumps([CLIENT_KEY]),
        "SIFT_GENERATOR__BACKEND": "none",
    }
    with sift_server(env) as (base, _):
        yield base, CLIENT_KEY
