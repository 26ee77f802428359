"""Packaging metadata: the declared licence ships, and the package says it is typed."""
from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_license_file_is_declared_and_is_the_apache_license():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["license"] == "Apache-2.0"
    for name in meta["license-files"]:
        text = (ROOT / name).read_text()
        assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "Typing :: Typed" in meta["classifiers"]
    assert (ROOT / "src" / "embgrad" / "py.typed").exists()
