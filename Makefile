# Both targets are self-contained on a fresh machine: they create .venv if it is missing.
# torch is pinned and installed first so that pip takes the local CPU build and never
# resolves a multi-GB CUDA wheel for the looser `torch>=...` in pyproject.toml.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: test lint demo install clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check lightning_utils tests benchmarks examples
	$(VENV)/bin/ruff format --check lightning_utils tests benchmarks examples
	$(VENV)/bin/mypy

# Two workers, one test file each at a time: module-scoped fixtures (a 2-rank run shared by a
# file's tests) run once, and the 2-core CI machine is kept busy while a test waits on its ranks.
PYTEST_WORKERS ?= 2

test: lint
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile

demo: $(STAMP)
	$(PY) -m pip install -q -e '.[test,plot]'
	$(PY) examples/train_codec_lm.py

clean:
	rm -rf $(VENV) build *.egg-info demo_output
