# Two commands for a new user: `make book` and `make test`. Both set up .venv first if needed.
PY ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.minigpt-installed
TORCH_VERSION ?= 2.13.0

.PHONY: setup test test-fast test-colab book bench lint clean

setup: $(STAMP)

# Install torch==$(TORCH_VERSION) first where none is present: a bare `torch` requirement would
# otherwise pull a multi-GB CUDA build on a machine without one. The ~190 other packages go in with
# uv, which fetches and unpacks in parallel (2-core machine: 48 s against pip's 133 s, the same
# versions); it compiles their bytecode because Python may be told not to write any at import
# (PYTHONDONTWRITEBYTECODE), and then every kernel would compile torch again. pip if uv fails.
EXTRAS := '.[data,vision,book,dev]'
$(STAMP): pyproject.toml
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip uv
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install --quiet torch==$(TORCH_VERSION)
	$(VENV)/bin/uv pip install --quiet --python $(PYTHON) --compile-bytecode -e $(EXTRAS) \
		|| $(PYTHON) -m pip install --quiet -e $(EXTRAS)
	touch $(STAMP)

# Unit, parity and outcome tests, and the book built at `ci` (which executes every chapter and
# fails on any cell error or warning) and opened in Chromium. One chapter alone, cell by cell:
#   MINIGPT_PROFILE=ci .venv/bin/pytest --nbval-lax notebooks/05_sft.ipynb
test: $(STAMP)
	MINIGPT_PROFILE=ci $(PYTHON) -m pytest tests -p no:cacheprovider -m "not install"

test-fast: $(STAMP)
	MINIGPT_PROFILE=ci $(PYTHON) -m pytest tests -x -q -m "not slow and not install"

# The Colab install path in a fresh virtual env with ipywidgets 7 (a few minutes, needs the index).
test-colab: $(STAMP)
	MINIGPT_PROFILE=ci $(PYTHON) -m pytest tests/test_colab_install.py -q -m install

# Execute the chapters at the `cpu` profile and render the book to _build/html, offline. Warnings
# are errors (-W; --keep-going reports them all) and every cross-reference must resolve (-n).
# book/stale.py first drops the cached execution of each chapter whose package code changed.
book: $(STAMP)
	MINIGPT_PROFILE=cpu $(PYTHON) book/stale.py
	MINIGPT_PROFILE=cpu $(VENV)/bin/jupyter-book build . -W -n --keep-going
	@echo "Open _build/html/index.html"

bench: $(STAMP)
	$(PYTHON) bench/bench_tokenizer.py
	$(PYTHON) bench/bench_generate.py
	$(PYTHON) bench/bench_train.py

lint: $(STAMP)
	$(VENV)/bin/ruff check minigpt tests bench

clean:
	rm -rf _build .pytest_cache
