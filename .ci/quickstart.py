#!/usr/bin/env python3
"""The README's quick start, run as a newcomer runs it: `git clone`, `make run`, the README's own examples.

Clones this repository's committed HEAD into a fresh folder, runs `make run` there (which creates .venv,
installs everything, indexes examples/ and serves on loopback), waits for `/readyz`, then runs the README's
fenced examples exactly as written (only the port is changed, to a free one) and checks their answers:

- the search example returns hits for "how do stars form?";
- `/v1/answer` answers "When was the Eiffel Tower completed?" with 1889, citing hist-013;
- the openai chat example answers "What causes tides?" naming the Moon's gravity, citing earth-013.

Then it stops the server and runs `make run` again in the same clone, to time a start from a warm cache.
Standard library only (it runs before any virtual environment exists). Exit status 0 only if every check
holds; `make quickstart-check` runs it and CI (`.ci/run`) runs that.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 1800  # a cold clone installs torch and the rest from the package registry


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def readme_blocks(readme: str) -> list[str]:
    """The fenced bash blocks of the README's opening section (before its first `## ` heading) that talk to
    the server's API on localhost:8000 (not the `make run` block itself): the examples a newcomer runs first."""
    opening = readme.split("\n## ")[0]
    return [b for b in re.findall(r"```bash\n(.*?)```", opening, flags=re.S) if "localhost:8000/v1/" in b]


def wait_ready(port: int, server: subprocess.Popen, log: Path, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if server.poll() is not None:
            sys.exit(f"FAIL: `make run` exited with {server.returncode} before it was ready:\n{tail(log)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as reply:
                if reply.status == 200:
                    return time.monotonic() - started
        except OSError:
            pass
        time.sleep(1)
    sys.exit(f"FAIL: not ready within {timeout:.0f} s:\n{tail(log)}")


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def start(clone: Path, port: int, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIFT_")}  # the shipped defaults only
    return subprocess.Popen(
        ["make", "run", f"PORT={port}"],
        cwd=clone,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # make, sift serve and its children: one process group to stop
    )


def stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def server_start(log: Path) -> float:
    """Seconds from the server's start to ready, from its `ready` log line (models and builds loaded)."""
    found = re.findall(r'"msg": "ready".*?"start_s": ([0-9.]+)', log.read_text(errors="replace"))
    return float(found[-1]) if found else float("nan")


def as_json(line: str) -> dict:
    try:
        value = json.loads(line)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def check(name: str, ok: bool, shown: str) -> bool:
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {shown.strip()[:400]}")
    return ok


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="sift-quickstart-"))
    clone = work / "sift"
    cloned_at = time.monotonic()
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True, text=True).stdout
    print(f"fresh clone of {head.strip()} in {clone}")
    port = free_port()
    log = work / "make-run.log"
    server = start(clone, port, log)
    results: dict[str, float] = {}
    try:
        results["first_start_to_ready_s"] = wait_ready(port, server, log, READY_TIMEOUT_S)
        results["clone_to_ready_s"] = time.monotonic() - cloned_at
        results["server_start_s"] = server_start(log)
        ok = True
        blocks = readme_blocks((clone / "README.md").read_text(encoding="utf-8"))
        if not check("README has the search and answer examples", len(blocks) == 2, f"{len(blocks)} blocks"):
            return 1
        outputs = []
        for block in blocks:
            script = block.replace("localhost:8000", f"localhost:{port}")
            run = subprocess.run(
                ["bash", "-e", "-o", "pipefail", "-c", script], cwd=clone, capture_output=True, text=True, timeout=600
            )
            outputs.append(run.stdout)
            ok &= check(f"README block exits 0: {block.splitlines()[0][:60]}", run.returncode == 0, run.stderr[-800:])
        everything = "\n".join(outputs)
        search = json.loads(outputs[0]) if outputs[0].strip().startswith("{") else {}
        ok &= check("search returns 3 hits", len(search.get("hits", [])) == 3, outputs[0][:300])
        answer = next((d for d in map(as_json, everything.splitlines()) if "answer" in d), {})
        cited = [c.get("doc_id") for c in answer.get("citations", [])]
        ok &= check(
            "Eiffel Tower answer says 1889 and cites hist-013",
            "1889" in answer.get("answer", "") and "hist-013" in cited,
            f"{answer.get('answer')!r} citing {cited}",
        )
        chat = [line for line in everything.splitlines() if "earth-013" in line or "tide" in line.lower()]
        chat_text = "\n".join(chat)
        ok &= check(
            "tides chat names the Moon's gravity and cites earth-013",
            "Moon's gravity" in chat_text and "'doc_id': 'earth-013'" in chat_text,
            chat_text,
        )
        stop(server)
        server = start(clone, port, log)
        results["warm_make_run_to_ready_s"] = wait_ready(port, server, log, 600)
        results["warm_server_start_s"] = server_start(log)
    finally:
        stop(server)
    print(json.dumps({k: round(v, 1) for k, v in results.items()}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
