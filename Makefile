# Every target bootstraps .venv on its own: on a fresh clone `make test` or `make demo` is the first and only command.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# quality studies (tens of minutes each) are run by hand, not by `make bench`
STUDIES := bench/nested_quality.py bench/nested_recall.py bench/morph_growth.py
BENCHES := $(basename $(notdir $(filter-out bench/__init__.py bench/common.py $(STUDIES),$(wildcard bench/*.py))))

.PHONY: setup test lint typecheck pytest demo bench clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	# constraints.txt pins torch to the local CPU build; without it pip may resolve a multi-GB CUDA build.
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	# torchcfm without its declared dependencies (they pull torchvision); what it imports is already installed
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt --no-deps torchcfm
	@touch $(STAMP)

setup: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/python -m pytest

test: lint typecheck pytest

demo: $(STAMP)
	$(BIN)/cambium demo

bench: $(STAMP)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev,bench]'
	@for b in $(BENCHES); do echo "== bench.$$b"; $(BIN)/python -m bench.$$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
