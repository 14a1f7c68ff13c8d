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

# mypy cannot follow the editable install's package mapping (pixcrawler -> sdk/,
# pixcrawler.engine -> engine/), so it reads the package through a tree of links.
TYPING := .typing

lint: setup
	$(BIN)/ruff check engine sdk tests bench
	$(BIN)/ruff format --check engine sdk tests bench
	rm -rf $(TYPING) && mkdir -p $(TYPING)/pixcrawler
	ln -s $(CURDIR)/sdk/*.py $(CURDIR)/sdk/py.typed $(TYPING)/pixcrawler/
	ln -s $(CURDIR)/engine $(TYPING)/pixcrawler/engine
	MYPYPATH=$(TYPING) $(BIN)/mypy -p pixcrawler
	MYPYPATH=$(TYPING) $(BIN)/mypy tests bench

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
	rm -rf $(VENV) $(TYPING) demo-out build *.egg-info
