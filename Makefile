# Two entry points: `make demo` (set up, then run the quickstart) and `make test`.
# Both create .venv if absent and install torch *pinned first*, so that no CUDA wheels
# are pulled on a CPU machine. On a GPU machine, pick the matching build, e.g.
#   make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test setup setup-dev clean

# The chat-page test drives headless Chromium from the distribution's packages (a test tool
# never downloads a browser). Installed only when absent; needs root (or sudo) and apt.
CHROMEDRIVER := /usr/bin/chromedriver
SUDO := $(shell [ "$$(id -u)" -ne 0 ] && command -v sudo)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	touch $@

# The demo installs the extras every README command needs (Hugging Face export, the server,
# GGUF), so that after it every command the README shows works.
$(VENV)/.ling: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install --quiet -e ".[hf,serve,gguf]"
	touch $@

$(VENV)/.ling-dev: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.ling
setup-dev: $(VENV)/.ling-dev

$(CHROMEDRIVER):
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver

demo: setup
	$(BIN)/ling quickstart
	@echo "ling is installed in $(VENV): run 'source $(VENV)/bin/activate' to use the ling command in this shell"

# pytest exit code 5 means "no tests were collected": for this project that is a broken
# suite (a bad path or an import-time skip), so it fails loudly instead of passing.
test: setup-dev $(CHROMEDRIVER)
	@$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests — the suite is broken" >&2; exit 1; fi; \
	exit $$rc

clean:
	rm -rf $(VENV) .pytest_cache
