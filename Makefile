# Two entry points that work on a fresh machine with Python >= 3.11, pip and make:
#   make demo   simulate a demo night and calibrate it on a local dask cluster
#   make test   run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO ?= demo

.PHONY: demo test lint install clean

$(BIN)/astep-dask: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/astep-dask

# The demo night has a few deliberately broken files, so inspect and calibrate end
# "partial" (exit 3), naming each with its reason; any other non-zero exit is a failure.
demo: install
	test -d $(DEMO)/2026-06-15 || $(BIN)/astep-dask simulate $(DEMO) --size 512 --bad-files
	$(BIN)/astep-dask inspect $(DEMO)/2026-06-15 || [ $$? -eq 3 ]
	$(BIN)/astep-dask calibrate $(DEMO)/2026-06-15 || [ $$? -eq 3 ]

test: install
	$(BIN)/ruff check astep_dask tests benchmarks
	$(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check astep_dask tests benchmarks

clean:
	rm -rf $(VENV) $(DEMO) build *.egg-info
