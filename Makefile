# embgrad: `make demo` and `make test` work on a fresh machine with Python 3.11 and pip.
PYTHON ?= python3.11
VENV := .venv
PIP := $(VENV)/bin/pip
PY := $(VENV)/bin/python
CONSTRAINTS := constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export HF_HUB_OFFLINE := 1
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: demo test test-main bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# Each stamp records that one set of extras is installed into .venv at these pins.
$(VENV)/.stamp-demo: pyproject.toml $(CONSTRAINTS) | $(VENV)/bin/python
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[torch,tensorflow,viz]"
	touch $@

$(VENV)/.stamp-test: pyproject.toml $(CONSTRAINTS) | $(VENV)/bin/python
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[torch,tensorflow,hf,viz,test,peers]"
	touch $@

demo: $(VENV)/.stamp-demo
	$(VENV)/bin/embgrad demo

test-main: $(VENV)/.stamp-test
	$(PY) -m pytest -q -p no:cacheprovider tests

test: test-main

bench: $(VENV)/.stamp-test
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) .venv-gluon embgrad-report .pytest_cache .hypothesis
