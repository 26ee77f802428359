"""Gluon tests: they need mxnet, which lives in .venv-gluon (numpy<1.24), not in the main venv.

Without mxnet every module here is skipped with a reason (each starts with
``pytest.importorskip("mxnet")``). Under ``make test-gluon`` EMBGRAD_REQUIRE_GLUON=1 is set:
then a missing or broken mxnet is an error, and any skip in this folder fails the run.
"""
from __future__ import annotations

import os

import pytest

REQUIRED = os.environ.get("EMBGRAD_REQUIRE_GLUON") == "1"

if REQUIRED:
    import mxnet  # noqa: F401  (fails loudly: .venv-gluon must have a working mxnet)

_skipped: list[str] = []


def pytest_collectreport(report):
    if REQUIRED and report.skipped:
        _skipped.append(f"{report.nodeid}: {report.longrepr}")


def pytest_runtest_logreport(report):
    if REQUIRED and report.skipped:
        _skipped.append(f"{report.nodeid}: {report.longrepr}")


def pytest_sessionfinish(session, exitstatus):
    if REQUIRED and _skipped:
        print("\nEMBGRAD_REQUIRE_GLUON=1 but Gluon tests were skipped:\n  " + "\n  ".join(_skipped))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same MXNet and NumPy random state."""
    import mxnet as mx
    import numpy as np
    mx.random.seed(0)
    np.random.seed(0)
    yield
