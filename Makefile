# Quick start: `make up` runs the local cluster, `make test` runs the suite.
# Both create .venv on first use and install the project with the extras they need.
#
# torch: TORCH_SPEC is installed first, on its own, when the venv has no torch yet. From PyPI,
# Linux x86_64 gets the CUDA build of torch (several GB of downloads). On a machine without a
# GPU, take the CPU build instead:  make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
# (the development machines need neither: their pip finds a CPU wheel of 2.13.0 on local disk).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
EXTRAS ?= worker,local,test
ARGS ?=

.PHONY: up test bench soak lint install check-base clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install \
		$(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -e ".[$(EXTRAS)]"
	touch $(STAMP)

up: $(STAMP)
	$(BIN)/chatstream up $(ARGS)

# scripts/install_test_deps.sh: what the tests need from Debian (apt-get, as root): chromium
# for the browser tests, curl and openssl for the docs' shell blocks.
test: $(STAMP)
	sh scripts/install_test_deps.sh
	$(BIN)/python -m pytest -q $(ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench $(ARGS)

soak: $(STAMP)
	$(BIN)/python -m bench --scenarios soak $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

# The base install alone (what the gateway image gets): `chatstream gateway --help` runs and
# nothing imports torch. A throwaway venv, so the dev venv's extras cannot hide a missing one.
check-base:
	rm -rf /tmp/chatstream-base-venv build
	$(PYTHON) -m venv /tmp/chatstream-base-venv
	/tmp/chatstream-base-venv/bin/python -m pip install -q .
	cd /tmp && /tmp/chatstream-base-venv/bin/python $(CURDIR)/scripts/check_base_install.py
	rm -rf /tmp/chatstream-base-venv build

clean:
	rm -rf $(VENV) .pytest_cache bench/results
