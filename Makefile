# The two commands (README): `make run` and `make test`. Everything else is a step they call.
VENV   ?= .venv
PYTHON ?= python3
BIN     = $(VENV)/bin
# torch first, pinned to the CPU build this machine has on disk; elsewhere: TORCH_SPEC="torch>=2.4" make setup,
# or install your own build into $(VENV) before running make.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup run test lint browser postgres clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e '.[export,test,bench,lint]'
	touch $@

# Train the default shop model if models/default has none, then serve it on http://127.0.0.1:8000
run: setup
	$(BIN)/supportbot serve

# The web-page test drives a real headless Chromium (Debian's package).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else echo "Chromium is missing: sudo apt-get install chromium chromium-driver"; exit 1; fi; }

# ruff (rules in pyproject.toml) over the tree; mypy strict on bot/, and over finetune/, supportbot/ and serve/ (pyproject.toml).
lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy bot
	$(BIN)/mypy finetune supportbot
	$(BIN)/mypy serve

# The README's test command: lint first, then the whole suite.
# The PostgreSQL tests start throwaway clusters with Debian's initdb/pg_ctl (tests/pg_cluster.py).
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	  else echo "PostgreSQL is missing: sudo apt-get install postgresql"; exit 1; fi; }

test: setup browser postgres lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .pytest_cache
