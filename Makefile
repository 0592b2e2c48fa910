# neod: `make setup` builds everything into .venv (idempotent, quick the second time), `make test`
# is what CI runs (.ci/run), `make run` starts the daemon. See docs/build.md.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
TORCH_VERSION := 2.13.0
STAMPS := $(VENV)/.neod
EXT_SUFFIX := $(shell $(PYTHON) -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))' 2>/dev/null)
NATIVE := neod/cython/_native$(EXT_SUFFIX)
NATIVE_SOURCES := setup.py $(wildcard ispc/*.ispc ispc/*.isph neod/cython/*.pyx \
                  neod/cython/*.pxd neod/cython/neod_*.c neod/cython/neod_*.h)

.PHONY: setup test lint run cuda ispc-tool clean distclean

setup: $(STAMPS)/installed $(NATIVE)

$(PY):
	scripts/check_build_deps.sh $(PYTHON)
	$(PYTHON) -m venv $(VENV)

# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
$(STAMPS)/torch: | $(PY)
	$(PIP) install -q "torch==$(TORCH_VERSION)"
	@mkdir -p $(STAMPS) && touch $@

$(STAMPS)/installed: pyproject.toml setup.py $(STAMPS)/torch | ispc-tool
	$(PIP) install -q "setuptools>=64" wheel "Cython>=3.0"
	$(PIP) install -q --no-build-isolation -e ".[test]"
	@touch $@

# Quick when ispc is already there; otherwise installs it into .toolchain/.
ispc-tool:
	@scripts/install_ispc.sh >/dev/null

$(NATIVE): $(NATIVE_SOURCES) $(STAMPS)/installed | ispc-tool
	$(PY) setup.py -q build_ext --inplace
	@touch $@

lint: setup
	$(VENV)/bin/ruff check .

# ruff first, so that pytest's summary is the last line of the output.
test: lint
	$(PY) -m pytest -q

run: setup
	$(VENV)/bin/neod

cuda:
	@if command -v nvcc >/dev/null; then bash scripts/build_cuda.sh; \
	else echo "nvcc not found: the CUDA library is not built (neod falls back to torch)"; fi

clean:
	rm -rf build *.egg-info neod/cython/_native*.so
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) .toolchain
