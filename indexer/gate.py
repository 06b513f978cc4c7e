"""The quality gate on publish: a new build becomes `current` only if its nDCG@10 on a BEIR dataset's qrels
is at most `max_drop` below the published build's.

Both builds are scored by `sift eval retrieval` itself (a subprocess: the same code path as the eval
command and the API, and the indexer still never imports the app), with the configured default search mode.
A build on which that mode cannot run (for example dense disabled under a hybrid default) fails the gate.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from indexer.commands import sift_command
from indexer.config import SearchMode, SiftSettings, load_config


class GateError(RuntimeError):
    pass


def evaluate_build(build: Path, dataset: Path, mode: str, config: Path | None = None, split: str = "test") -> float:
    """nDCG@10 of `build` on `dataset` (BEIR layout) in search mode `mode`, through `sift eval retrieval`."""
    with tempfile.TemporaryDirectory(prefix="sift-gate-") as tmp:
        cmd = [*sift_command(), "eval", "retrieval", "--dataset", str(dataset), "--split", split]
        cmd += ["--bundle", str(build), "--pipelines", mode, "--out", tmp]
        if config is not None:
            cmd += ["--config", str(config)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        results = Path(tmp) / "results.json"
        if done.returncode != 0 or not results.exists():
            lines = [x for x in (done.stderr or done.stdout).strip().splitlines() if x.strip()]
            raise GateError(f"evaluating {build.name} failed: {lines[-1] if lines else 'no output'}")
        scores = json.loads(results.read_text())["pipelines"]
        if mode not in scores:
            raise GateError(f"build {build.name} cannot run search mode {mode!r} (see `sift index info`)")
        return float(scores[mode]["ndcg@10"])


def gate_mode(config: Path | None = None) -> SearchMode:
    """The search mode the gate evaluates: `search.default_mode` as Sift's settings loader reads it (the config
    file, then `SIFT_SEARCH__DEFAULT_MODE` over it), the mode `sift eval retrieval` and the server default to."""
    return load_config(SiftSettings, config).search.default_mode


def make_gate(
    dataset: Path, max_drop: float = 0.01, config: Path | None = None, echo: Callable[[str], object] = print
) -> Callable[[Path, Path | None], tuple[bool, str]]:
    """A gate function for `build_bundle`/`update_bundle`: (new build, published build or None) → (passed,
    message). The message carries both figures."""
    mode = gate_mode(config)
    published_scores: dict[Path, float] = {}  # a published build never changes, so its score is kept

    def gate(new: Path, published: Path | None) -> tuple[bool, str]:
        try:
            new_score = evaluate_build(new, dataset, mode, config)
        except GateError as exc:
            return False, f"quality gate refused build {new.name}: {exc}"
        if published is None:
            return True, f"{mode} nDCG@10 {new_score:.4f} on {dataset.name} (no published build to compare)"
        key = published.resolve()
        if key not in published_scores:
            published_scores[key] = evaluate_build(published, dataset, mode, config)
        old_score = published_scores[key]
        figures = (
            f"{mode} nDCG@10 on {dataset.name}: new build {new.name} {new_score:.4f}, "
            f"published build {published.name} {old_score:.4f} (max drop {max_drop})"
        )
        echo(figures)
        if new_score < old_score - max_drop:
            return False, f"quality gate refused build {new.name}: {figures}; the published build stays current"
        return True, figures

    return gate
