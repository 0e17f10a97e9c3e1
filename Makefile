# `make test`, `make data` and `make demo` bootstrap .venv from requirements.txt when it is
# missing or older than requirements.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test data demo venv clean-data

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

data: $(STAMP)
	$(PY) tools/make_synth_lmdb.py --out data

demo: $(STAMP) data
	@echo "make demo: the active-learning loop is not wired yet; this run built the embedded data only."

clean-data:
	rm -rf data
