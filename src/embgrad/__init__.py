"""embgrad: exact, sparse, per-example and explainable gradients of embedding layers.

``import embgrad`` imports no deep-learning framework: a backend is chosen from the objects
you pass, among the frameworks you already imported.

Where things live (the README's "Where things live" maps every module): the names here are
re-exported from the module that defines them, whose docstrings say the rest.

- :func:`capture`, :class:`Gradients`, :class:`LayerGradients`: :mod:`embgrad.capture`;
  :func:`value_and_gradients` (JAX): :mod:`embgrad.functional`.
- :class:`RowGrad`, :class:`ExampleGrads`, :func:`row_grad`, :func:`rows_from_lookups`:
  :mod:`embgrad.sparse`; :func:`regularize`: :mod:`embgrad.regularization`; tied tables'
  whole-table per-example gradients: :mod:`embgrad.tied`.
- :func:`table`: :mod:`embgrad.tables`; :func:`load_vectors`: :mod:`embgrad.vectors`.
- :func:`attribute`, :class:`Attribution`, :func:`hotflip`, :func:`jacobian`:
  :mod:`embgrad.attribution`; :func:`attribute_generation`: :mod:`embgrad.generation`.
- :class:`EmbgradError`: :mod:`embgrad.errors`.
- Imported by name: :mod:`embgrad.influence` (TracIn), :mod:`embgrad.privacy` (DP-SGD,
  DP-FEST, DP-AdaFEST, Opacus), :mod:`embgrad.distributed` (``torch.distributed``).
- Framework code: :mod:`embgrad.backends`; the ``embgrad`` command: :mod:`embgrad.cli`,
  :mod:`embgrad.report`, :mod:`embgrad.demo`.
"""
from __future__ import annotations

from . import distributed as distributed  # all_reduce_rows & co.; torch is imported when called
from .attribution import Attribution, attribute, hotflip, jacobian
from .capture import Gradients, LayerGradients, capture
from .errors import EmbgradError
from .functional import value_and_gradients
from .generation import GenerationAttribution, attribute_generation
from .regularization import regularize
from .sparse import ExampleGrads, RowGrad, row_grad, rows_from_lookups
from .tables import table
from .vectors import load_vectors

__version__ = "0.1.0"   # the package's one version: pyproject.toml reads it from here

__all__ = [
    "capture", "Gradients", "LayerGradients", "value_and_gradients",
    "RowGrad", "ExampleGrads", "rows_from_lookups", "row_grad",
    "table", "load_vectors", "regularize",
    "attribute", "Attribution", "hotflip", "jacobian",
    "attribute_generation", "GenerationAttribution",
    "EmbgradError",
]
