# minisora: `make demo` runs the whole pipeline on the embedded default, `make test` the tests.
# Both set up .venv first. The venv sees the system's packages, so a machine that already has a
# CUDA build of torch keeps it; on a machine without torch we install torch==2.13.0 (CPU wheel).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
COLOSSALAI_VERSION ?= 0.5.0
DEMO_DIR ?= outputs/demo

.PHONY: setup browser demo test test-fast bench clean-demo

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	@# keep an existing torch (e.g. a CUDA build); otherwise take the pinned CPU wheel
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -e ".[dev,doom]"
	@# colossalai pins torch<=2.5.1 / transformers / diffusers: install it without its pins
	$(PY) -m pip install --no-deps "colossalai==$(COLOSSALAI_VERSION)"
	$(PY) -c "import torch, diffusers, zarr, colossalai; print('minisora env ok: torch', torch.__version__)"
	touch $@

# Debian's chromium + chromedriver, for tests/test_play.py's browser test (`minisora play`): installed
# where apt-get can (root); elsewhere that one test skips and says why.
browser:
	@command -v chromedriver >/dev/null || ! command -v apt-get >/dev/null || [ "$$(id -u)" != 0 ] || \
	  apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } || \
	  echo "warning: could not install chromium + chromedriver; the browser test of minisora play will skip"

demo: setup
	$(VENV)/bin/minisora demo --out $(DEMO_DIR)

test: setup browser
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q tests

test-fast: setup
	$(VENV)/bin/python -m pytest -q -m "not slow" tests

clean-demo:
	rm -rf $(DEMO_DIR)
