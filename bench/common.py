"""Helpers shared by the benchmark scripts: timing medians, machine description, report appending."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "docs" / "benchmarks.md"
SCIFACT = ROOT.parent / "shared" / "data" / "scifact"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    bundle: Path,
    reranker: Path | None = None,
    root: Path = ROOT,
    env: dict[str, str] | None = None,
    ready_timeout: float = 300,
) -> tuple[subprocess.Popen, str]:
    """`sift serve` from the source tree `root` (default: this one; a baseline's, see `source_tree`) on a free
    loopback port, with `env` over the environment; returns (process, base URL) once `/readyz` answers 200,
    and raises if the server exits or is not ready within `ready_timeout` seconds."""
    import httpx

    port = free_port()
    full_env = {
        **os.environ,
        "PYTHONPATH": str(root),
        "SIFT_BUNDLE": str(bundle),
        "SIFT_SERVER__LOG_LEVEL": "warning",
        **(env or {}),
    }
    if reranker:
        full_env["SIFT_RERANKER__MODEL"] = str(reranker)
    cmd = [sys.executable, "-c", "from app.cli import main; main()", "serve", "--port", str(port)]
    process = subprocess.Popen(cmd, env=full_env, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_timeout
    workers = int(full_env.get("SIFT_SERVER__WORKERS") or 1)
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200 and _workers_ready(base, workers, deadline):
                return process, base
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            raise RuntimeError(f"server from {root} exited during start-up")
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"server from {root} not ready in {ready_timeout:.0f} s")


def _workers_ready(base: str, workers: int, deadline: float) -> bool:
    """With several worker processes, `/readyz` answers for one of them: wait until `workers` distinct
    processes have answered `/v1/info` (which needs a loaded build)."""
    import httpx

    seen: set[int] = set()
    while workers > 1 and len(seen) < workers and time.monotonic() < deadline:
        r = httpx.get(f"{base}/v1/info", timeout=5)
        if r.status_code == 200:
            seen.add(r.json()["process"]["pid"])
        else:
            time.sleep(0.2)
    return workers <= 1 or len(seen) >= workers


@contextlib.contextmanager
def source_tree(rev: str) -> Iterator[Path]:
    """The source of commit `rev` (as `git archive` writes it) in a temporary folder, for before/after runs
    of a baseline server with this checkout's Python environment."""
    with tempfile.TemporaryDirectory(prefix="sift-baseline-") as tmp:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        yield Path(tmp)


def process_tree(pid: int) -> list[psutil.Process]:
    """The process and its live children."""
    return [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]


def cpu_seconds(processes: list[psutil.Process]) -> float:
    """User + system CPU seconds of `processes` (their threads included)."""
    return sum(sum(p.cpu_times()[:2]) for p in processes)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    return f"{os.cpu_count()} cores, {cpu_model()}, Python {platform.python_version()}"


def progress(total: int, desc: str) -> Any:
    """A progress bar with ETA on stderr for a benchmark's measurement steps (`.update()` after each)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, mininterval=0.5)


def progress_iter(items: list, desc: str) -> Any:
    """`items` with a progress bar (ETA) on stderr."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, file=sys.stderr, mininterval=0.5)


def progress_range(n: int, desc: str) -> Any:
    return progress_iter(list(range(n)), desc)


def median_time(
    fn: Callable[[], Any], runs: int = 5, warmup: int = 1, desc: str | None = None
) -> tuple[float, list[float]]:
    """Median wall time of `runs` calls after `warmup` calls, and all the timings (with a progress bar)."""
    with progress(warmup + runs, desc or getattr(fn, "__name__", "runs")) as bar:
        for _ in range(warmup):
            fn()
            bar.update()
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
            bar.update()
    return statistics.median(times), times


def command_line() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


SUMMARY_START = "<!-- summary:start: generated from the sections below by bench/common.py; do not edit -->"
SUMMARY_END = "<!-- summary:end -->"
ROWS_MARK = "<!-- summary-rows: "
HEADER = (
    "# Sift benchmarks\n\nEvery section below was appended by a script in `bench/`; rerun the command shown to "
    "reproduce it. Figures are medians of the stated number of runs after a warm-up; ratios compare runs made in "
    "the same process or the same run. The summary is generated from the sections (the latest run of each).\n"
)


def append_report(title: str, body: str, summary: list[dict[str, str]] | None = None) -> None:
    """Append a dated section (command, machine, body) to docs/benchmarks.md, print it, and regenerate the
    summary. `summary` rows (claim, figure, target, holds) are stored in the section as a comment and are the
    only source of the summary table: nothing in it is written by hand."""
    section = (
        f"\n## {title}\n\n"
        f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}\n"
        f"- command: `{command_line()}`\n"
        f"- machine: {machine()}\n\n{body.strip()}\n"
    )
    if summary:
        section += f"\n{ROWS_MARK}{json.dumps(summary, ensure_ascii=False)} -->\n"
    print(section)
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    if not REPORT.exists():
        REPORT.write_text(HEADER)
    with open(REPORT, "a", encoding="utf-8") as handle:
        handle.write(section)
    write_summary()


def parse_sections(text: str) -> list[dict[str, Any]]:
    """Every `## ` section of the report: title, date, command and its summary rows (if it has any)."""
    sections = []
    for chunk in re.split(r"\n(?=## )", text):
        if not chunk.startswith("## "):
            continue
        title = chunk.splitlines()[0][3:].strip()
        date = re.search(r"^- date: (.+)$", chunk, re.M)
        command = re.search(r"^- command: `(.+)`$", chunk, re.M)
        rows = re.search(re.escape(ROWS_MARK) + r"(.+) -->", chunk)
        sections.append(
            {
                "title": title,
                "date": date.group(1) if date else "",
                "command": command.group(1) if command else "",
                "rows": json.loads(rows.group(1)) if rows else None,
            }
        )
    return sections


def summary_table(sections: list[dict[str, Any]]) -> str:
    """The summary: for the latest section of each title, its rows, or a pointer when it has none."""
    latest: dict[str, dict[str, Any]] = {}
    for section in sections:
        if section["title"] != "Summary":
            latest[section["title"]] = section
    lines = [
        "## Summary",
        "",
        "Generated from the latest section of each title; a section without summary rows predates generated "
        "summaries (rerun its command to add them).",
        "",
        "| section (latest run) | claim | figure | target | holds |",
        "|---|---|---:|---:|---|",
    ]
    for title, section in latest.items():
        where = f"{title} ({section['date'] or 'undated'})"
        if not section["rows"]:
            lines.append(f"| {where} | see the section | – | – | – |")
            continue
        for row in section["rows"]:
            lines.append(
                f"| {where} | {row.get('claim', '')} | {row.get('figure', '')} | {row.get('target', '–')} "
                f"| {row.get('holds', '–')} |"
            )
    return "\n".join(lines)


def write_summary() -> None:
    """Rewrite the summary block at the top of docs/benchmarks.md from its sections."""
    text = REPORT.read_text(encoding="utf-8")
    body = text
    if SUMMARY_START in text:
        before, rest = text.split(SUMMARY_START, 1)
        body = before + rest.split(SUMMARY_END, 1)[1]
    head, _, sections_text = body.partition("\n## ")
    sections_text = "## " + sections_text if sections_text else ""
    block = f"{SUMMARY_START}\n{summary_table(parse_sections(sections_text))}\n{SUMMARY_END}\n"
    REPORT.write_text(f"{HEADER}\n{block}\n{sections_text.lstrip()}", encoding="utf-8")
