# Quick start: `make demo`, then `make test`. Everything installs into .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SOURCES := pyproject.toml sanitizer.pth $(shell find sanitizer plugins -name '*.py' 2>/dev/null)

.PHONY: install demo test lint bench clean

# The package is installed as a real wheel (not editable): that is what users
# get, it maps plugins/ to sanitizer.plugins, and it installs sanitizer.pth.
$(VENV)/.stamp-deps: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt .
	touch $@

$(VENV)/.stamp-install: $(VENV)/.stamp-deps $(SOURCES)
	$(PY) -m pip install -q --no-deps --force-reinstall .
	touch $@

install: $(VENV)/.stamp-install

demo: install
	$(PY) examples/demo.py

test: install
	$(VENV)/bin/pytest -p no:cacheprovider

lint: install
	$(VENV)/bin/ruff check sanitizer plugins tests benchmarks examples
	cd $(VENV) && bin/mypy --config-file ../pyproject.toml -p sanitizer

bench: install
	$(PY) benchmarks/bench_sqlite.py

clean:
	rm -rf $(VENV) build dist .mypy_cache .ruff_cache .pytest_cache
