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

test: lint
	$(PY) -m pytest

demo: $(STAMP)
	$(PY) -m pip install -q -e '.[test,plot]'
	$(PY) examples/train_codec_lm.py

clean:
	rm -rf $(VENV) build *.egg-info demo_output
