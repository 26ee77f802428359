"""embgrad: exact, sparse, per-example and explainable gradients of embedding layers.

``import embgrad`` imports no deep-learning framework: a backend is chosen from the objects
you pass, among the frameworks you already imported.
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
