"""The README's "Where things live" map is the package as it is: every module and subpackage of
src/embgrad has a row, every file a row names exists, and the package docstring points there."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "embgrad"


def _rows() -> list[tuple[list[str], str]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("### Where things live", 1)[1].split("\n#", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0].startswith("`"):
            rows.append((re.findall(r"`([^`]+)`", cells[0]), cells[1]))
    return rows


def test_every_module_has_a_row():
    named = {name for names, _ in _rows() for name in names}
    modules = {p.name for p in PKG.glob("*.py") if p.name != "__init__.py"}
    packages = {p.name + "/" for p in PKG.iterdir() if (p / "__init__.py").exists()}
    assert modules | packages <= named, f"modules without a row: {sorted((modules | packages) - named)}"


def test_every_file_a_row_names_exists():
    for names, what in _rows():
        for name in names:
            assert (PKG / name).exists(), f"the map names {name!r}, which src/embgrad does not hold"
        packages = [PKG / n for n in names if n.endswith("/")]
        for inner in re.findall(r"`([\w/]+\.py)`", what):   # files of a package named in its row
            assert any((p / inner).exists() for p in packages), f"{names}: no {inner!r} in {packages}"


def test_package_docstring_points_to_the_map():
    import embgrad

    assert "Where things live" in (embgrad.__doc__ or "")
    for module in re.findall(r":mod:`embgrad\.([\w.]+)`", embgrad.__doc__ or ""):
        path = PKG.joinpath(*module.split("."))
        assert path.with_suffix(".py").exists() or (path / "__init__.py").exists(), module
