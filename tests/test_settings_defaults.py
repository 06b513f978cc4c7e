"""One settings model, one environment prefix: the code defaults equal configs/default.yaml, and the server,
`sift index` and the quality gate all read settings through `indexer.config.load_config` (a YAML file, then
`SIFT_*` variables nested with `__`, then overrides)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT

DEFAULT_YAML = ROOT / "configs" / "default.yaml"


@pytest.fixture(autouse=True)
def no_sift_env(monkeypatch):
    """These tests set the variables they mean; none from the caller's shell (SIFT_CONFIG included)."""
    for name in list(os.environ):
        if name.startswith("SIFT_"):
            monkeypatch.delenv(name)


def differences(code: Any, loaded: Any, path: str = "") -> list[str]:
    """The dotted paths where two dumps differ, with both values."""
    if isinstance(code, dict) and isinstance(loaded, dict):
        out = []
        for key in sorted(set(code) | set(loaded), key=str):
            where = f"{path}.{key}" if path else str(key)
            out += differences(code.get(key, "<missing>"), loaded.get(key, "<missing>"), where)
        return out
    return [] if code == loaded else [f"{path}: code default {code!r}, configs/default.yaml {loaded!r}"]


def leaf_paths(data: Any, path: str = "") -> list[str]:
    """Dotted paths of a YAML document's settings (a mapping value such as fusion.weights counts as one)."""
    if isinstance(data, dict) and data and path.count(".") < 2 and not path.endswith("weights"):
        return [p for key, value in data.items() for p in leaf_paths(value, f"{path}.{key}" if path else key)]
    return [path]


def field_at(dump: dict[str, Any], path: str) -> bool:
    node: Any = dump
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def test_code_defaults_equal_default_yaml():
    """`Settings()` (code defaults, no file) is `load_settings(configs/default.yaml)`, field by field: the
    shipped, measured configuration is what the code means when nothing is configured."""
    from app.settings import Settings, load_settings

    code = Settings().model_dump(mode="json")
    loaded = load_settings(DEFAULT_YAML).model_dump(mode="json")
    assert not differences(code, loaded), "\n".join(differences(code, loaded))


def test_indexer_defaults_equal_default_yaml():
    from indexer.config import IndexConfig, SiftSettings, load_config, load_index_config

    assert not differences(
        IndexConfig().model_dump(mode="json"), load_index_config(DEFAULT_YAML).model_dump(mode="json")
    )
    code, loaded = (
        SiftSettings().model_dump(mode="json"),
        load_config(SiftSettings, DEFAULT_YAML).model_dump(mode="json"),
    )
    assert not differences(code, loaded), "\n".join(differences(code, loaded))


def test_every_default_yaml_setting_is_a_field():
    """A key of configs/default.yaml that no field reads (a typo in a section that ignores extra keys) would
    make the comparison above vacuous for it."""
    from app.settings import Settings

    dump = Settings().model_dump(mode="json")
    unknown = [p for p in leaf_paths(yaml.safe_load(DEFAULT_YAML.read_text())) if not field_at(dump, p)]
    assert not unknown, f"configs/default.yaml keys without a field: {unknown}"


def test_code_paths_resolve_like_the_file(tmp_path, monkeypatch):
    """Path-valued defaults (the shipped models, the prompt template) go through the validators the file's
    values go through, from any working directory."""
    from app.settings import Settings, load_settings

    monkeypatch.chdir(tmp_path)
    code, loaded = Settings(), load_settings(DEFAULT_YAML)
    assert code.reranker.model == loaded.reranker.model == str(ROOT / "models" / "sift-reranker-minilm-l6")
    assert code.answer.reader == loaded.answer.reader == str(ROOT / "models" / "sift-reader-minilm-l6")
    assert code.answer.template == loaded.answer.template == ROOT / "configs" / "prompts" / "answer.yaml"
    assert code.bundle == loaded.bundle == Path("var/index")  # relative to the working directory, as documented


def test_one_env_prefix_reaches_the_server_and_the_indexer(monkeypatch):
    """`SIFT_INDEX__DENSE__INDEX_TYPE` is read by the one loader for the server's settings and for the
    indexer's config alike, over the file; overrides stay over both."""
    from app.settings import load_settings
    from indexer.config import load_index_config

    monkeypatch.setenv("SIFT_INDEX__DENSE__INDEX_TYPE", "hnsw")
    monkeypatch.setenv("SIFT_INDEX__CHUNKING__WINDOW", "128")
    for index in (load_settings(DEFAULT_YAML).index, load_index_config(DEFAULT_YAML)):
        assert (index.dense.index_type, index.chunking.window) == ("hnsw", 128)
        assert index.dense.token_vectors == "pq"  # the rest still from the file
    assert load_index_config(DEFAULT_YAML, dense={"index_type": "ivfpq"}).dense.index_type == "ivfpq"
    assert load_settings(DEFAULT_YAML, index={"dense": {"index_type": "flat"}}).index.dense.index_type == "flat"


def test_no_second_settings_model():
    """Every pydantic-settings model of Sift is `SiftSettings` or extends it (prefix SIFT_, nesting `__`); the
    index config is a plain section, loaded only as part of it."""
    from pydantic_settings import BaseSettings

    import app.settings
    import indexer.cli
    import indexer.gate
    from indexer.config import IndexConfig, SiftSettings

    def subclasses(cls: type) -> list[type]:
        return [c for sub in cls.__subclasses__() for c in (sub, *subclasses(sub))]

    ours = [c for c in subclasses(BaseSettings) if c.__module__.split(".")[0] in ("app", "indexer")]
    assert SiftSettings in ours and app.settings.Settings in ours
    assert all(issubclass(model, SiftSettings) for model in ours), ours
    for model in ours:
        assert (model.model_config["env_prefix"], model.model_config["env_nested_delimiter"]) == ("SIFT_", "__")
    assert not issubclass(IndexConfig, BaseSettings)
    assert indexer.cli and indexer.gate  # imported so that any settings model they define is seen


def test_gate_evaluates_the_env_mode(tmp_path, monkeypatch):
    """The quality gate evaluates `search.default_mode` as the settings loader reads it: the file, then
    `SIFT_SEARCH__DEFAULT_MODE` over it (it used to read the raw YAML and miss the variable)."""
    import indexer.gate
    from indexer.gate import gate_mode, make_gate

    config = tmp_path / "dense.yaml"
    config.write_text("search:\n  default_mode: dense\n")
    assert gate_mode(DEFAULT_YAML) == "hybrid"
    assert gate_mode(config) == "dense"
    monkeypatch.setenv("SIFT_SEARCH__DEFAULT_MODE", "bm25")
    assert gate_mode(DEFAULT_YAML) == gate_mode(config) == "bm25"

    evaluated = []
    monkeypatch.setattr(indexer.gate, "evaluate_build", lambda build, dataset, mode, cfg: evaluated.append(mode) or 0.5)
    passed, message = make_gate(tmp_path / "dataset", config=config)(tmp_path / "new", None)
    assert passed and evaluated == ["bm25"] and message.startswith("bm25 nDCG@10")


def test_index_build_command_reads_the_env(tmp_path, monkeypatch):
    """`sift index build` takes its config from the same loader: SIFT_INDEX__* over the file."""
    from typer.testing import CliRunner

    import indexer.cli

    seen = []

    def fake_build(corpus, out, config, **_):  # noqa: ANN001, ANN003, ANN202
        seen.append(config)
        raise ValueError("not building in this test")

    monkeypatch.setattr(indexer.cli, "build_bundle", fake_build)
    monkeypatch.setenv("SIFT_INDEX__DENSE__INDEX_TYPE", "hnsw")
    monkeypatch.setenv("SIFT_INDEX__BM25__K1", "1.2")
    args = ["build", "-i", str(tmp_path / "c.jsonl"), "-o", str(tmp_path / "out"), "-c", str(DEFAULT_YAML)]
    result = CliRunner().invoke(indexer.cli.app, args)
    assert result.exit_code == 1 and len(seen) == 1, result.output
    assert (seen[0].dense.index_type, seen[0].bm25.k1, seen[0].dense.token_vectors) == ("hnsw", 1.2, "pq")


def test_old_manifest_without_token_vectors_reads_as_none():
    """A bundle recorded before `index.dense.token_vectors` existed kept none, whatever today's default."""
    from indexer.config import IndexConfig, recorded_config

    old = IndexConfig().model_dump(mode="json")
    del old["dense"]["token_vectors"]
    assert recorded_config({"config": old}).dense.token_vectors is None
    assert recorded_config({"config": IndexConfig().model_dump(mode="json")}).dense.token_vectors == "pq"
