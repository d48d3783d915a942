# metaham: two commands do all the set-up on a fresh machine.
#   make demo   creates .venv, installs, runs the main job on built-in defaults
#   make test   creates .venv if needed, installs, runs the tests
#   make bench  runs every benchmark and prints the speed-up tables
# Override the PyTorch build with e.g. `make test TORCH_SPEC="torch==2.13.0+cu126"`, the interpreter with
# `make test PYTHON=python3.12` (Python 3.10-3.13 are tested).

PYTHON ?= python3
# One virtualenv per interpreter: `make test PYTHON=python3.13` builds .venv-python3.13 beside the default .venv.
VENV ?= $(if $(filter python3,$(PYTHON)),.venv,.venv-$(notdir $(PYTHON)))
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
# The install is skipped when neither pyproject.toml nor TORCH_SPEC changed.
STAMP := $(VENV)/.installed-$(shell printf '%s' '$(TORCH_SPEC)' | cksum | cut -d' ' -f1)
DEMO_OUT ?= demo_out
PYTEST_ARGS ?=

.PHONY: demo test bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(BIN)/metaham demo --out $(DEMO_OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/metaham bench all

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
