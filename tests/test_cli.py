"""The ``embgrad`` command line: ``demo`` prints the summary and writes the report."""
from __future__ import annotations

import pytest

from embgrad.cli import build_parser, main


def test_demo_prints_the_summary(tmp_path, capsys, monkeypatch):
    import webbrowser
    opened = []
    monkeypatch.setattr(webbrowser, "open", opened.append)
    assert main(["demo", "--out", str(tmp_path / "r"), "--open"]) == 0
    assert opened == [(tmp_path / "r" / "index.html").resolve().as_uri()]
    out = " ".join(capsys.readouterr().out.split())  # rich wraps at the console width
    for heading in ("Rows that received gradient", "Tokens with the largest per-example gradient norms",
                    "clipped at", "before clipping", "after clipping", "plain forward + backward",
                    "with embgrad capture", "test accuracy"):
        assert heading in out, heading
    # the exactness check against the framework's dense gradient is printed, and it is exact
    assert "max |embgrad − dense autograd| = 0" in out
    page = tmp_path / "r" / "index.html"
    assert page.exists() and "Report written to" in out and str(page) in out.replace(" ", "")
    assert "top token planted" in out and "HotFlip" in out


def test_demo_out_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    f = tmp_path / "report.html"
    f.write_text("")
    assert main(["demo", "--out", str(f)]) == 2
    assert "is a file" in capsys.readouterr().err


def test_bad_arguments_exit_with_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--framework", "jax"])
    assert e.value.code == 2 and "invalid choice: 'jax'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([])
    assert build_parser().parse_args(["demo"]).framework == "torch"


def test_demo_without_its_framework_says_what_to_install(tmp_path, capsys, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorflow" else real(name, *a))
    assert main(["demo", "--framework", "tensorflow", "--out", str(tmp_path / "r")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "needs tensorflow" in err and "pip install" in err and "[tensorflow,viz]" in err
    assert not (tmp_path / "r").exists()


def test_version_has_one_source(capsys):
    import sys
    from pathlib import Path

    import embgrad
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"embgrad {embgrad.__version__}"
    if sys.version_info >= (3, 11):   # pyproject.toml has no version of its own: it reads this one
        import tomllib
        meta = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
        assert "version" not in meta["project"] and "version" in meta["project"]["dynamic"]
        assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "embgrad.__version__"}
