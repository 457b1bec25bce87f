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

# The Keras seed runs in its own environment, so TensorFlow never meets catdog's torch.
KERAS_VENV := benchmarks/.venv-keras
$(KERAS_VENV)/.installed:
	$(PYTHON) -m venv $(KERAS_VENV)
	$(KERAS_VENV)/bin/python -m pip install -q --upgrade pip
	$(KERAS_VENV)/bin/python -m pip install -q tensorflow-cpu==2.21.0 scikit-learn pillow
	touch $@

bench: install $(KERAS_VENV)/.installed  # the profile, then speed side by side with the Keras seed (~20 min)
	$(PY) benchmarks/breakdown.py --data $(firstword $(wildcard ../shared/data/cats_and_dogs) data/cats_and_dogs)
	$(PY) benchmarks/speed.py --keras-python $(KERAS_VENV)/bin/python

bench-accuracy: install  # where an epoch of the recipe goes (under a minute), then the recipe over 3 seeds (~45 min on 2 cores)
	$(PY) benchmarks/recipe_profile.py
	$(PY) benchmarks/accuracy.py --seeds 0 1 2

clean:
	rm -rf $(VENV) runs .pytest_cache
