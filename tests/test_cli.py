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


def test_demo_hides_dp_accountings_convergence_warnings_only_while_it_runs(caplog):
    """The demo's noise-multiplier search tries σ = 0.3 at q = 0.16, where dp-accounting logs ~60
    "failed to converge ... Excluding this order" warnings into the user's terminal; the CLI drops
    exactly those, while it runs, and σ is the same."""
    pytest.importorskip("dp_accounting")
    import logging

    from embgrad import privacy
    from embgrad.cli import _quiet_accounting

    def sigma() -> float:
        return privacy.noise_multiplier_for(lambda s: privacy.DPAdaFEST(s, 1.0, threshold=0.0), epsilon=3.0,
                                            sample_rate=256 / 1600, steps=42, delta=1 / 1600)

    def unconverged() -> int:
        return sum("failed to converge" in r.getMessage() for r in caplog.records)

    caplog.set_level(logging.WARNING)
    loud = sigma()
    assert unconverged() > 0                     # what the user saw before
    caplog.clear()
    with _quiet_accounting():
        quiet = sigma()
        logging.getLogger("absl").warning("another absl warning")
    assert unconverged() == 0 and quiet == loud
    assert any("another absl warning" in r.getMessage() for r in caplog.records)
    caplog.clear()
    sigma()
    assert unconverged() > 0                     # the filter is gone after the block
