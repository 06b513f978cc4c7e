"""The import graph (issue 28): the HTTP layer reaches the stages only through the engine, serving never
imports the build job, `indexer` never imports `app`, and no two modules import each other (directly or
through others). Read from the source with `ast` (imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parent.parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of `tree` but those under `if TYPE_CHECKING:` (annotations only: never imported at run time)."""
    out: list[ast.AST] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        out.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return out


def import_graph() -> nx.DiGraph:
    graph = nx.DiGraph()
    modules = {module_name(p): p for package in ("app", "indexer") for p in (ROOT / package).rglob("*.py")}
    for name, path in modules.items():
        graph.add_node(name)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                # the deepest module of ours that the import names (a name imported from a module is not one)
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph.add_edge(name, target)
    return graph


@pytest.fixture(scope="module")
def graph() -> nx.DiGraph:
    return import_graph()


def test_no_import_cycles(graph):
    # a package's __init__ re-exporting its modules is not a cycle of the code
    code = graph.subgraph(n for n in graph if not (ROOT / n.replace(".", "/") / "__init__.py").exists())
    cycles = list(nx.simple_cycles(code))
    assert cycles == [], cycles[:5]


def test_indexer_never_imports_app(graph):
    offenders = [(a, b) for a, b in graph.edges if a.startswith("indexer") and b.startswith("app")]
    assert offenders == []


def test_the_http_layer_reaches_stages_only_through_the_engine(graph):
    """Before: /v1/rerank held a rerank stage (the reranker's document preparation and private lock) and
    MaxSim's scoring, and imported the encoders' locks."""
    stages = {"app.retrieval.reranker", "app.retrieval.maxsim", "app.retrieval.dense", "app.retrieval.queries"}
    stages |= {"indexer.encoders", "indexer.runtime", "indexer.tokens"}
    offenders = [(a, b) for a, b in graph.edges if a.startswith("app.api") and b in stages]
    # QueueFull is the reranker queue's typed error, mapped to 429 by the error handlers: the one import kept
    offenders = [(a, b) for a, b in offenders if (a, b) != ("app.api.errors", "app.retrieval.reranker")]
    assert offenders == [], offenders


def test_serving_never_imports_the_build_job(graph):
    serving = [n for n in graph if n.startswith("app.") and not n.startswith(("app.training", "app.eval", "app.cli"))]
    # (indexer.shards is not listed: besides writing shards it reads a built manifest's shard map)
    build = {"indexer.build", "indexer.update", "indexer.ray_engine", "indexer.pipeline"}
    reached = {n: sorted(set(nx.descendants(graph, n)) & build) for n in serving}
    assert {n: b for n, b in reached.items() if b} == {}
