"""Checkpoint safety: refusing code-running pickles, atomic writes, rotation, RNG round trip."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from asa3d.config_sections import ModelConfig
from asa3d.engine import checkpoint as ck
from asa3d.engine.checkpoint import CheckpointError, load_checkpoint
from asa3d.models.backbones import BackboneSpec
from asa3d.models.backbones.swinunetr import swinunetr_spec

TINY_MODEL = ModelConfig(feature_size=12, depths=(1, 1, 1, 1), num_heads=(3, 3, 3, 3), window_size=4)


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


def test_load_checkpoint_passes_map_location_and_mmap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = tmp_path / "c.pt"
    torch.save({"w": torch.ones(2)}, p)
    assert load_checkpoint(p, map_location="meta")["w"].device.type == "meta"
    seen: list[dict] = []
    real_load = torch.load

    def spy(*a, **k):  # noqa: ANN002, ANN003, ANN202
        seen.append(k)
        return real_load(*a, **k)

    monkeypatch.setattr(torch, "load", spy)
    assert torch.equal(load_checkpoint(p, mmap=True)["w"], torch.ones(2))
    assert seen[-1]["mmap"] is True and seen[-1]["weights_only"] is True
    load_checkpoint(p)
    assert seen[-1]["mmap"] is False


def test_unreadable_file_message_quotes_the_error_and_a_refusal_names_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = tmp_path / "odd.pt"
    p.write_bytes(b"x")

    def broken(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("disk   on fire.\nsecond sentence.")

    monkeypatch.setattr(torch, "load", broken)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(p)
    assert "odd.pt: not a readable checkpoint (RuntimeError: disk on fire. second sentence.)" in str(
        err.value
    )
    msg = ck.unpickling_message(
        p, pickle.UnpicklingError("Unsupported global: GLOBAL os.system was not an allowed global")
    )
    assert "(os.system)" in msg and msg.startswith(f"{p}: refused to load")
    assert msg.endswith(
        "use a checkpoint written by asa3d, a safetensors export, or a plain state dict of tensors."
    )


def test_own_words_keeps_whole_sentences_up_to_the_limit() -> None:
    words = ck._own_words
    assert words(RuntimeError("Aaaa. Bbbb. Cccc."), limit=10) == "Aaaa."  # 5 + 1 + 5 = 11 > 10
    assert words(RuntimeError("Aaaa. Bbb. Cccc."), limit=10) == "Aaaa. Bbb."  # exactly 10 fits
    # one sentence longer than the limit: cut at the last word boundary, even after a space
    assert words(RuntimeError("word " * 30), limit=10) == "word word ..."
    assert words(RuntimeError("use weights_only=False to load"), limit=100) == ""


def test_rng_state_keeps_numpy_keys_as_int64() -> None:
    keys = ck.rng_state()["numpy"]["keys"]
    assert keys.dtype == torch.int64 and keys.shape == (624,)


def test_cuda_rng_state_is_saved_and_restored_when_cuda_is_there(monkeypatch: pytest.MonkeyPatch) -> None:
    # the CUDA branch cannot run on a CPU machine: stand in for torch.cuda's RNG calls
    saved = [torch.arange(4, dtype=torch.uint8), torch.arange(4, 8, dtype=torch.uint8)]
    restored: list[list[torch.Tensor]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: saved)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    state = ck.rng_state()
    assert state["cuda"] is saved
    ck.set_rng_state(state)
    assert len(restored) == 1 and all(torch.equal(a, b) for a, b in zip(restored[0], saved, strict=True))
    del state["cuda"]  # a CPU checkpoint on a CUDA machine: CUDA's state is left alone
    ck.set_rng_state(state)
    assert len(restored) == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CUDA checkpoint on a CPU machine
    ck.set_rng_state({**state, "cuda": saved})
    assert len(restored) == 1


def test_backbone_spec_refuses_a_checkpoint_without_a_record_naming_it() -> None:
    with pytest.raises(CheckpointError, match=r"^run/last.pt: no backbone record"):
        ck.backbone_spec({"backbone": ["not", "a", "mapping"]}, "run/last.pt")
    with pytest.raises(CheckpointError, match=r"^checkpoint: no backbone record"):
        ck.backbone_spec({})
    with pytest.raises(CheckpointError, match=r"^run/last.pt: backbone class 'x.Net' is not a known"):
        ck.backbone_spec({"backbone": {"class": "x.Net", "kwargs": {}}}, Path("run/last.pt"))
    spec = swinunetr_spec(TINY_MODEL, 1)
    assert ck.backbone_spec({"backbone": spec.to_dict()}) == spec
    assert isinstance(spec, BackboneSpec)


def test_check_transfer_names_its_source_by_default() -> None:
    spec = swinunetr_spec(TINY_MODEL, 1)
    state = spec.build().state_dict()
    assert "swinViT.patch_embed.proj.weight" in ck.check_transfer(state, spec)["matched"]
    with pytest.raises(CheckpointError, match=r"^transfer_state_dict\(\) does not load into a plain"):
        ck.check_transfer({**state, "bogus.weight": torch.ones(1)}, spec)
    with pytest.raises(CheckpointError, match=r"^teacher of x.pt does not load"):
        ck.check_transfer({**state, "bogus.weight": torch.ones(1)}, spec, source="teacher of x.pt")


def test_check_format_names_the_file_and_what_it_found() -> None:
    ck.check_format({"format": ck.FORMAT})  # the right format passes
    with pytest.raises(CheckpointError) as err:
        ck.check_format({"format": "other/2"}, Path("runs/a.pt"))
    assert str(err.value) == (
        "runs/a.pt: format 'other/2' is not 'asa3d-checkpoint/1' (not an asa3d pretraining checkpoint)."
    )
    with pytest.raises(CheckpointError, match=r"^<checkpoint>: format None is not"):
        ck.check_format({"state": {}})


def test_unpickling_message_without_a_named_global_says_the_file_is_corrupt() -> None:
    msg = ck.unpickling_message("a/b.pt", pickle.UnpicklingError("invalid load key, 'x'."))
    assert msg == (
        "a/b.pt: not a readable checkpoint (not a torch file, or corrupt). Fix: check the path, or "
        "write the file again."
    )


def test_own_words_default_limit_is_200_characters() -> None:
    first, second = "a" * 99 + ".", "b" * 99 + "."  # 100 + 1 + 100 = 201 characters
    assert ck._own_words(RuntimeError(f"{first} {second}")) == first
    assert ck._own_words(RuntimeError(f"{first} {second[1:]}")) == f"{first} {second[1:]}"  # 200 fit


def test_load_checkpoint_messages_in_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "list.pt"
    torch.save([1, 2], p)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(p)
    assert str(err.value) == f"{p}: expected a dict, found list."
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.pt"
    torch.save({"state": _Payload(str(marker))}, bad)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(bad)
    assert "it contains a Python object (getattr)" in str(err.value)  # the global torch refused is named

    def advice_only(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("Weights only load failed. Re-running with weights_only=False will work.")

    monkeypatch.setattr(torch, "load", advice_only)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(p)
    assert str(err.value) == (
        f"{p}: not a readable checkpoint (RuntimeError). Fix: check the path, or write the file again "
        "(it may be truncated or of another format)."
    )


def test_link_falls_back_to_a_copy_where_hard_links_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(src, dst):  # noqa: ANN001, ANN202 - e.g. a file system without hard links
        raise OSError("links not supported")

    monkeypatch.setattr(ck.os, "link", no_links)
    path = ck.save_rotating({"format": ck.FORMAT, "w": torch.arange(3)}, tmp_path, 0, 1, keep_last=2)
    last = tmp_path / "last.pt"
    assert last.read_bytes() == path.read_bytes() and last.stat().st_ino != path.stat().st_ino
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, "last.pt"])  # no temp left


def test_latest_checkpoint_falls_back_to_last_and_orders_by_iteration_then_round(tmp_path: Path) -> None:
    assert ck.latest_checkpoint(tmp_path) is None and ck.list_checkpoints(tmp_path / "nope") == []
    ck.atomic_save({"format": ck.FORMAT}, tmp_path / "last.pt")
    assert ck.latest_checkpoint(tmp_path) == tmp_path / "last.pt"
    for name in ["ckpt_r10_i5.pt", "ckpt_r9_i5.pt", "ckpt_r1_i7.pt", "ckpt_r2_i30.pt", "notes_r1_i1.pt"]:
        (tmp_path / name).write_bytes(b"")  # names unpadded: string order is not numeric order
    got = [p.name for p in ck.list_checkpoints(tmp_path)]
    assert got == ["ckpt_r9_i5.pt", "ckpt_r10_i5.pt", "ckpt_r1_i7.pt", "ckpt_r2_i30.pt"]


def test_keep_last_zero_keeps_all_one_keeps_the_newest_and_a_failed_delete_is_harmless(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(1, 4):
        ck.save_rotating({"format": ck.FORMAT, "i": i}, tmp_path / "all", 0, i, keep_last=0)
    assert len(ck.list_checkpoints(tmp_path / "all")) == 3
    (tmp_path / "one").mkdir()
    for i in range(1, 4):
        newest = ck.save_rotating({"format": ck.FORMAT, "i": i}, tmp_path / "one", 0, i, keep_last=1)
    assert ck.list_checkpoints(tmp_path / "one") == [newest]

    real_unlink = Path.unlink

    def locked(self, missing_ok=False):  # noqa: ANN001, ANN202 - e.g. a file held open on Windows/NFS
        if self.name.startswith("ckpt_"):
            raise PermissionError(f"{self} is busy")
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", locked)
    newest = ck.save_rotating({"format": ck.FORMAT, "i": 4}, tmp_path / "one", 0, 4, keep_last=1)
    assert load_checkpoint(newest)["i"] == 4 and len(ck.list_checkpoints(tmp_path / "one")) == 2


def test_numpy_gaussian_cache_round_trips() -> None:
    np.random.seed(5)
    np.random.standard_normal()  # the legacy generator caches the second value of its pair
    state = ck.rng_state()
    assert state["numpy"]["has_gauss"] == 1 and state["numpy"]["cached_gaussian"] != 0.0
    expected = np.random.standard_normal()
    np.random.seed(6)
    ck.set_rng_state(state)
    assert np.random.standard_normal() == expected


def test_cuda_rng_state_is_not_touched_before_cuda_is_used_and_a_device_change_is_survived(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)  # reading it would initialise CUDA

    def never():  # noqa: ANN202
        raise AssertionError("CUDA RNG read before CUDA was used")

    monkeypatch.setattr(torch.cuda, "get_rng_state_all", never)
    state = ck.rng_state()
    assert "cuda" not in state

    def fewer_devices(states):  # noqa: ANN001, ANN202
        raise RuntimeError("invalid device ordinal")

    monkeypatch.setattr(torch.cuda, "set_rng_state_all", fewer_devices)
    torch.manual_seed(0)
    ck.set_rng_state({**state, "cuda": [torch.zeros(4, dtype=torch.uint8)] * 2})  # saved on 2 GPUs
    assert torch.equal(torch.get_rng_state(), state["torch"])  # the CPU state is restored anyway
