"""Errors raised by embgrad on bad input.

Every error embgrad raises on purpose is an :class:`EmbgradError` (a ``ValueError``), whose
message names the layer, the offending value and what to do about it.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["EmbgradError", "closest_names"]


class EmbgradError(ValueError):
    """Bad input to embgrad: the message names the layer, the value and the fix."""

    # Exception's own __init__ (the same behaviour as ValueError's): TensorFlow's autograph
    # re-raises an error from a traced function as its own type only for such classes; with
    # any other __init__ the user would get a StagingError instead of an EmbgradError.
    __init__ = Exception.__init__


def closest_names(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """A human-readable hint listing the candidate names closest to ``name``."""
    cands = list(candidates)
    close = difflib.get_close_matches(name, cands, n=n, cutoff=0.3)
    if not close:
        close = cands[:n]
    return ", ".join(repr(c) for c in close) if close else "(none)"
