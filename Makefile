# Quick start: `make demo`, then `make test`. Everything installs into .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
REQUIREMENTS ?= requirements-dev.txt
SOURCES := pyproject.toml sanitizer.pth hatch_build.py sanitizer/_speedups.c $(shell find sanitizer plugins -name '*.py' 2>/dev/null)
# The core suite also runs on these (pyenv interpreters; CI has them all).
OTHER_PYTHONS ?= 3.10 3.12 3.13
CORE_TESTS := tests/test_api.py tests/test_end_to_end.py tests/test_sqlite3_plugin.py \
	tests/test_asyncio.py tests/test_inline.py tests/test_core.py tests/test_events.py tests/test_overlap.py

.PHONY: install demo test test-pythons test-free-threaded lint bench bench-instructions bench-pytest realworld realworld-aiosqlite clean

# The package is installed as a real wheel (not editable): that is what users
# get, it maps plugins/ to sanitizer.plugins, and it installs sanitizer.pth.
$(VENV)/.stamp-deps: $(REQUIREMENTS) requirements/db.txt requirements/mysqlclient.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r $(REQUIREMENTS) .
	@if [ "$(REQUIREMENTS)" = requirements-dev.txt ]; then \
	  $(PY) -m pip install -q -r requirements/mysqlclient.txt || { \
	    if [ "$$CI" = true ]; then exit 1; fi; \
	    echo "mysqlclient did not build (apt-get install libmariadb-dev pkg-config): its tests will skip"; }; \
	fi
	touch $@

$(VENV)/.stamp-install: $(VENV)/.stamp-deps $(SOURCES)
	$(PY) -m pip install -q --no-deps --force-reinstall .
	touch $@

install: $(VENV)/.stamp-install

# The demo's JSON run is saved (with history=8) and written as an HTML report.
DEMO_REPORT ?= demo-report
demo: install
	DEMO_LOG=build/demo/violations.jsonl $(PY) examples/demo.py
	@echo
	$(VENV)/bin/sanitize-threads html build/demo/violations.jsonl -o $(DEMO_REPORT) \
	  --title "make demo: examples/flask_style_app.py"

# The entry-script pytest, not `python -m pytest`: that would put the source
# tree (which has no sanitizer.plugins) ahead of the installed wheel.
# The core suite runs again over the Python core, as coverage.py runs its tests over
# both of its tracers: the C core is the default, the Python one its fallback.
test: install
	$(VENV)/bin/pytest -p no:cacheprovider -n 2
	@echo "== core suite on the Python core (SANITIZE_THREADS_CORE=python)"
	SANITIZE_THREADS_CORE=python $(VENV)/bin/pytest -p no:cacheprovider -q -n 2 \
	  -p no:dbservers $(CORE_TESTS)

test-pythons:
	@for v in $(OTHER_PYTHONS); do \
	  py=$$(ls -d $(HOME)/.pyenv/versions/$$v.*/bin/python 2>/dev/null | tail -1); \
	  if [ -z "$$py" ]; then \
	    if [ "$$CI" = true ]; then echo "Python $$v not found" >&2; exit 1; fi; \
	    echo "Python $$v not found: skipped"; continue; fi; \
	  $(MAKE) --no-print-directory install PYTHON=$$py VENV=.venv-$$v \
	    REQUIREMENTS=requirements/core.txt || exit 1; \
	  echo "== core suite on Python $$v"; \
	  .venv-$$v/bin/pytest -p no:cacheprovider -q -p no:dbservers $(CORE_TESTS) || exit 1; \
	done

# The core suite on a free-threaded CPython 3.13 (python3.13t, no GIL), both cores.
# .ci/build-free-threaded builds it once into ~/.cache (about 4 minutes on 2 cores).
# Every run first checks that the GIL stays off after the C core, wrapt and structlog
# are imported; -W makes a module that would turn it back on fail where it is imported.
FT_VENV := .venv-3.13t
FT_PYTEST := env -u PYTHON_GIL $(FT_VENV)/bin/pytest -p no:cacheprovider -q -p no:dbservers \
	-W "error:The global interpreter lock (GIL) has been enabled:RuntimeWarning"
test-free-threaded:
	@py=$$(.ci/build-free-threaded) && \
	  $(MAKE) --no-print-directory install PYTHON=$$py VENV=$(FT_VENV) REQUIREMENTS=requirements/core.txt
	cd /tmp && env -u PYTHON_GIL $(CURDIR)/$(FT_VENV)/bin/python -c 'import sys; \
	  assert not sys._is_gil_enabled(), "the GIL is on at start"; \
	  [sys.exit(f"importing {m} turned the GIL on") for m in ("sanitizer._speedups", "wrapt", \
	    "structlog", "sanitizer") if __import__(m) and sys._is_gil_enabled()]; \
	  import sanitizer.threads as t; assert t.CORE == "c", t.CORE; \
	  print("free-threaded", sys.version.split()[0] + ": the GIL stays off, C core")'
	@echo "== core suite on free-threaded Python 3.13t"
	$(FT_PYTEST) $(CORE_TESTS)
	@echo "== core suite on free-threaded Python 3.13t, Python core (SANITIZE_THREADS_CORE=python)"
	SANITIZE_THREADS_CORE=python $(FT_PYTEST) $(CORE_TESTS)

lint: install
	$(VENV)/bin/ruff check sanitizer plugins tests benchmarks examples realworld hatch_build.py
	cd $(VENV) && bin/mypy --config-file ../pyproject.toml -p sanitizer

bench: install
	$(PY) benchmarks/bench_sqlite.py --fast

# The same per-call overheads as instruction counts (callgrind): stable on a busy machine.
bench-instructions: install
	$(PY) benchmarks/bench_sqlite.py --instructions

# pytest --sanitize-threads against plain pytest on 2,000 generated sqlite tests
# (a few minutes; --instructions needs valgrind).
bench-pytest: install
	$(PY) benchmarks/bench_pytest.py --instructions

bench-asyncio: install
	$(PY) benchmarks/bench_asyncio.py --fast

# Django's and SQLAlchemy's own thread tests from their sdists, plain and sanitized:
# outcomes must not change and every report must be an expected, explained one.
realworld: realworld-aiosqlite
	$(PY) realworld/django_suite.py
	$(PY) realworld/sqlalchemy_suite.py

# aiosqlite's whole suite under pytest --sanitize-threads: zero reports (seconds; CI runs it).
realworld-aiosqlite: install
	$(PY) realworld/aiosqlite_suite.py

clean:
	rm -rf $(VENV) .venv-* build dist .mypy_cache .ruff_cache .pytest_cache
