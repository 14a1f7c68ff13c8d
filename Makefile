# Every target installs what it needs: `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The CPU build of PyTorch (a bare `torch` pulls several GB of CUDA wheels).
TORCH  ?= torch==2.13.0

.PHONY: setup demo test test-all bench lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev,all]'
	touch $(STAMP)

demo: setup
	$(BIN)/python -m pixcrawler._demo --out demo-out

# mypy reads both packages where they lie (mypy_path in pyproject.toml names sdk/ and engine/).
lint: setup
	$(BIN)/ruff check engine sdk tests bench
	$(BIN)/ruff format --check engine sdk tests bench
	$(BIN)/mypy -p pixcrawler -p pixcrawler_engine
	$(BIN)/mypy tests bench

format: setup
	$(BIN)/ruff check --fix engine sdk tests bench
	$(BIN)/ruff format engine sdk tests bench

test: setup lint
	$(BIN)/pytest -q -p no:cacheprovider

test-all: setup lint
	PIXCRAWLER_SLOW_TESTS=1 $(BIN)/pytest -q -p no:cacheprovider

bench: setup
	$(BIN)/python -m bench --out bench/results

clean:
	rm -rf $(VENV) demo-out build dist
