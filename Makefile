# `make demo` and `make test` each build .venv from nothing on first use.
# torch is installed first and pinned: a bare `torch` requirement on a machine without it would pull
# a multi-GB CUDA build, while this pin takes the CPU wheel where one is on hand.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install '$(TORCH)'
	$(PY) -m pip install -e '.[dev,examples,test]'
	touch $@

demo: $(STAMP)
	if [ -f examples/train.py ]; then $(PY) examples/train.py; else $(PY) examples/minimal.py; fi

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q
