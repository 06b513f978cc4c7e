"""A plain OpenAI-compatible chat model server for tests: the SmolLM2-135M-Instruct that Sift ships as its local
generator, behind `POST /v1/chat/completions` and `GET /v1/models` on uvicorn. It answers what it is asked, with
no retrieval of its own, as any hosted or local model server (vLLM, llama.cpp, Ollama) would: the model that
`examples/rag_langchain.py` talks to in its test.

    python -m tests.openai_server --port 8123
"""

from __future__ import annotations

import argparse
import time
import uuid
from typing import Any

import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

from app.generation.base import GenerationOptions
from app.generation.local import LocalGenerator

MODEL = "smollm2-135m-instruct"


class Message(BaseModel):
    role: str
    content: str


class ChatRequest(BaseModel):
    model: str
    messages: list[Message]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None


def build(cache_dir: str) -> FastAPI:
    generator = LocalGenerator.load("smollm2", cache_dir, "cpu")
    app = FastAPI()

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "tests"}]}

    @app.post("/v1/chat/completions")
    def chat(body: ChatRequest) -> dict[str, Any]:
        options = GenerationOptions(
            max_new_tokens=body.max_completion_tokens or body.max_tokens or 96, temperature=body.temperature or 0.0
        )
        out = generator.generate([m.model_dump() for m in body.messages], options)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.model,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": out.text}, "finish_reason": out.finish_reason}
            ],
            "usage": {
                "prompt_tokens": out.prompt_tokens,
                "completion_tokens": out.completion_tokens,
                "total_tokens": out.prompt_tokens + out.completion_tokens,
            },
        }

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cache-dir", default="var/models")
    args = parser.parse_args()
    uvicorn.run(build(args.cache_dir), host="127.0.0.1", port=args.port, log_level="warning")
