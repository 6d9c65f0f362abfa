# Two entry points: `make demo` (set up + train/evaluate on the embedded synthetic data) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/semiseg demo

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks

test: lint
	$(PY) -m pytest -q -n auto --dist loadfile
