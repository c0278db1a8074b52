# `make demo` and `make test` each build .venv from nothing on first use, and again whenever PYTHON names another
# interpreter than the one .venv was built with (make test PYTHON=python3.12).
# torch is installed first and pinned: a bare `torch` requirement on a machine without it would pull
# a multi-GB CUDA build, while this pin takes the CPU wheel where one is on hand.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# An interpreter's identity: the real path of the Python a venv was made from, and its version.
IDENTITY := import os, sys; print(os.path.realpath(getattr(sys, "_base_executable", sys.executable)), sys.version.split()[0])

.PHONY: demo test venv check-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install '$(TORCH)'
	$(PY) -m pip install -e '.[dev,examples,test]'
	touch $@

# Remove .venv when it was built with another interpreter than $(PYTHON).
check-venv:
	@have="$$($(PY) -c '$(IDENTITY)' 2>/dev/null)"; want="$$($(PYTHON) -c '$(IDENTITY)')" || exit 1; \
	if [ -e $(VENV) ] && [ "$$have" != "$$want" ]; then \
		echo "$(VENV) was built with '$${have:-an interpreter that no longer runs}', PYTHON=$(PYTHON) is '$$want': rebuilding it"; \
		rm -rf $(VENV); \
	fi

venv: check-venv
	@$(MAKE) --no-print-directory $(STAMP)

demo: venv
	$(PY) -m lightning_prune.app

test: venv
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q
