# Two commands for a new user: `make book` and `make test`. Both set up .venv first if needed.
PY ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.minigpt-installed
TORCH_VERSION ?= 2.13.0

.PHONY: setup test test-fast book bench lint clean

setup: $(STAMP)

# Install torch==$(TORCH_VERSION) first where none is present: a bare `torch` requirement would
# otherwise pull a multi-GB CUDA build on a machine without one.
$(STAMP): pyproject.toml
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PYTHON) -m pip install --quiet -e '.[data,book,dev]'
	touch $(STAMP)

# Unit, parity and outcome tests, then every chapter executed at the `ci` profile.
test: $(STAMP)
	MINIGPT_PROFILE=ci $(PYTHON) -m pytest tests notebooks --nbval-lax -p no:cacheprovider

test-fast: $(STAMP)
	MINIGPT_PROFILE=ci $(PYTHON) -m pytest tests -x -q

# Execute the chapters at the `cpu` profile and render the book to _build/html, offline.
book: $(STAMP)
	MINIGPT_PROFILE=cpu $(VENV)/bin/jupyter-book build .
	@echo "Open _build/html/index.html"

bench: $(STAMP)
	$(PYTHON) bench/bench_tokenizer.py
	$(PYTHON) bench/bench_generate.py
	$(PYTHON) bench/bench_train.py

lint: $(STAMP)
	$(VENV)/bin/ruff check minigpt tests bench

clean:
	rm -rf _build .pytest_cache
