# `make test` and `make demo` do their own set-up on a fresh machine: a .venv, torch==2.13.0 first (the CPU
# wheel; a bare `torch` would pull a multi-GB CUDA build), then lsfused with its extras.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo bench gpu-check lint format clean

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,demo]' ruff
	@# The text demo's data: WordNet 3.0 from Debian's wordnet-base (installed when missing and we are root).
	@if [ ! -e /usr/share/wordnet/data.noun ]; then \
	  if [ "$$(id -u)" = 0 ]; then (apt-get update -qq && apt-get install -y -qq wordnet-base) >/dev/null; \
	  else echo "note: install Debian's wordnet-base for the text demo (sudo apt-get install wordnet-base)"; fi; \
	fi
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

# The main job: the 3-seed MiniLM comparison with the tuned-Adam row (`lsfused demo` alone runs one seed).
demo: $(STAMP)
	$(PY) -m lsfused demo --seeds 3

bench: $(STAMP)
	$(PY) -m pytest benchmarks -m benchmark -p no:cacheprovider
	$(PY) -m lsfused bench --plot

# On a CUDA machine: the GPU tests, op bandwidth and step ratios per GPU backend, peak memory per optimizer, one table.
gpu-check: $(STAMP)
	$(PY) -m lsfused.apps.gpu_check

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) build *.egg-info
