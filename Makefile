# minisora: `make demo` runs the whole pipeline on the embedded default, `make test` the tests.
# Both set up .venv first. The venv sees the system's packages, so a machine that already has a
# CUDA build of torch keeps it; on a machine without torch we install torch==2.13.0 (CPU wheel).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
COLOSSALAI_VERSION ?= 0.5.0
DEMO_DIR ?= outputs/demo

.PHONY: setup demo test test-fast bench clean-demo

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	@# keep an existing torch (e.g. a CUDA build); otherwise take the pinned CPU wheel
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -e ".[dev]"
	@# colossalai pins torch<=2.5.1 / transformers / diffusers: install it without its pins
	$(PY) -m pip install --no-deps "colossalai==$(COLOSSALAI_VERSION)"
	$(PY) -c "import torch, diffusers, zarr, colossalai; print('minisora env ok: torch', torch.__version__)"
	touch $@

demo: setup
	$(VENV)/bin/minisora demo --out $(DEMO_DIR)

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q tests

test-fast: setup
	$(VENV)/bin/python -m pytest -q -m "not slow" tests

clean-demo:
	rm -rf $(DEMO_DIR)
