"""Pretraining's TensorBoard image summaries: ASA's input, permuted view, reconstruction and
related crops are written every ``train.image_every`` iterations, and drawing them changes nothing
in training (losses and weights equal those of the same run without pictures)."""

from __future__ import annotations

from make_golden import _asa_run, asa_config


def test_image_summaries_written_and_training_unchanged(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    doc = _asa_run(tmp_path / "run", asa_config({"image_every": 2}))
    plain = _asa_run(tmp_path / "plain", asa_config({"image_every": 0}))
    assert doc["steps"] == plain["steps"]  # the pictures' views use a forked RNG
    assert doc["teacher"] == plain["teacher"]

    acc = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"images": 0})
    acc.Reload()
    tags = set(acc.Tags()["images"])
    assert tags == {"images/P1/input", "images/P1/permuted", "images/P2/crop1", "images/P2/crop2"}
    # 12 iterations alternating 2 P1 + 2 P2 steps: every 2nd iteration (1, 3, 5, ...) is the 2nd
    # step of a phase pass, so each phase gets 3 pictures
    assert [e.step for e in acc.Images("images/P1/input")] == [1, 5, 9]
    assert [e.step for e in acc.Images("images/P2/crop1")] == [3, 7, 11]
    img = acc.Images("images/P1/permuted")[0]
    assert (img.width, img.height) == (32, 32)


def test_appearance_recovery_pictures_the_reconstruction() -> None:
    import torch

    from asa3d.methods.base import build_method

    cfg = asa_config(
        input_size=64,
        subvolume_size=16,
        phases=[{"name": "P1", "view": "shuffle", "tasks": ["sop", "var", "gc"]}],
    )
    from asa3d.config import to_dict

    method = build_method(to_dict(cfg.method), cfg.model)
    vol = torch.rand(1, 40, 44, 36, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pics = method.image_summaries({"image": [vol]}, "P1")
    assert set(pics) == {"input", "permuted", "reconstruction"}
    assert all(p.shape == (64, 64) for p in pics.values())
    assert not torch.equal(pics["input"], pics["permuted"])
