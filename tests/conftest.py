"""Shared fixtures. Tiny shapes everywhere; expensive artefacts are built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# One thread per test worker: `make test` runs two workers on two cores.
torch.set_num_threads(int(os.environ.get("ASA3D_TEST_THREADS", "1")))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ASA3D_SHARED_DATA", REPO.parent / "shared" / "data"))


def required(what: str) -> bool:
    """Whether a missing ``what`` (SHARED_DATA, TORCHRUN, CHROMIUM) must fail the test instead of
    skipping it: in CI (CI=true, as GitHub Actions sets) or with ASA3D_REQUIRE_<WHAT>=1."""
    on = ("1", "true", "yes")
    return os.environ.get("CI", "").lower() in on or os.environ.get(f"ASA3D_REQUIRE_{what}", "").lower() in on


def skip_or_fail(what: str, reason: str) -> None:
    """Skip a test whose input the machine lacks; fail with the same reason where it is required."""
    if required(what):
        pytest.fail(f"{reason} (required here: CI or ASA3D_REQUIRE_{what} is set)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real CT volumes beside the repository; their absence fails in CI (see ``required``)."""
    if not SHARED_DATA.is_dir():
        skip_or_fail("SHARED_DATA", f"real test data not found at {SHARED_DATA} (set ASA3D_SHARED_DATA)")
    return SHARED_DATA


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line: how many tests were skipped and why, so a local run cannot pass silently short."""
    reports = terminalreporter.stats.get("skipped", [])
    if not reports:
        return
    reasons: dict[str, int] = {}
    for rep in reports:
        longrepr = rep.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
        reason = reason.removeprefix("Skipped: ")
        reasons[reason] = reasons.get(reason, 0) + 1
    why = "; ".join(f"{r} ({n})" if n > 1 else r for r, n in sorted(reasons.items()))
    terminalreporter.write_line(f"SKIPPED {len(reports)} test(s): {why}", yellow=True, bold=True)


@pytest.fixture(scope="session")
def phantom_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six small labelled phantoms (4 training, 2 validation); returns the dataset.json path."""
    from asa3d.data.phantom import write_phantom_dataset

    out = tmp_path_factory.mktemp("phantom")
    return write_phantom_dataset(
        out, n=6, seed=0, shape=(64, 64, 48), spacing=(6.0, 6.0, 8.0), n_validation=2
    )


@pytest.fixture(scope="session")
def adam2d_tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``asa3d pretrain --config pretrain/adam2d_tiny.yaml`` once per session (about 15 s on one
    core): shared by the tiny-run, Eve-property and ``asa3d eve`` tests. Returns the run folder."""
    from asa3d.cli import main as cli

    out = tmp_path_factory.mktemp("adam2d_tiny") / "run"
    assert (
        cli(["pretrain", "--config", "pretrain/adam2d_tiny.yaml", "--out", str(out), "train.progress=false"])
        == 0
    )
    return out
