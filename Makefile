# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
# GPU users: make setup TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.polyglu-installed
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup test test-all demo lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -m "" $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/polyglu demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
