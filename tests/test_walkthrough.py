"""docs/your_data.md runs as written: its commands, with the CPU-trial overrides it shows, on a
folder of real patient folders (STS_xxx/CT_image.nii.gz + CT_mask.nii.gz)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chromium_dom import chromium_dom, chromium_screenshot

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "your_data.md"


def _block(marker: str) -> list[str]:
    """The lines of the ```bash block that follows ``<!-- walkthrough: MARKER -->``."""
    text = DOC.read_text()
    m = re.search(rf"<!-- walkthrough: {marker} -->\s*```bash\n(.*?)```", text, re.S)
    assert m, f"{DOC}: no bash block after the '{marker}' marker"
    return [ln for ln in m.group(1).splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def test_walkthrough_is_five_asa3d_commands() -> None:
    cmds = [ln for ln in _block("commands") if ln.startswith("asa3d ")]
    assert len(cmds) == 5 and cmds[0].startswith("asa3d data index ")
    assert _block("cpu-trial")[0].startswith("TINY=")


@pytest.fixture(scope="module")
def walked(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The walk-through's commands, run once as written on the real patient folders; the folder
    they ran in (dataset.json, runs/sts, preds/)."""
    root = shared_data / "ibsi_sts_ct"
    lines = _block("commands")
    assert lines[0].startswith("ROOT="), "the first line sets ROOT"
    work = tmp_path_factory.mktemp("walkthrough")
    script = "\n".join(
        [
            "set -euo pipefail",
            f'asa3d() {{ "{sys.executable}" -m asa3d.cli "$@"; }}',
            f"ROOT={root}",  # the doc's /data/sts, here the real patient folders
            *_block("cpu-trial"),
            *lines[1:],
        ]
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO / "src"),
        "OMP_NUM_THREADS": "2",
        "ASA3D_CACHE_DIR": str(work / "cache"),  # never beside the read-only data
    }
    res = subprocess.run(
        ["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=1800
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return work


@pytest.mark.slow
@pytest.mark.realdata
def test_walkthrough_commands_run(walked: Path) -> None:
    ds = json.loads((walked / "dataset.json").read_text())
    assert (
        len(ds["training"]) == 9
        and len(ds["validation"]) == 3
        and ds["labels"] == {"0": "background", "1": "tumour"}
    )
    metrics = json.loads((walked / "runs" / "sts" / "metrics.json").read_text())
    assert metrics["loss_last"] < metrics["loss_first"]  # it learned something in 20 steps
    held_out = {c["id"] for c in ds["validation"]}
    scored = {row["id"] for row in metrics["per_case"]}
    assert scored == held_out  # Dice on the 3 held-out patients, never on a training one
    preds = sorted((walked / "preds").glob("*_seg.nii.gz"))
    assert len(preds) == 12 and any("STS_002" in p.name for p in preds)
    page = (walked / "runs" / "sts" / "report.html").read_text()
    assert 'id="provenance"' in page and "dataset.json" in page


@pytest.mark.slow
@pytest.mark.realdata
def test_walkthrough_report_renders(walked: Path, tmp_path: Path) -> None:
    """The report a new user gets, rendered in headless Chromium. With
    ``ASA3D_KEEP_REPORT_SCREENSHOT=path.png`` its screenshot is kept there for a person to look at."""
    html = walked / "runs" / "sts" / "report.html"
    dom = chromium_dom(html, tmp_path)
    assert 'id="provenance"' in dom and 'src="data:image/png;base64,' in dom
    shot = chromium_screenshot(html, tmp_path, "1280,2000")
    px = np.asarray(Image.open(shot).convert("RGB"), dtype=float) / 255
    assert px.shape[0] > 100 and px.std() > 0.05  # not blank
    keep = os.environ.get("ASA3D_KEEP_REPORT_SCREENSHOT")
    if keep:  # a copy for a person to look at
        shutil.copyfile(shot, keep)
