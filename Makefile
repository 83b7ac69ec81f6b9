# Fresh machine -> venv -> install -> run. `make quickstart` and `make test` are all a newcomer needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# test processes (pytest-xdist), one thread each; files are the unit of distribution
TEST_WORKERS ?= 2

.PHONY: install quickstart test lint bench clean

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $(STAMP)

install: $(STAMP)

quickstart: install
	$(PY) scripts/quickstart.py

test: install
	$(PY) -m ruff check .
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

lint: install
	$(PY) -m ruff check .

bench: install
	$(PY) benchmarks/bench.py

clean:
	rm -rf runs samples .pytest_cache
