"""The backend interface (issue 13): every registered backend implements every required method
of both interfaces (TensorOps, ModelAdapter); the declared required/optional lists are exactly
what the base classes refuse; Keras's adapter is chosen by keras.backend.backend(); backends
define no classes inside functions; EmbeddingInfo speaks neutral terms; importing embgrad loads
no framework."""
from __future__ import annotations

import ast
import importlib
import inspect
import pathlib
import subprocess
import sys

import pytest

import embgrad.backends
from embgrad.backends import ADAPTERS, get_backend
from embgrad.backends.base import ModelAdapter, TensorOps

BACKENDS = pathlib.Path(embgrad.backends.__file__).parent
# what each adapter module needs installed (the Gluon ones run in .venv-gluon: tests/gluon)
NEEDS = {"embgrad.backends.keras_tensorflow": ("tensorflow", "keras"),
         "embgrad.backends.keras_torch": ("torch", "keras"),
         "embgrad.backends.keras_jax": ("jax", "keras"),
         "embgrad.backends.keras": ("keras",),
         "embgrad.backends.tensorflow": ("tensorflow",),
         "embgrad.backends.torch": ("torch",),
         "embgrad.backends.gluon": ("mxnet",),
         "embgrad.backends.jax": ("jax",)}


def _refused(cls: type) -> set[str]:
    """The methods of a base class whose body raises its 'not implemented' error."""
    return {n for n, f in vars(cls).items()
            if inspect.isfunction(f) and n != "_missing" and "self._missing(" in inspect.getsource(f)}


def test_required_and_optional_lists_are_what_the_base_classes_refuse():
    for base in (TensorOps, ModelAdapter):
        assert not set(base.REQUIRED) & set(base.OPTIONAL)
        assert _refused(base) == set(base.REQUIRED) | set(base.OPTIONAL) - {"log_probs_at"}, base

    class Bare(TensorOps):
        name = "bare"

    class BareAdapter(ModelAdapter):
        name = "bare"

    for obj, iface in ((Bare(), "TensorOps"), (BareAdapter(), "ModelAdapter")):
        for m in type(obj).REQUIRED:
            fn = getattr(obj, m)
            args = [None] * sum(1 for p in inspect.signature(fn).parameters.values()
                                if p.default is inspect.Parameter.empty
                                and p.kind is p.POSITIONAL_OR_KEYWORD)
            with pytest.raises(NotImplementedError, match=rf"the bare backend .*{iface}\.{m}\(\)"):
                fn(*args)


@pytest.mark.parametrize("where", ADAPTERS, ids=[c for _, c in ADAPTERS])
def test_every_registered_backend_implements_the_required_methods(where):
    modname, clsname = where
    for dep in NEEDS[modname]:
        pytest.importorskip(dep)
    adapter_cls = getattr(importlib.import_module(modname), clsname)
    assert issubclass(adapter_cls, ModelAdapter)
    missing = [m for m in ModelAdapter.REQUIRED if getattr(adapter_cls, m) is getattr(ModelAdapter, m)]
    assert not missing, f"{clsname} lacks ModelAdapter methods {missing}"
    if clsname == "UnsupportedKerasBackend":
        return   # recognises Keras objects on a Keras backend embgrad has no primitives for, and refuses
    ops = adapter_cls().ops
    assert type(ops) is not TensorOps and ops.name != "base"
    missing = [m for m in TensorOps.REQUIRED if getattr(type(ops), m) is getattr(TensorOps, m)]
    assert not missing, f"{type(ops).__name__} lacks TensorOps methods {missing}"


def test_keras_adapter_follows_the_keras_backend():
    pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    assert type(get_backend(keras.layers.Embedding(4, 2))).__name__ == {
        "tensorflow": "KerasTensorFlowBackend", "torch": "KerasTorchBackend",
        "jax": "KerasJaxBackend"}[keras.backend.backend()]
    from embgrad.backends import KERAS_FLAVOURS, _keras_adapter
    assert _keras_adapter() == KERAS_FLAVOURS[keras.backend.backend()]


def test_backends_define_no_class_inside_a_function():
    for path in sorted(BACKENDS.glob("*.py")):
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = [n.name for n in ast.walk(fn) if isinstance(n, ast.ClassDef)]
                assert not inner, f"{path.name}: {fn.name}() defines classes {inner}"


def test_embedding_info_is_neutral_torch():
    torch = pytest.importorskip("torch")
    emb = torch.nn.Embedding(10, 3, padding_idx=2, scale_grad_by_freq=True)
    info = get_backend(emb).find_embeddings(emb)["Embedding"]
    assert (info.pad_id, info.pad_receives_grad, info.pad_masked, info.padding, info.freq_scaled,
            info.low_rank) == (2, False, False, "padding_idx=2", True, None)
    plain = torch.nn.Embedding(10, 3)
    info = get_backend(plain).find_embeddings(plain)["Embedding"]
    assert (info.pad_id, info.padding, info.freq_scaled) == (None, "", False)
    assert "scale_grad_by_freq" not in info.options


def test_import_embgrad_and_its_interfaces_loads_no_framework():
    code = ("import sys, embgrad, embgrad.backends, embgrad.backends.base, embgrad.lowrank\n"
            "bad = [m for m in ('torch', 'tensorflow', 'keras', 'tf_keras', 'mxnet', 'jax', 'flax')"
            " if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)
