"""Render a report in headless Chromium: a screenshot, the rendered DOM, and the URLs the
browser requested (from its net log), to check that a page works offline.

Used by the report's browser test and by ``python -m embgrad.report.browser`` (the README
screenshot). Chromium runs with a fresh profile and with background networking off.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import EmbgradError

__all__ = ["find_chromium", "Rendered", "render", "trim_bottom"]

_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
# host-resolver-rules: no host name resolves, so not even Chromium's own background requests
# leave the machine (they still show in the net log, where they are told apart).
_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
          "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
          "--disable-default-apps", "--mute-audio", "--host-resolver-rules=MAP * ~NOTFOUND")


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome executable on PATH, or None."""
    for name in _NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass(frozen=True)
class Rendered:
    """What Chromium made of a page: ``dom`` (serialized after rendering), ``screenshot``
    (PNG path), ``requests`` (URLs of the network requests the page started: none for a page
    that works offline)."""

    dom: str
    screenshot: Path
    requests: tuple[str, ...]


def _page_requests(netlog: Path) -> list[str]:
    """URLs of the network requests the *page* started (Chromium's net log). Chromium's own
    background requests (initiator "not an origin") are left out; file: loads never enter
    the network stack, so any URL here is a request for the network."""
    if not netlog.exists():
        raise EmbgradError(f"Chromium wrote no net log to {netlog}.")
    text = netlog.read_text(encoding="utf-8", errors="replace").rstrip().rstrip(",")
    if not text.endswith("}"):
        text += "]}"      # a log cut short when Chromium exits: close the events list
    log = json.loads(text)
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    return [ev["params"]["url"] for ev in log.get("events", [])
            if ev.get("type") == start and "url" in (ev.get("params") or {})
            and ev["params"].get("initiator") != "not an origin"]


def _run(chromium: str, args: Sequence[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([chromium, *_FLAGS, *args], capture_output=True, text=True, timeout=timeout)


def render(page: Path | str, screenshot: Path | str, *, width: int = 1500, height: int = 2400,
           chromium: str | None = None, timeout: float = 90.0) -> Rendered:
    """Open ``page`` in headless Chromium twice (one screenshot, one DOM dump), logging
    every network request. ``width`` × ``height``: the window in CSS pixels; ``timeout``: seconds
    per Chromium run.

    Raises:
        EmbgradError: no Chromium on PATH (and none given); Chromium exits with an error, or
            writes no screenshot or net log.
        subprocess.TimeoutExpired: a Chromium run takes longer than ``timeout``.
    """
    chromium = chromium or find_chromium()
    if chromium is None:
        raise EmbgradError("no Chromium found on PATH (looked for " + ", ".join(_NAMES) + "); install it, "
                           "e.g. `apt-get install -y chromium`.")
    url = Path(page).resolve().as_uri()
    shot = Path(screenshot).resolve()
    with tempfile.TemporaryDirectory(prefix="embgrad-chromium-") as tmp:
        urls: list[str] = []
        outs = []
        for i, action in enumerate(([f"--screenshot={shot}", f"--window-size={width},{height}"], ["--dump-dom"])):
            log = Path(tmp) / f"net{i}.json"
            proc = _run(chromium, [f"--user-data-dir={Path(tmp) / f'profile{i}'}", f"--log-net-log={log}",
                                   "--net-log-capture-mode=Default", *action, url], timeout)
            if proc.returncode != 0:
                raise EmbgradError(f"Chromium failed on {url} (exit {proc.returncode}): {proc.stderr[-800:]}")
            urls += _page_requests(log)
            outs.append(proc.stdout)
    if not shot.exists():
        raise EmbgradError(f"Chromium wrote no screenshot to {shot}.")
    return Rendered(outs[1], shot, tuple(dict.fromkeys(urls)))


def trim_bottom(png: Path | str, colors: int | None = None) -> tuple[int, int]:
    """Cut the rows at the bottom of a screenshot that only repeat its last row (the empty
    page below the content), optionally reduce it to a palette of ``colors`` (a smaller file);
    returns the new (width, height). Needs Pillow (matplotlib's)."""
    import numpy as np
    from PIL import Image

    with Image.open(png) as im:
        a = np.asarray(im.convert("RGB"))
    same = np.all(a == a[-1], axis=(1, 2))
    keep = len(same) - int(np.argmin(same[::-1])) if not same.all() else 1
    out = Image.fromarray(a[:min(len(a), keep + 16)])
    if colors:
        out = out.quantize(colors, dither=Image.Dither.NONE)
    out.save(png, optimize=True)
    return a.shape[1], min(len(a), keep + 16)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m embgrad.report.browser PAGE PNG [WIDTH HEIGHT]``: screenshot a report
    (the whole page when HEIGHT is large: the empty bottom is trimmed)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) not in (2, 4):
        print("usage: python -m embgrad.report.browser PAGE PNG [WIDTH HEIGHT]", file=sys.stderr)
        return 2
    r = (render(args[0], args[1], width=int(args[2]), height=int(args[3])) if len(args) == 4
         else render(args[0], args[1]))
    trim_bottom(r.screenshot, colors=256)
    print(f"{r.screenshot}: {len(r.dom)} characters of DOM, network requests: {list(r.requests) or 'none'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
