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


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real CT volumes beside the repository. CI sets ASA3D_REQUIRE_SHARED_DATA=1 so that
    their absence fails instead of skipping."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("ASA3D_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(f"real test data not found at {SHARED_DATA}")
        pytest.skip(f"real test data not found at {SHARED_DATA} (set ASA3D_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def phantom_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six small labelled phantoms (4 training, 2 validation); returns the dataset.json path."""
    from asa3d.data.phantom import write_phantom_dataset

    out = tmp_path_factory.mktemp("phantom")
    return write_phantom_dataset(
        out, n=6, seed=0, shape=(64, 64, 48), spacing=(6.0, 6.0, 8.0), n_validation=2
    )
