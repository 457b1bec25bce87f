# Two commands: `make demo` (install, train, evaluate) and `make test` (install, run the test suite).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench bench-accuracy clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0  # CPU build first, so torch>=2.4 below needs nothing more
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(STAMP)

demo: install
	$(VENV)/bin/catdog train --out runs/demo --exist-ok

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
