"""Render an HTML page in headless Chromium and return its DOM (shared by the report tests).

Fails under CI (or ASA3D_REQUIRE_CHROMIUM=1) when Chromium is missing, else skips with the reason."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from conftest import skip_or_fail

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def chromium_dom(html: Path, tmp_path: Path) -> str:
    exe = chromium()
    if exe is None:
        skip_or_fail("CHROMIUM", "chromium not installed (apt-get install -y chromium): report not rendered")
    dom = subprocess.run(
        [exe, *FLAGS, f"--user-data-dir={tmp_path / 'chr'}", "--dump-dom", html.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    return dom.stdout


def chromium_screenshot(html: Path, tmp_path: Path, size: str) -> Path:
    """A PNG of the rendered page at ``size`` ("W,H"); returns its path."""
    exe = chromium()
    if exe is None:
        skip_or_fail("CHROMIUM", "chromium not installed (apt-get install -y chromium): report not rendered")
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            exe,
            *FLAGS,
            f"--user-data-dir={tmp_path / 'chr'}",
            f"--screenshot={shot}",
            f"--window-size={size}",
            html.as_uri(),
        ],  # fmt: skip
        capture_output=True,
        timeout=120,
        check=True,
    )
    return shot
