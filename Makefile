# embgrad: `make demo` and `make test` work on a fresh machine with Python 3.11 and pip.
PYTHON ?= python3.11
VENV := .venv
PIP := $(VENV)/bin/pip
PY := $(VENV)/bin/python
CONSTRAINTS := constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export HF_HUB_OFFLINE := 1
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: demo lint test test-main test-slow test-gluon bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# Each stamp records that one set of extras is installed into .venv at these pins.
$(VENV)/.stamp-demo: pyproject.toml $(CONSTRAINTS) | $(VENV)/bin/python
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[torch,viz,privacy]"
	touch $@

$(VENV)/.stamp-test: pyproject.toml $(CONSTRAINTS) | $(VENV)/bin/python
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[torch,tensorflow,hf,viz,test,peers,privacy,jax]"
	touch $@

# ruff and mypy (pinned) beside the test extras: mypy reads the installed numpy/torch/rich types.
$(VENV)/.stamp-lint: $(VENV)/.stamp-test
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[lint]"
	touch $@

# `make lint`: ruff (style, imports, bug patterns) and mypy (types) over src/; settings in pyproject.toml.
lint: $(VENV)/.stamp-lint
	$(VENV)/bin/ruff check src
	$(VENV)/bin/mypy

demo: $(VENV)/.stamp-demo
	$(VENV)/bin/embgrad demo

# `make test`: everything but the tests marked slow, on two workers; under 20 minutes on 2 cores.
test-main: $(VENV)/.stamp-test
	$(PY) -m pytest -q -p no:cacheprovider -n 2 -m "not slow" tests

# `make test-slow`: the tests marked slow (the quick benchmark run end to end, subprocess tests), its
# own CI step after `make test`.
test-slow: $(VENV)/.stamp-test
	$(PY) -m pytest -q -p no:cacheprovider -m slow tests

# MXNet 1.9.1 needs numpy<1.24, so the Gluon suite runs in its own venv, .venv-gluon; there
# EMBGRAD_REQUIRE_GLUON=1 turns "mxnet missing, skipped" into a failure.
GLUON_VENV := .venv-gluon
GLUON_CONSTRAINTS := constraints-gluon.txt

$(GLUON_VENV)/bin/python:
	$(PYTHON) -m venv $(GLUON_VENV)

$(GLUON_VENV)/.stamp-test: pyproject.toml $(GLUON_CONSTRAINTS) | $(GLUON_VENV)/bin/python
	$(GLUON_VENV)/bin/pip install -q -c $(GLUON_CONSTRAINTS) mxnet==1.9.1 numpy==1.23.5 -e ".[gluon,test]"
	$(GLUON_VENV)/bin/python -c "import mxnet, numpy; print('mxnet', mxnet.__version__, 'numpy', numpy.__version__)" \
	  || { echo "mxnet does not import: its wheel bundles OpenBLAS/libgfortran but needs the system's" \
	       "libgomp1 and libquadmath0 (apt-get install libgomp1 libquadmath0)"; exit 1; }
	touch $@

test-gluon: $(GLUON_VENV)/.stamp-test
	EMBGRAD_REQUIRE_GLUON=1 $(GLUON_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/gluon

test: test-main test-gluon

# The benchmark peers, pinned. BackPACK is installed without its dependencies: it requires
# torchvision, which it does not use for BatchGrad and whose PyPI wheel does not import beside
# the CPU torch build ("operator torchvision::nms does not exist"); its pure deps are in [bench].
$(VENV)/.stamp-bench: pyproject.toml $(CONSTRAINTS) | $(VENV)/bin/python
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[torch,tensorflow,hf,viz,test,peers,privacy,jax,bench]"
	$(PIP) install -q -c $(CONSTRAINTS) --no-deps backpack-for-pytorch
	touch $@

# `make bench` writes BENCHMARKS.md and benchmarks/results.json (about half an hour);
# `make bench QUICK=1` (or ARGS=--quick) runs the same code on small sizes into build/bench-quick/.
bench: $(VENV)/.stamp-bench
	$(PY) benchmarks/run.py $(if $(QUICK),--quick) $(ARGS)

clean:
	rm -rf $(VENV) .venv-gluon embgrad-report .pytest_cache .hypothesis .mypy_cache .ruff_cache
