"""Keras 3 on the JAX backend (a subprocess: this process's Keras runs on TensorFlow)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("jax")
pytestmark = pytest.mark.slow   # a subprocess pays Keras + JAX imports (~30 s): `make test-slow`
HERE = Path(__file__).resolve().parent


def test_keras_on_jax_value_and_gradients_against_stateless_call_grad_and_vmap():
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, str(HERE / "keras_jax_script.py")], capture_output=True, text=True,
                         env=env, timeout=600)
    ok = out.returncode == 0 and "KERAS-JAX OK" in out.stdout and "KERAS-JAX POSITIONS OK" in out.stdout
    assert ok, (out.stdout[-2000:], out.stderr[-4000:])
