"""Adam's method piece by piece on a tiny 2D ResNet: every config check by its message and its
boundary, the dimension-dependent defaults, source ids, stage bookkeeping, the key momentum,
input normalisation, the view settings handed to the view generator, MoCo's key shuffle across
ranks, the loss wiring (which tensors reach the pruned InfoNCE) and the queue fill."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import asa3d.methods.adam as adam_mod
from adam_tiny import ADAM_TINY_2D
from asa3d.config import ConfigError
from asa3d.config_sections import ModelConfig
from asa3d.methods.adam import AdamConfig, source_ids
from asa3d.methods.adam_losses import pruned_infonce
from asa3d.methods.base import build_method
from asa3d.methods.dist_context import DistContext
from asa3d.models.ema import cosine_momentum

TINY2D = {**ADAM_TINY_2D, "queue_size": 6, "view_size": 16}


def _method(**kw: Any) -> Any:
    torch.manual_seed(0)
    return build_method({**TINY2D, **kw}, ModelConfig())


# ---- config ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"spatial_dims": 1}, "method.spatial_dims=1: 2 or 3."),
        ({"spatial_dims": 4}, "method.spatial_dims=4: 2 or 3."),
        (
            {"backbone": "swinunetr"},
            "method.backbone=swinunetr is 3D only; set method.spatial_dims=3 or backbone=resnet.",
        ),
        ({"resnet_stem_stride": 0}, "method.resnet_stem_stride=0: 1 or 2."),
        ({"levels": []}, "method.levels=[]: a non-empty list of levels >= 0."),
        ({"levels": [0, -1]}, "method.levels=[0, -1]: a non-empty list of levels >= 0."),
        (
            {"levels": [0, 2], "stage_epochs": [1]},
            "method.stage_epochs=[1]: one positive count per level [0, 2].",
        ),
        (
            {"levels": [0, 2], "stage_epochs": [2, 0]},
            "method.stage_epochs=[2, 0]: one positive count per level [0, 2].",
        ),
        ({"temperature": 0.0}, "method.temperature=0.0: must be > 0."),
        ({"key_momentum": -0.01}, "method.key_momentum=-0.01: must lie in [0, 1]."),
        ({"key_momentum": 1.01}, "method.key_momentum=1.01: must lie in [0, 1]."),
        ({"gamma": -1.01}, "method.gamma=-1.01: a cosine threshold in [-1, 1] (or null)."),
        ({"gamma": 1.01}, "method.gamma=1.01: a cosine threshold in [-1, 1] (or null)."),
        ({"queue_size": 0}, "method.queue_size=0: must be >= 1."),
        ({"crop_scale": [0.0, 1.0]}, "method.crop_scale=[0.0, 1.0]: need 0 < lo <= hi <= 1."),
        ({"crop_scale": [0.6, 0.5]}, "method.crop_scale=[0.6, 0.5]: need 0 < lo <= hi <= 1."),
        ({"crop_scale": [0.5, 1.01]}, "method.crop_scale=[0.5, 1.01]: need 0 < lo <= hi <= 1."),
        (
            {"spatial_dims": 3, "volume_size": 2, "levels": [0, 6]},
            "method.levels: level 6 splits a 2^3 cube into (4, 4, 4).",
        ),
    ],
)
def test_config_refuses_with_a_message(kw: dict[str, Any], msg: str) -> None:
    with pytest.raises(ConfigError) as err:
        AdamConfig(**kw).validate()
    assert str(err.value) == msg  # the whole message: which key, and how to fix it


@pytest.mark.parametrize(
    "kw",
    [
        {"spatial_dims": 3, "backbone": "swinunetr"},
        {"resnet_stem_stride": 1},
        {"levels": [0]},
        {"levels": [0, 2], "stage_epochs": [1, 1]},
        {"temperature": 1e-3},
        {"key_momentum": 0.0},
        {"key_momentum": 1.0},
        {"gamma": None},
        {"gamma": -1.0},
        {"gamma": 1.0},
        {"queue_size": 1},
        {"crop_scale": [1.0, 1.0]},
        {"crop_scale": [0.5, 0.5]},
        {"spatial_dims": 3, "volume_size": 2, "levels": [0, 3]},  # 2x2x2 parts of a 2^3 cube: fine
        {"spatial_dims": 2, "volume_size": 2, "levels": [0, 8]},  # volume_size is 3D only
    ],
)
def test_config_accepts_the_boundaries(kw: dict[str, Any]) -> None:
    AdamConfig(**kw).validate()


def test_dimension_dependent_defaults() -> None:
    two, three = AdamConfig(), AdamConfig(spatial_dims=3)
    got = {k: (two.resolved(k), three.resolved(k)) for k in ("in_channels", "normalize", "brightness_mode")}
    assert got == {
        "in_channels": (3, 1),
        "normalize": ("imagenet", "none"),
        "brightness_mode": ("scale", "shift"),
    }
    assert two.resolved("exclude_same_source") is False and three.resolved("exclude_same_source") is True
    set_ = AdamConfig(in_channels=2, normalize="none", brightness_mode="shift", exclude_same_source=True)
    assert [
        set_.resolved(k) for k in ("in_channels", "normalize", "brightness_mode", "exclude_same_source")
    ] == [
        2,
        "none",
        "shift",
        True,
    ]
    assert AdamConfig(spatial_dims=3, exclude_same_source=False).resolved("exclude_same_source") is False


def test_source_ids_hash_each_id_stably() -> None:
    dev = torch.device("cpu")
    none = source_ids(None, 3, dev)
    assert none.dtype == torch.long and none.tolist() == [-1, -1, -1]
    got = source_ids(["a", "b", "a", 7], 4, dev)
    want = [int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "big") >> 1 for s in "aba7"]
    assert got.dtype == torch.long and got.tolist() == want
    assert got[0] == got[2] != got[1] and (got >= 0).all()
    meta = torch.device("meta")  # stands in for an accelerator: the ids follow the embeddings
    assert source_ids(None, 2, meta).device == source_ids(["a", "b"], 2, meta).device == meta


# ---- construction ------------------------------------------------------------------------------
def test_tiny_resnet_query_net_key_copy_and_queue() -> None:
    m = _method(in_channels=2, resnet_stem_stride=1)
    enc = m.student.encoder
    assert isinstance(enc.fc, nn.Identity) and enc.conv1.in_channels == 2 and enc.conv1.stride == (1, 1)
    assert enc.layer1[0].conv1.out_channels == 4 and enc.layer4[0].conv1.out_channels == 8
    assert m.student.projector[0].in_features == 8 and m.student.projector[2].out_features == 8
    assert dict(m.spec.kwargs) == {  # what the downstream rebuilds: a plain MONAI ResNet
        "block": "basic",
        "layers": [1, 1, 1, 1],
        "block_inplanes": [4, 8, 8, 8],
        "spatial_dims": 2,
        "n_input_channels": 2,
        "num_classes": 1,
        "conv1_t_stride": 1,
    }
    assert (m.queue.size, m.queue.keys.shape[1]) == (6, 8)
    for (a, p), (b, t) in zip(m.student.named_parameters(), m.teacher.named_parameters(), strict=True):
        assert a == b and torch.equal(p, t)
    assert (m.stage, m._stage_bounds, m._pending) == (0, [(0, 1)], [])
    assert m.in_ch == 2 and m.phases() == ["adam"] and m.buffer_policy() == {"queue.": "gathered"}
    spec = m.sample_spec("adam")
    assert (spec.mode, spec.spatial_dims) == ("whole", 2)
    assert m.backbone_spec() is m.spec


def test_swin_backbone_wants_one_channel() -> None:
    model = ModelConfig(feature_size=12, depths=(1, 1, 1, 1), num_heads=(3, 3, 3, 3), window_size=4)
    base = {"name": "adam", "spatial_dims": 3, "backbone": "swinunetr", "proj_hidden_dim": 8, "proj_dim": 4}
    for method_kw, model_cfg in (
        ({}, ModelConfig(**{**model.__dict__, "in_channels": 2})),
        ({"in_channels": 3}, model),
    ):
        with pytest.raises(
            ConfigError, match=r"^method\.backbone=swinunetr: 1-channel CT \(model\.in_channels=1\)\.$"
        ):
            build_method({**base, "queue_size": 4, **method_kw}, model_cfg)
    m = build_method({**base, "queue_size": 4}, model)
    x = torch.rand(2, 1, 32, 32, 32)
    enc = m.student.encoder.eval()  # no drop-path: two passes agree
    assert enc.out_dim == 16 * 12 and m.student.projector[0].in_features == 16 * 12
    with torch.no_grad():
        want = enc.backbone.encode(x, 4)[4].mean((2, 3, 4))
        torch.testing.assert_close(enc(x), want)
    assert m.spec is None and m.backbone_spec().kwargs["feature_size"] == 12


def test_train_mode_keeps_the_key_encoder_training() -> None:
    m = _method()
    m.train()
    assert m.training and m.teacher.training and m.student.training  # MoCo: BN batch statistics
    assert m.train(False) is m
    assert not m.training and not m.teacher.training and not m.student.training


# ---- stages and momentum -----------------------------------------------------------------------
def test_stage_lengths_and_their_messages() -> None:
    m = _method(levels=[0, 2], stage_epochs=[1, 3])
    assert m.stage_starts(4) == (0, 1) and m._stage_bounds == [(0, 1), (1, 3)]
    assert [m.stage_of(r) for r in range(4)] == [0, 1, 1, 1]
    with pytest.raises(
        ConfigError,
        match=r"method.stage_epochs=\[1, 3\] sums to 4 rounds but train.epochs=5; set train.epochs=4.",
    ):
        m.stage_starts(5)
    eq = _method(levels=[0, 2])
    assert eq.stage_starts(6) == (0, 3) and eq._stage_bounds == [(0, 3), (3, 3)]
    with pytest.raises(
        ConfigError,
        match=r"train.epochs=5 does not split into 2 equal stages \(levels \[0, 2\]\); set train.epochs to a "
        r"multiple of 2 or list method.stage_epochs.",
    ):
        eq.stage_starts(5)


def test_round_start_sets_the_stage_and_drops_pending_keys() -> None:
    m = _method(levels=[0, 2], prune_level0=False, gamma=0.5)
    m.on_round_start(3, 4)  # the bounds are derived from the rounds on first use
    assert m._stage_bounds == [(0, 2), (2, 2)] and (m.stage, m.level, m.gamma_now()) == (1, 2, 0.5)
    m._pending.append((torch.zeros(1, 8), torch.zeros(1, dtype=torch.long)))
    m.on_round_start(1, 4)
    assert (m.stage, m.level, m.gamma_now()) == (0, 0, None) and m._pending == []
    m.on_round_start(2, 6)  # another total: the bounds follow it
    assert m._stage_bounds == [(0, 3), (3, 3)] and m.stage == 0
    pruned0 = _method(levels=[0, 2], prune_level0=True, gamma=0.5)
    pruned0.on_round_start(0, 4)
    assert pruned0.gamma_now() == 0.5
    assert _method(levels=[1]).gamma_now() == 0.8


def test_key_momentum_constant_and_cosine_per_stage() -> None:
    const = _method(key_momentum=0.99)
    const.on_round_start(1, 3)
    assert const.momentum(7, 30) == 0.99
    cos = _method(key_momentum=0.9, key_momentum_schedule="cosine", levels=[0, 2], stage_epochs=[2, 3])
    assert cos.momentum(3, 10) == pytest.approx(cosine_momentum(3, 10, 0.9))  # before any stage: one round
    cos.on_round_start(3, 5)  # stage 2: rounds 2-4
    # 51 iterations over 5 rounds: 10 per round (floor), the stage starts at iteration 20 for 30
    for it in (20, 27, 49):
        assert cos.momentum(it, 51) == pytest.approx(cosine_momentum(it - 20, 30, 0.9), abs=1e-12)
    cos.on_round_start(0, 5)
    assert cos.momentum(5, 51) == pytest.approx(cosine_momentum(5, 20, 0.9), abs=1e-12)


# ---- inputs and views --------------------------------------------------------------------------
def test_inputs_are_float_on_the_device_and_3d_volumes_resized() -> None:
    m = _method()
    x = torch.randint(0, 255, (2, 1, 8, 8), dtype=torch.uint8)
    got = m._inputs(x)
    assert got.dtype == torch.float32 and torch.equal(got, x.float())
    lst = m._inputs([x[0], x[1]])
    assert (
        isinstance(lst, list)
        and all(v.dtype == torch.float32 for v in lst)
        and torch.equal(lst[1], x[1].float())
    )
    three = AdamConfig(spatial_dims=3, volume_size=4)
    m.cfg = three
    vols = m._inputs(torch.ones(2, 1, 6, 5, 7))
    assert vols.shape == (2, 1, 4, 4, 4) and torch.allclose(vols, torch.ones_like(vols))
    assert m._inputs([torch.ones(1, 6, 5, 7), torch.zeros(1, 3, 3, 3)]).shape == (2, 1, 4, 4, 4)
    m.cfg = AdamConfig(**{k: v for k, v in TINY2D.items() if k != "name"})
    m.to("meta")  # a network on another device (the meta device stands in for an accelerator)
    assert m._inputs(x).device.type == "meta" and m._inputs([x[0]])[0].device.type == "meta"


def test_normalisation_imagenet_rgb_grey_and_none() -> None:
    v = torch.full((1, 1, 2, 2), 0.5)
    rgb = _method(in_channels=3)
    got = rgb._normalise(v)
    want = [(0.5 - m) / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), strict=True)]
    assert got.shape == (1, 3, 2, 2)
    torch.testing.assert_close(got[0, :, 0, 0], torch.tensor(want))
    grey = _method(in_channels=1, normalize="imagenet")
    torch.testing.assert_close(grey._normalise(v), torch.full_like(v, (0.5 - 0.449) / 0.226))
    v3 = torch.full((1, 1, 2, 2, 2), 0.25)
    torch.testing.assert_close(grey._normalise(v3), torch.full_like(v3, (0.25 - 0.449) / 0.226))
    none = _method(in_channels=1, normalize="none")
    assert torch.equal(none._normalise(v), v)
    grey_in = torch.rand(1, 1, 2, 2)  # grey into a 3-channel network: replicated, even unnormalised
    torch.testing.assert_close(
        _method(in_channels=3, normalize="none")._normalise(grey_in), grey_in.expand(1, 3, 2, 2)
    )
    rgb_in = torch.rand(1, 3, 2, 2)
    torch.testing.assert_close(
        _method(in_channels=3, normalize="none")._normalise(rgb_in), rgb_in
    )  # three channels stay as they are


def test_views_get_the_configured_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    decs: list[tuple[Any, ...]] = []
    real_views, real_dec = adam_mod.anatomy_views, adam_mod.decompose

    def views(x: Any, boxes: torch.Tensor, **kw: Any) -> torch.Tensor:
        calls.append(kw)
        return real_views(x, boxes, **kw)

    def dec(*a: Any) -> Any:
        decs.append(a)
        return real_dec(*a)

    monkeypatch.setattr(adam_mod, "anatomy_views", views)
    monkeypatch.setattr(adam_mod, "decompose", dec)
    kw = {
        "view_size": 12,
        "crop_scale": [0.3, 0.9],
        "crop_ratio": [0.5, 2.0],
        "brightness": 0.1,
        "contrast": 0.2,
        "p_jitter": 0.3,
        "blur_sigma": [0.2, 0.7],
        "p_blur": 0.4,
        "rotation_deg": 11.0,
        "split_axes": "xy",
        "remainder": "drop",
        "levels": [0, 1],
    }
    m = _method(**kw)
    m.on_round_start(1, 2)
    vq, vk, d = m.make_views(torch.rand(3, 1, 20, 24))
    want = {
        "size": 12,
        "scale": (0.3, 0.9),
        "ratio": (0.5, 2.0),
        "brightness": 0.1,
        "contrast": 0.2,
        "p_jitter": 0.3,
        "brightness_mode": "scale",
        "blur_sigma": (0.2, 0.7),
        "p_blur": 0.4,
        "rotation_deg": 11.0,
    }
    assert calls == [want, want]  # query and key: two independent draws with the same settings
    assert decs == [((3, 1, 20, 24), 1, "xy", "drop")]
    assert vq.shape == vk.shape == (3, 1, 12, 12) and not torch.equal(vq, vk)
    assert d.boxes.shape == (3, 2, 2)
    lst = m.make_views([torch.rand(1, 20, 24), torch.rand(1, 20, 24)])[0]
    assert lst.shape == (2, 1, 12, 12) and decs[-1][0] == (2, 1, 20, 24)
    with pytest.raises(
        ValueError,
        match="^Adam: images of one batch differ in size; resize them to one size when preparing the data$",
    ):
        m.make_views([torch.rand(1, 20, 24), torch.rand(1, 20, 20)])


def test_views_are_normalised_for_three_channels() -> None:
    m = _method(in_channels=3, p_jitter=0.0, p_blur=0.0, rotation_deg=0.0, levels=[0])
    vq, vk, _ = m.make_views(torch.full((2, 1, 16, 16), 0.5))
    want = torch.tensor(
        [(0.5 - a) / s for a, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), strict=True)]
    )
    for v in (vq, vk):
        assert v.shape == (2, 3, 16, 16)
        torch.testing.assert_close(v.mean((0, 2, 3)), want)


# ---- keys, loss, queue -------------------------------------------------------------------------
class _ShuffledRank1(DistContext):
    """Rank 1 of 2 ranks in one process: the other rank's key views, its permutation (rank 0's
    wins) and its key projections are made up here as that rank would have computed them."""

    def __init__(self, teacher: nn.Module, other_vk: torch.Tensor, perm0: torch.Tensor) -> None:
        super().__init__(rank=1, world_size=2)
        self.teacher, self.other_vk, self.perm0 = teacher, other_vk, perm0
        self.calls = 0

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 1:  # the key views
            self.allv = torch.cat([self.other_vk, tensor])
            return self.allv
        if self.calls == 2:  # the permutations
            return torch.cat([self.perm0, tensor])
        n = tensor.shape[0]  # the key projections: rank 0 ran the first n shuffled views
        return torch.cat([self.teacher(self.allv[self.perm0[:n]]), tensor])


def test_keys_are_shuffled_across_ranks_and_put_back() -> None:
    m = _method()
    m.train()
    torch.manual_seed(1)
    other, mine = torch.rand(3, 1, 16, 16), torch.rand(3, 1, 16, 16)
    perm0 = torch.tensor([4, 0, 3, 5, 1, 2])  # rank 0's shuffle: this rank's rows split over both
    m.dist = _ShuffledRank1(m.teacher, other, perm0)
    got = m.keys(mine)
    allv = torch.cat([other, mine])
    with torch.no_grad():
        out = torch.cat([m.teacher(allv[perm0[:3]]), m.teacher(allv[perm0[3:]])])
    k_global = torch.empty_like(out)
    k_global[perm0] = out
    torch.testing.assert_close(got, k_global[3:])
    assert m.dist.calls == 3 and not got.requires_grad
    with torch.no_grad():
        plain = m.teacher(mine)
    assert not torch.allclose(got, plain, atol=1e-4)  # other BatchNorm batches: the shuffle matters
    m.cfg.key_bn = "batch"  # no shuffle: this rank's batch as it is
    torch.testing.assert_close(m.keys(mine), plain)
    m.cfg.key_bn = "shuffle"
    m.dist = DistContext()  # one process: nothing to shuffle
    torch.testing.assert_close(m.keys(mine), plain)


def _fixed_views(m: Any, vq: torch.Tensor, vk: torch.Tensor) -> None:
    m.make_views = lambda images: (vq, vk, None)


def test_training_step_feeds_query_key_queue_and_ids_to_the_loss() -> None:
    m = _method(levels=[0, 2], gamma=0.3, temperature=0.7, exclude_same_source=True)
    m.on_round_start(1, 2)  # level 2: pruning on
    m.train()
    torch.manual_seed(2)
    vq, vk = torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16)
    _fixed_views(m, vq, vk)
    ids = source_ids(["p", "q"], 2, torch.device("cpu"))
    with torch.no_grad():
        m.queue.ids[1] = ids[0]  # a key of query 0's own source: out of its denominator
    out = m.training_step({"image": None, "id": ["p", "q"]}, "adam")
    with torch.no_grad():
        q, k = m.student(vq), m.teacher(vk)
    want = pruned_infonce(q, k, m.queue.keys, 0.7, 0.3, query_ids=ids, key_ids=m.queue.ids)
    assert not want.keep[0, 1]  # query 0's own source
    assert out.loss.item() == pytest.approx(want.loss.item(), rel=1e-6)
    assert out.terms["infonce"] is out.loss
    assert out.terms["pruned_fraction"].item() == pytest.approx(want.pruned_fraction.item())
    (kp, idp) = m._pending[0]
    torch.testing.assert_close(kp, F.normalize(k, dim=1))
    assert torch.equal(idp, ids) and len(m._pending) == 1
    # same-source exclusion off (the 2D default): the id match no longer matters
    m.cfg.exclude_same_source = None
    out2 = m.training_step({"image": None, "id": ["p", "q"]}, "adam")
    plain = pruned_infonce(q, k, m.queue.keys, 0.7, 0.3)
    assert out2.loss.item() == pytest.approx(plain.loss.item(), rel=1e-6)
    assert out2.terms["pruned_fraction"].item() == pytest.approx(plain.pruned_fraction.item())
    # no ids in the batch: -1 for every sample
    m._pending.clear()
    m.training_step({"image": None}, "adam")
    assert m._pending[0][1].tolist() == [-1, -1]


def test_step_end_moves_the_key_encoder_and_enqueues_every_ranks_keys() -> None:
    m = _method(key_momentum=0.75, levels=[0, 2])
    m.on_round_start(1, 2)
    t0 = [p.detach().clone() for p in m.teacher.parameters()]
    with torch.no_grad():
        for p in m.student.parameters():
            p.add_(1.0)

    class TwoRanks(DistContext):
        def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
            return torch.cat([tensor, tensor.flip(0)])

    m.dist = TwoRanks(rank=0, world_size=2)
    keys = F.normalize(torch.arange(16.0).view(2, 8), dim=1)
    m._pending.append((keys, torch.tensor([5, 6])))
    logged = m.on_step_end("adam", 3, 4)
    assert logged == {"key_momentum": 0.75, "level": 2.0, "stage": 1.0}
    for t, s, a in zip(m.teacher.parameters(), m.student.parameters(), t0, strict=True):
        torch.testing.assert_close(t, 0.75 * a + 0.25 * s)
    torch.testing.assert_close(m.queue.keys[:4], torch.cat([keys, keys.flip(0)]))
    assert m.queue.ids[:4].tolist() == [5, 6, 6, 5] and int(m.queue.ptr) == 4 and m._pending == []
    m.on_step_end("adam", 4, 4)  # nothing pending: the queue stays
    assert int(m.queue.ptr) == 4


# ---- export, monitors, pictures ----------------------------------------------------------------
def test_transfer_exports_the_chosen_encoder() -> None:
    q = _method()
    with torch.no_grad():
        for p in q.teacher.parameters():
            p.add_(1.0)
    sd = q.transfer_state_dict()
    assert sd.keys() == q.student.encoder.state_dict().keys()
    assert all(torch.equal(v, q.student.encoder.state_dict()[k]) for k, v in sd.items())
    q.cfg.export_encoder = "key"
    sd = q.transfer_state_dict()
    assert all(torch.equal(v, q.teacher.encoder.state_dict()[k]) for k, v in sd.items())
    assert not torch.equal(sd["conv1.weight"], q.student.encoder.state_dict()["conv1.weight"])
    assert q.transfer_parts() == dict.fromkeys(q.backbone_spec().parts, True)


def test_monitor_embeddings_run_in_eval_mode_without_touching_rng_or_statistics() -> None:
    m = _method()
    m.train()
    bn = dict(m.student.named_buffers())
    stats = {k: v.clone() for k, v in bn.items()}
    x = torch.rand(3, 1, 16, 16)
    torch.manual_seed(5)
    out = m.monitor_embeddings({"image": x})
    after = torch.rand(4)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(4))  # the views' randomness was forked away
    assert m.training and m.teacher.training  # back to training mode
    assert all(torch.equal(v, stats[k]) for k, v in dict(m.student.named_buffers()).items())
    torch.manual_seed(5)
    m.eval()
    vq, vk, _ = m.make_views(x)
    with torch.no_grad():
        torch.testing.assert_close(out["student"], m.student(vq))
        torch.testing.assert_close(out["teacher"], m.teacher(vk))
    assert out["student"].dtype == torch.float32 and out["student"].shape == (3, 8)
    m.eval()
    m.monitor_embeddings({"image": x})
    assert not m.training  # eval stays eval


def test_image_summaries_scale_the_first_view_to_unit_range() -> None:
    m = _method()
    vq = torch.tensor([[-0.3, -0.2, -0.1, 0.0], [0.5, 0.1, 0.4, 0.45]]).view(2, 1, 2, 2)  # range < 1
    vk = torch.full((2, 1, 2, 2), 4.0)  # constant: all zeros, not 0/0
    _fixed_views(m, vq, vk)
    pics = m.image_summaries({"image": None}, "adam")
    torch.testing.assert_close(pics["query"], torch.tensor([[0.0, 1 / 3], [2 / 3, 1.0]]))
    assert torch.equal(pics["key"], torch.zeros(2, 2))
    v3 = torch.zeros(1, 1, 2, 2, 3)
    v3[0, 0, :, :, 1] = torch.tensor([[0.1, 0.2], [0.3, 0.5]])  # the middle z slice
    _fixed_views(m, v3, v3)
    pics = m.image_summaries({"image": None}, "adam")
    torch.testing.assert_close(pics["query"], torch.tensor([[0.0, 0.25], [0.5, 1.0]]))
    assert pics["query"].dtype == torch.float32
