"""The remote generator against a real third-party OpenAI-compatible server: llama.cpp's (llama-cpp-python's
`llama_cpp.server`) serving the SmolLM2 GGUF that Sift already installs. Building llama-cpp-python from source
takes about 15 minutes here, so this suite has its own target, `make test-llama` (a separate venv,
.venv-llama); `make test` and CI skip it (set SIFT_LLAMA_PYTHON to a Python that has llama_cpp.server)."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from app.generation.base import GenerationOptions
from app.generation.remote import OpenAICompatibleGenerator, RemoteGenerationError
from app.settings import load_settings
from indexer.lm import SMOLLM2_GGUF, smollm2_dir
from tests.conftest import ROOT
from tests.servers import app_client, free_port

pytestmark = pytest.mark.llama

LLAMA_PYTHON = os.environ.get("SIFT_LLAMA_PYTHON") or str(ROOT / ".venv-llama" / "bin" / "python")
QUESTION = "When was the Eiffel Tower completed?"


def _has_llama_server() -> bool:
    if not Path(LLAMA_PYTHON).exists():
        return False
    probe = subprocess.run([LLAMA_PYTHON, "-c", "import llama_cpp.server"], capture_output=True, timeout=120)
    return probe.returncode == 0


@pytest.fixture(scope="module")
def llama_server():
    if not _has_llama_server():
        pytest.skip(f"no llama_cpp.server at {LLAMA_PYTHON}; `make test-llama` builds it (about 15 minutes)")
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False)
    cmd = [
        LLAMA_PYTHON,
        "-m",
        "llama_cpp.server",
        "--model",
        str(smollm2_dir() / SMOLLM2_GGUF),
        "--model_alias",
        "smollm2-gguf",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        "4096",
        "--n_threads",
        "2",
    ]
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"{base}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None, open(log.name).read()[-3000:]
            time.sleep(0.5)
        yield base
    finally:
        process.kill()
        process.wait(timeout=30)
        os.unlink(log.name)


def test_generate_and_stream_agree_with_llama_cpp(llama_server):
    remote = OpenAICompatibleGenerator(llama_server, "smollm2-gguf", api_key_env=None, timeout_s=120)
    messages = [{"role": "user", "content": "Name the capital of France in one word."}]
    options = GenerationOptions(max_new_tokens=16, seed=1)
    result = remote.generate(messages, options)
    assert result.text and result.completion_tokens > 0 and result.prompt_tokens > 0
    assert result.finish_reason in ("stop", "length")
    streamed = list(remote.stream(messages, options))
    assert len(streamed) >= 2 and "".join(streamed).strip() == result.text
    stopped = remote.generate(messages, GenerationOptions(max_new_tokens=16, seed=1, stop=[result.text[1:3]]))
    assert result.text[1:3] not in stopped.text


def test_sift_answers_through_llama_cpp(llama_server, example_index):
    settings = load_settings(
        bundle=example_index,
        reranker={"model": None},
        answer={"mode": "generative"},
        generator={
            "backend": "openai",
            "base_url": llama_server,
            "model": "smollm2-gguf",
            "api_key_env": None,
            "timeout_s": 120,
        },
    )
    with app_client(settings) as client:
        plain = client.post("/v1/answer", json={"question": QUESTION})
        assert plain.status_code == 200, plain.text
        data = plain.json()
        assert data["answered"] and data["model"] == "smollm2-gguf" and data["passages"][0]["doc_id"] == "hist-013"
        assert data["citations"] and data["answer"].strip()
        with client.stream("POST", "/v1/answer", json={"question": QUESTION, "stream": True}) as r:
            events = [line for line in r.iter_lines() if line.startswith("event: ")]
        assert events[0] == "event: passages" and events[-1] == "event: done" and "event: token" in events


def test_upstream_errors_are_reported_without_upstream_details(llama_server):
    remote = OpenAICompatibleGenerator(llama_server, "smollm2-gguf", api_key_env=None, timeout_s=60, max_retries=0)
    huge = [{"role": "user", "content": "word " * 20000}]  # beyond n_ctx: llama.cpp refuses it
    with pytest.raises(RemoteGenerationError) as failed:
        remote.generate(huge, GenerationOptions(max_new_tokens=4))
    assert "127.0.0.1" not in str(failed.value) and "HTTP" in failed.value.detail
    json.dumps({"detail": failed.value.detail})  # loggable
