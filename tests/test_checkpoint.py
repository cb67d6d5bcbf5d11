"""Checkpoint safety: refusing code-running pickles, atomic writes, rotation, RNG round trip."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from asa3d.engine import checkpoint as ck
from asa3d.engine.checkpoint import CheckpointError, load_checkpoint


class _Payload:
    """Unpickling this would create a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (Path(self.marker),))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickle_is_refused_and_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.pt"
    torch.save({"format": ck.FORMAT, "state": _Payload(str(marker))}, bad)  # torch.save pickles it
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(bad)
    assert not marker.exists()
    raw = tmp_path / "raw.pt"  # a bare pickle (not a torch zip) is refused as well
    raw.write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(CheckpointError, match="raw.pt"):
        load_checkpoint(raw)
    assert not marker.exists()


def test_crash_during_write_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = ck.save_rotating({"format": ck.FORMAT, "w": torch.ones(3)}, tmp_path, 0, 1, keep_last=3)
    real_save = torch.save

    def crashing_save(obj, f, *a, **k):  # noqa: ANN001, ANN002, ANN003
        f.write(b"PK\x03\x04partial garbage")  # some bytes hit the disk, then the process dies
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="simulated"):
        ck.save_rotating({"format": ck.FORMAT, "w": torch.zeros(3)}, tmp_path, 0, 2, keep_last=3)
    monkeypatch.setattr(torch, "save", real_save)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([first.name, "last.pt"])  # no partial file named as a checkpoint, no temp left
    assert ck.latest_checkpoint(tmp_path) == first
    assert torch.equal(load_checkpoint(tmp_path / "last.pt")["w"], torch.ones(3))


def test_rotation_keeps_last_and_points_last(tmp_path: Path) -> None:
    for i in range(1, 6):
        ck.save_rotating({"format": ck.FORMAT, "i": i}, tmp_path, 0, i, keep_last=2)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == [
        "ckpt_r0000_i00000004.pt",
        "ckpt_r0000_i00000005.pt",
    ]
    assert load_checkpoint(tmp_path / "last.pt")["i"] == 5


def test_truncated_file_is_a_clear_error(tmp_path: Path) -> None:
    p = tmp_path / "cut.pt"
    p.write_bytes(b"PK\x03\x04")
    with pytest.raises(CheckpointError, match="cut.pt"):
        load_checkpoint(p)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_rng_state_round_trips_with_weights_only(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = ck.rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    ck.atomic_save({"rng": state}, tmp_path / "r.pt")
    ck.set_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
