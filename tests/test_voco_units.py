"""VoCo's method piece by piece: every config check by its message and boundary, the body box,
the rank-spanning BatchNorm (one process and a simulated second rank), the views' settings and
reassembly, and the loss wiring on fixed embeddings (a linear stand-in for the network, so every
term is checked against the loss functions without a Swin forward)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import asa3d.methods.dist_context as dist_context
import asa3d.methods.voco as voco_mod
from asa3d.config import ConfigError
from asa3d.config_sections import ModelConfig
from asa3d.methods.base import build_method
from asa3d.methods.dist_context import DistContext
from asa3d.methods.voco import RankBatchNorm1d, VoCoConfig, VoCoNetwork, _sync_batchnorms, body_box_crop
from asa3d.methods.voco_losses import base_regularization_loss, prediction_loss, symmetric_logits, voco_logits
from asa3d.models.backbones.swinunetr import trained_parts
from asa3d.models.heads_peers import voco_features
from asa3d.views.voco_crops import VoCoViews

MODEL = ModelConfig(feature_size=12, window_size=4, depths=(1, 1, 1, 1), drop_path_rate=0.0)
VOCO = {
    "name": "voco",
    "volume_size": [128, 128, 64],
    "grid": 2,
    "num_random_crops": 2,
    "crop_out_size": 64,
    "proj_hidden_dim": 16,
    "proj_dim": 8,
}


@pytest.fixture(scope="module")
def voco() -> Any:
    torch.manual_seed(0)
    return build_method(VOCO, MODEL)


# ---- config ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        (
            {"grid": 1, "volume_size": (8, 8, 4)},
            "method.volume_size=[8, 8, 4] / grid=1: need grid >= 2 and a square "
            "x-y plane divisible by the grid.",
        ),
        (
            {"grid": 2, "volume_size": (8, 6, 4)},
            "method.volume_size=[8, 6, 4] / grid=2: need grid >= 2 and a square "
            "x-y plane divisible by the grid.",
        ),
        (
            {"grid": 3, "volume_size": (8, 8, 4)},
            "method.volume_size=[8, 8, 4] / grid=3: need grid >= 2 and a square "
            "x-y plane divisible by the grid.",
        ),
        (
            {"crop_out_size": 48},
            "method.crop_out_size=48: a multiple of 32 and at least 64 (encoder10's InstanceNorm).",
        ),
        (
            {"crop_out_size": 80},
            "method.crop_out_size=80: a multiple of 32 and at least 64 (encoder10's InstanceNorm).",
        ),
        (
            {"crop_out_size": 32},
            "method.crop_out_size=32: a multiple of 32 and at least 64 (encoder10's InstanceNorm).",
        ),
        ({"num_random_crops": 0}, "method.num_random_crops=0: must be at least 1."),
        ({"aug_flip_p": -0.1}, "method.aug_flip_p=-0.1: must lie in [0, 1]."),
        ({"aug_rot_p": 1.1}, "method.aug_rot_p=1.1: must lie in [0, 1]."),
        ({"aug_shift_p": 1.1}, "method.aug_shift_p=1.1: must lie in [0, 1]."),
        ({"teacher_momentum": -0.5}, "method.teacher_momentum=-0.5: must lie in [0, 1]."),
        ({"lambda_reg": -1.0}, "method.lambda_reg=-1.0: must be >= 0."),
        (
            {"track_after": -1},
            "method.track_after/track_window must be >= 0 and method.track_min_drop in (0, 1].",
        ),
        (
            {"track_window": -1},
            "method.track_after/track_window must be >= 0 and method.track_min_drop in (0, 1].",
        ),
        (
            {"track_min_drop": 0.0},
            "method.track_after/track_window must be >= 0 and method.track_min_drop in (0, 1].",
        ),
        (
            {"track_min_drop": 1.01},
            "method.track_after/track_window must be >= 0 and method.track_min_drop in (0, 1].",
        ),
        ({"track_patience": 0}, "method.track_patience=0: must be at least 1."),
    ],
)
def test_config_refuses_with_a_message(kw: dict[str, Any], msg: str) -> None:
    with pytest.raises(ConfigError) as err:
        VoCoConfig(**kw).validate()
    assert str(err.value) == msg  # the whole message: which key, and how to fix it


@pytest.mark.parametrize(
    "kw",
    [
        {"grid": 2, "volume_size": (8, 8, 4)},
        {"crop_out_size": 64},
        {"num_random_crops": 1},
        {"aug_flip_p": 0.0, "aug_rot_p": 1.0, "aug_shift_p": 0.0, "teacher_momentum": 1.0},
        {"aug_flip_p": 1.0, "aug_rot_p": 0.0, "aug_shift_p": 1.0, "teacher_momentum": 0.0},
        {"lambda_reg": 0.0},
        {"track_after": 0, "track_window": 0, "track_min_drop": 1.0},
        {"track_patience": 1},
    ],
)
def test_config_accepts_the_boundaries(kw: dict[str, Any]) -> None:
    VoCoConfig(**kw).validate()


# ---- body box ----------------------------------------------------------------------------------
def test_body_box_is_the_bounding_box_of_voxels_above_the_threshold_in_any_channel() -> None:
    v = torch.zeros(2, 6, 7, 8)
    v[0, 1, 2, 3] = 0.5
    v[1, 3, 5, 6] = 0.31
    v[0, 5, 6, 7] = 0.3  # at the threshold: not body
    got = body_box_crop(v, 0.3)
    assert torch.equal(got, v[:, 1:4, 2:6, 3:7])
    one = torch.zeros(1, 3, 3, 3)
    one[0, 2, 2, 2] = 1.0  # the last voxel of every axis: the box ends at the volume's end
    assert torch.equal(body_box_crop(one, 0.0), one[:, 2:, 2:, 2:])
    flat = torch.full((1, 3, 4, 5), 0.3)
    assert body_box_crop(flat, 0.3) is flat  # nothing above: the whole volume


# ---- BatchNorm over ranks ----------------------------------------------------------------------
def _bn_ref(x: torch.Tensor, eps: float) -> torch.Tensor:
    mean = x.mean(0)
    var = x.var(0, unbiased=False)
    return (x - mean) / torch.sqrt(var + eps)


def test_rank_batchnorm_on_one_process_is_batch_statistics_with_its_eps() -> None:
    x = torch.tensor([[0.0, 1.0], [0.002, 3.0], [0.004, -2.0]])  # column 0: variance ~ eps
    bn = RankBatchNorm1d(eps=1e-3)
    torch.testing.assert_close(bn(x), _bn_ref(x, 1e-3))
    torch.testing.assert_close(RankBatchNorm1d()(x), _bn_ref(x, 1e-5))
    bn.eval()  # no running statistics: eval mode uses the batch too
    torch.testing.assert_close(bn(x), _bn_ref(x, 1e-3))


def test_rank_batchnorm_spans_a_second_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two ranks simulated in one process: the all-reduce adds the other rank's [sum, sum of
    squares, count]; the result must be the BatchNorm of both ranks' rows, with the gradient of
    this rank's rows."""
    import torch.distributed as dist

    g = torch.Generator().manual_seed(0)
    mine = torch.randn(3, 4, generator=g).requires_grad_(True)
    other = torch.randn(5, 4, generator=g) * 2 + 1
    other_stats = torch.cat(
        [other.sum(0, keepdim=True), (other * other).sum(0, keepdim=True), torch.full((1, 4), 5.0)]
    )
    calls: list[torch.Tensor] = []

    def reduce(t: torch.Tensor) -> torch.Tensor:
        calls.append(t.detach().clone())
        return t + other_stats

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)
    monkeypatch.setattr(dist_context, "all_reduce_sum_with_grad", reduce)
    bn = RankBatchNorm1d(eps=1e-2)
    w = torch.randn(3, 4, generator=g)
    out = bn(mine)
    (out * w).sum().backward()
    both = torch.cat([mine.detach(), other]).requires_grad_(True)
    ref = _bn_ref(both, 1e-2)[:3]
    (ref * w).sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(mine.grad, both.grad[:3])  # type: ignore[index]
    assert len(calls) == 1 and calls[0][2].tolist() == [3.0] * 4
    assert bn(mine.detach().bfloat16()).dtype == torch.bfloat16  # computed in fp32, handed back as given
    bn.eval()  # eval: this rank's batch only, no collective
    torch.testing.assert_close(bn(mine.detach()), _bn_ref(mine.detach(), 1e-2))
    assert len(calls) == 2
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 1)
    bn.train()
    torch.testing.assert_close(bn(mine.detach()), _bn_ref(mine.detach(), 1e-2))
    assert len(calls) == 2


def test_sync_batchnorms_replaces_only_stateless_batchnorms() -> None:
    net = nn.Sequential(
        nn.Linear(2, 3),
        nn.BatchNorm1d(3, affine=False, track_running_stats=False, eps=1e-3),
        nn.Sequential(nn.BatchNorm1d(3, affine=False, track_running_stats=False), nn.ReLU()),
        nn.BatchNorm1d(3),  # parameters and running statistics: left alone
        nn.BatchNorm1d(3, affine=False),  # running statistics: left alone
        nn.BatchNorm1d(3, track_running_stats=False),  # parameters: left alone
    )
    _sync_batchnorms(net)
    assert isinstance(net[1], RankBatchNorm1d) and net[1].eps == 1e-3
    assert isinstance(net[2][0], RankBatchNorm1d) and net[2][0].eps == 1e-5
    assert all(type(net[i]) is nn.BatchNorm1d for i in (3, 4, 5))


def test_network_projector_dims_and_synced_norms() -> None:
    cfg = VoCoConfig(proj_hidden_dim=16, proj_dim=8)
    net = VoCoNetwork(MODEL, cfg)
    assert net.features == "multi_scale" and net.projector[0].in_features == 24 * 12
    assert net.projector[6].out_features == 8 and net.projector[3].in_features == 16
    assert isinstance(net.projector[1], RankBatchNorm1d) and isinstance(net.projector[4], RankBatchNorm1d)
    plain = VoCoNetwork(
        MODEL, VoCoConfig(proj_hidden_dim=16, proj_dim=8, sync_batchnorm=False, voco_features="last_stage")
    )
    assert plain.features == "last_stage" and plain.projector[0].in_features == 16 * 12
    assert type(plain.projector[1]) is nn.BatchNorm1d
    x = torch.rand(2, 1, 64, 64, 64)
    with torch.no_grad():
        want = plain.projector(
            voco_features(plain.backbone.net, x, plain.backbone.encode(x, 4), "last_stage")
        )
        torch.testing.assert_close(plain.embed(x), want)


# ---- method ------------------------------------------------------------------------------------
def test_contract(voco: Any) -> None:
    assert voco.phases() == ["voco"] and voco.sample_spec("voco").mode == "whole"
    assert not voco.has_teacher and voco.momentum(5, 10) == 0.9
    voco.train()
    assert voco.training and voco.student.training
    voco.train(False)
    assert not voco.training and not voco.student.training
    assert voco.transfer_parts() == trained_parts(voco.backbone_spec().parts, 4, encoders=True)
    assert voco.transfer_state_dict()["out.conv.conv.weight"].shape[0] == 1  # a plain 1-output SwinUNETR
    with pytest.raises(ConfigError, match="model.in_channels=2: VoCo pretrains on 1-channel CT."):
        build_method(VOCO, ModelConfig(**{**MODEL.__dict__, "in_channels": 2}))


def test_last_stage_features_transfer_no_encoders() -> None:
    m = build_method({**VOCO, "voco_features": "last_stage"}, MODEL)
    assert m.transfer_parts() == trained_parts(m.backbone_spec().parts, 4, encoders=False)
    ema = build_method({**VOCO, "voco_teacher": "ema", "teacher_momentum": 0.7}, MODEL)
    assert ema.has_teacher and ema.momentum(3, 10) == 0.7
    ema.train()
    assert ema.student.training and not ema.teacher.training


def test_views_use_the_configured_settings_and_keep_bases_and_crops_apart(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kw = {
        "volume_size": [16, 16, 8],
        "foreground_threshold": 0.5,
        "resize_mode": "area",
        "grid": 2,
        "num_random_crops": 3,
        "crop_out_size": 64,
        "aug_flip_p": 0.1,
        "aug_rot_p": 0.2,
        "aug_shift_p": 0.3,
        "aug_shift_offset": 0.4,
    }
    m = build_method({**VOCO, **kw}, MODEL)
    seen: dict[str, Any] = {}
    real_resize, real_views = voco_mod.resize_volumes, voco_mod.voco_views

    def resize(vols: list[torch.Tensor], size: Any, mode: str) -> torch.Tensor:
        seen.setdefault("resize", []).append((size, mode))
        seen.setdefault("resize_shapes", []).append([tuple(v.shape) for v in vols])
        return real_resize(vols, size, mode)

    def views(x: torch.Tensor, *a: Any) -> VoCoViews:
        seen["views"] = (tuple(x.shape), a)
        v = real_views(x, *a)
        seen["raw"] = (v.bases.clone(), v.crops.clone())
        return v

    def augment(t: torch.Tensor, *a: Any) -> torch.Tensor:
        seen["augment"] = (tuple(t.shape), a)
        return -t  # marks that every crop went through it

    monkeypatch.setattr(voco_mod, "resize_volumes", resize)
    monkeypatch.setattr(voco_mod, "voco_views", views)
    monkeypatch.setattr(voco_mod, "augment_crops", augment)
    a = torch.zeros(1, 20, 24, 12)
    a[0, 2:10, 3:9, 1:5] = 1.0  # body 8 x 6 x 4
    v = m.make_views(torch.stack([a, torch.ones(1, 20, 24, 12)]))
    assert seen["resize_shapes"] == [[(1, 8, 6, 4)], [(1, 20, 24, 12)]]
    assert seen["resize"] == [((16, 16, 8), "area")] * 2
    assert seen["views"] == ((2, 1, 16, 16, 8), (2, 3, 64))
    assert seen["augment"] == ((2 * 4 + 2 * 3, 1, 64, 64, 64), (0.1, 0.2, 0.3, 0.4))
    bases, crops = seen["raw"]
    assert v.bases.shape == (2, 4, 1, 64, 64, 64) and v.crops.shape == (2, 3, 1, 64, 64, 64)
    assert torch.equal(v.bases, -bases) and torch.equal(v.crops, -crops)
    assert v.labels.shape == (2, 3, 4)


class _Linear(nn.Module):
    """A stand-in for VoCoNetwork: ``embed`` flattens each crop and multiplies by ``w``."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.w


def _views() -> VoCoViews:
    g = torch.Generator().manual_seed(0)
    bases = torch.randn(2, 4, 1, 1, 1, 3, generator=g)  # (B=2, K=4, C, 1, 1, 3): 3 numbers a crop
    crops = torch.randn(2, 2, 1, 1, 1, 3, generator=g)
    labels = torch.tensor(
        [[[0.5, 0.5, 0.0, 0.0], [0.0, 0.25, 0.75, 0.0]], [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]]]
    )
    return VoCoViews(bases=bases, crops=crops, labels=labels, corners=torch.zeros(2, 2, 2, dtype=torch.long))


def test_voco_step_loss_and_terms_without_teacher() -> None:
    m = build_method({**VOCO, "lambda_reg": 0.5}, MODEL)
    w = torch.tensor([[1.0, 0.5], [0.0, 2.0], [-1.0, 0.5]])  # 2 features for 4 bases: the widths differ
    m.student = _Linear(w.clone())
    v = _views()
    out = m.voco_step(v)
    s_bases = v.bases.flatten(2) @ w  # (B, K, 2)
    s_crops = v.crops.flatten(2) @ w
    logits = voco_logits(s_crops, s_bases)
    pos, neg = prediction_loss(logits, v.labels)
    reg = base_regularization_loss(s_bases)
    assert out.loss.item() == pytest.approx((pos + neg + 0.5 * reg).item(), rel=1e-6)
    for k, want in {"pos": pos, "neg": neg, "reg": reg}.items():
        assert out.terms[k].item() == pytest.approx(want.item(), rel=1e-6), k
    nb = F.normalize(s_bases, dim=-1)
    cos = [nb[i, a] @ nb[i, c] for i in range(2) for a in range(4) for c in range(a + 1, 4)]
    assert out.terms["base_cos"].item() == pytest.approx(torch.stack(cos).mean().item(), rel=1e-5)
    assert out.terms["label_error"].item() == pytest.approx((logits - v.labels).abs().mean().item(), rel=1e-6)
    assert m._last_error == pytest.approx(out.terms["label_error"].item())
    dump_labels, dump_logits = m._label_dump
    assert torch.equal(dump_labels, v.labels[0, 0]) and torch.allclose(dump_logits, logits[0, 0])
    out.loss.backward()
    assert m.student.w.grad is not None and m.student.w.grad.abs().sum() > 0


def test_voco_step_with_an_ema_teacher_uses_symmetric_logits() -> None:
    m = build_method({**VOCO, "voco_teacher": "ema"}, MODEL)
    ws = torch.tensor([[1.0, 0.5], [0.0, 2.0], [-1.0, 0.5]])
    wt = torch.tensor([[0.5, 1.0], [1.0, -1.0], [0.5, 0.5]])
    m.student = _Linear(ws.clone())
    m.teacher = _Linear(wt.clone()).requires_grad_(False)
    v = _views()
    out = m.voco_step(v)
    sb, sc = v.bases.flatten(2) @ ws, v.crops.flatten(2) @ ws
    tb, tc = v.bases.flatten(2) @ wt, v.crops.flatten(2) @ wt
    logits = symmetric_logits(sc, tc, sb, tb)
    pos, neg = prediction_loss(logits, v.labels)
    reg = base_regularization_loss(sb)  # the student's bases only
    assert out.loss.item() == pytest.approx((pos + neg + reg).item(), rel=1e-6)
    assert out.terms["pos"].item() == pytest.approx(pos.item(), rel=1e-6)
    assert out.terms["label_error"].item() == pytest.approx((logits - v.labels).abs().mean().item(), rel=1e-6)


def test_training_step_hands_the_views_to_voco_step(monkeypatch: pytest.MonkeyPatch, voco: Any) -> None:
    v = _views()
    monkeypatch.setattr(voco, "make_views", lambda images: v)
    got: list[VoCoViews] = []
    monkeypatch.setattr(voco, "voco_step", lambda views: got.append(views) or "out")
    assert voco.training_step({"image": None}, "voco") == "out" and got == [v]


def test_training_step_moves_the_views_to_the_network(monkeypatch: pytest.MonkeyPatch) -> None:
    m = build_method(VOCO, MODEL).to("meta")  # the meta device stands in for an accelerator
    monkeypatch.setattr(m, "make_views", lambda images: _views())
    got: list[VoCoViews] = []
    monkeypatch.setattr(m, "voco_step", got.append)
    m.training_step({"image": None}, "voco")
    assert all(t.device.type == "meta" for t in (got[0].bases, got[0].crops, got[0].labels))


def test_label_dump_only_on_its_iterations(voco: Any) -> None:
    voco._label_dump = None
    assert voco.on_step_end("voco", 200, 1000) == {}  # nothing to show yet
    voco._label_dump = (torch.tensor([0.25, 0.75]), torch.tensor([0.5, 0.125]))
    assert voco.on_step_end("voco", 150, 1000) == {}
    assert voco.on_step_end("voco", 300, 1000) == {
        "voco_labels/base0": 0.25,
        "voco_labels/base1": 0.75,
        "voco_logits/base0": 0.5,
        "voco_logits/base1": 0.125,
    }
    voco.cfg.log_labels_every = 0  # never
    try:
        assert voco.on_step_end("voco", 300, 1000) == {}
    finally:
        voco.cfg.log_labels_every = 100


def _feed(errors: list[float], rank: int = 0, **kw: Any) -> tuple[Any, list[str]]:
    keys = {"track_after": 2, "track_window": 2, "track_patience": 1, **kw}
    m = build_method({**VOCO, **keys}, MODEL)
    m.dist = DistContext(rank=rank, world_size=2)
    msgs: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            msgs.append(record.getMessage())

    h = Grab(level=logging.WARNING)
    voco_mod.log.addHandler(h)
    try:
        for i, e in enumerate(errors):
            m._last_error = e
            m._check_tracking(i, 100)
    finally:
        voco_mod.log.removeHandler(h)
    return m, msgs


def test_tracking_warning_names_both_windows() -> None:
    # steps 0-1 warm-up; first window (steps 2, 3) mean 0.5; the window at steps 4, 5 mean 0.55
    _, msgs = _feed([9.0, 9.0, 0.4, 0.6, 0.5, 0.6])
    assert msgs == [
        "VoCo iteration 5: label_error (mean |logit - label|) has not fallen after warm-up "
        "(0.5000 over the 2 steps from iteration 2, 0.5500 over the last 2; 1 checks in a row): "
        "the logits are not tracking the position labels; see docs/methods/voco.md ('Warning'). "
        "Users report this without a momentum teacher: consider method.voco_teacher=ema."
    ]
    _, msgs = _feed([9.0, 9.0, 0.4, 0.6, 0.5, 0.6], voco_teacher="ema")  # with a teacher: other advice
    assert len(msgs) == 1 and msgs[0].endswith(
        "see docs/methods/voco.md ('Warning'). Check train.lr and the warm-up (train.warmup_steps)."
    )
    # just below track_min_drop x first: fine
    _, msgs = _feed([9.0, 9.0, 0.5, 0.5, 0.47, 0.47], track_min_drop=0.95)
    assert msgs == []
    _, msgs = _feed([9.0, 9.0, 0.5, 0.5, 0.475, 0.475], track_min_drop=0.95)  # exactly 0.95 x: not below
    assert len(msgs) == 1


def test_tracking_check_is_silent_when_off_before_warm_up_or_off_rank_zero() -> None:
    m, msgs = _feed([9.0, 9.0, 0.5, 0.5, 0.5, 0.5], rank=1)
    assert msgs == [] and m._tracking_warned  # decided on every rank, said on rank 0 only
    m, msgs = _feed([0.5] * 8, track_window=0)
    assert msgs == [] and m._first_errors == []
    m, msgs = _feed([0.5] * 5, track_after=4)  # only iteration 4 is past warm-up
    assert m._first_errors == [0.5] and msgs == []
    m, _ = _feed([])
    m._check_tracking(10, 100)  # no error measured yet
    assert m._first_errors == []
