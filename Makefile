# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
# Every install is constrained by requirements/lock.txt (the exact versions CI tested, CPU torch),
# so a fresh clone installs what CI ran. Maintainers: `make test-latest` tries the newest releases
# in .venv-latest; `make lock` re-resolves to the newest releases, runs the interop tests on them
# and writes the lock (commit it after `make test` passes). See README "Installation".
# GPU users: make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu124"
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK := requirements/lock.txt
TORCH_SPEC ?= torch==2.13.0
# extras installed by `make setup` / `make test`; a target needing fewer installs its own set
# through $(call installed,EXTRAS) ("base" = no extras), each against the same lock
EXTRAS ?= dev
PYTEST_ARGS ?=
# test processes (pytest-xdist): the suite's subprocess tests (DDP, FSDP, the stock lm_eval CLI)
# overlap with the rest; 0 runs it in this process (e.g. to use a debugger)
TEST_WORKERS ?= 2
LATEST_VENV ?= .venv-latest
# what `make test-latest` runs: the tests that exercise third-party releases
LATEST_TESTS ?= tests/test_interop_hf.py tests/test_interop_qwen3.py tests/test_interop_upstream.py \
	tests/test_eval_harness.py $(wildcard tests/test_clients_*.py)

# stamp file of "this venv has polyglu installed with these extras from this lock"
installed = $(VENV)/.polyglu-$(1)

.PHONY: setup test test-all test-latest lock demo lint clean
.PRECIOUS: $(VENV)/.polyglu-%

setup: $(call installed,$(EXTRAS))

# the stamp is older than the lock or pyproject.toml -> reinstall (pip only changes what differs)
$(VENV)/.polyglu-%: pyproject.toml $(LOCK)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -c $(LOCK) $(TORCH_SPEC)
	$(PY) -m pip install -q -c $(LOCK) -e "$(if $(filter base,$*),.,.[$*])"
	touch $@

test: $(call installed,$(EXTRAS))
	$(PY) -m pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)

test-all: $(call installed,$(EXTRAS))
	$(PY) -m pytest -n $(TEST_WORKERS) -m "" $(PYTEST_ARGS)

# A second, throw-away environment with the newest releases of every dependency (torch stays the
# pinned CPU build): run before `make lock`, or to see whether a new transformers/peft/trl/lm-eval
# release breaks the interop. Prints what differs from the lock.
test-latest:
	rm -rf $(LATEST_VENV)
	python3 -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q $(TORCH_SPEC)
	$(LATEST_VENV)/bin/python -m pip install -q -e ".[$(EXTRAS)]"
	@echo "--- newest releases vs $(LOCK) (< lock, > newest):"
	@$(LATEST_VENV)/bin/python -m pip freeze --exclude-editable | sed 's/+cpu$$//' | sort \
		| diff <(grep -v '^#' $(LOCK) | sort) - || true
	$(LATEST_VENV)/bin/python -m pytest -q $(LATEST_TESTS) $(PYTEST_ARGS)

# Update the lock: the newest releases, once their interop tests pass in .venv-latest.
lock: test-latest
	mkdir -p $(dir $(LOCK))
	{ echo "# Every dependency version CI tests (pip constraints; written by 'make lock' from $(LATEST_VENV))."; \
	  echo "# torch is the CPU build of this version (a CUDA build of the same version also satisfies it)."; \
	  $(LATEST_VENV)/bin/python -m pip freeze --exclude-editable | sed 's/+cpu$$//' | sort -f; } > $(LOCK)
	@echo "wrote $(LOCK); now run 'make test' (reinstalls from the new lock) and commit it"

# The demo needs only the core and matplotlib (its report's plots): a lighter set-up of its own, and
# no .pyc compiled up front for all of torch (Python compiles what it imports): measured on the
# shared machine, installing torch took 17.7 s instead of 68.9 s. PIP_COMPILE=0 reaches the set-up's
# pip through this target-specific export.
DEMO_EXTRAS ?= plots
demo: export PIP_COMPILE := 0
demo: $(call installed,$(DEMO_EXTRAS))
	$(VENV)/bin/polyglu demo

lint: $(call installed,$(EXTRAS))
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) $(LATEST_VENV) runs .pytest_cache
