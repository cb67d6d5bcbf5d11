"""Adam's method on the contract: stages from rounds, views inside the anchor part, gradient
routing (the query side only), the queue filled after the step, pruning off at n = 0, and the
transfer weights loading into the plain MONAI networks."""

from __future__ import annotations

import pytest
import torch

from adam_tiny import ADAM_TINY_2D
from asa3d.config import ConfigError
from asa3d.config_sections import ModelConfig
from asa3d.engine.schedules import LRSchedule
from asa3d.methods.base import build_method
from asa3d.views.anatomy_views import anatomy_views, resized_crops

TINY2D = dict(ADAM_TINY_2D)


def _method(**kw):
    torch.manual_seed(0)
    return build_method({**TINY2D, **kw}, ModelConfig())


def test_stages_follow_rounds_and_levels() -> None:
    m = _method(stage_epochs=[2, 3, 1])
    assert m.stage_starts(6) == (0, 2, 5)
    seen = []
    for r in range(6):
        m.on_round_start(r, 6)
        seen.append((m.level, m.gamma_now()))
    assert seen == [(0, None), (0, None), (2, 0.8), (2, 0.8), (2, 0.8), (4, 0.8)]
    m.on_round_start(3, 6)  # a resumed run: the state depends on the round alone
    assert (m.stage, m.level) == (1, 2)
    with pytest.raises(ConfigError, match="train.epochs=6"):
        m.stage_starts(7)
    with pytest.raises(ConfigError, match="multiple of 3"):
        _method().stage_starts(7)
    assert _method().stage_starts(600) == (0, 200, 400)
    assert _method(prune_level0=True).gamma_now() == 0.8


def test_lr_schedule_restarts_each_stage() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    one = LRSchedule(opt, "iter_cosine", 0.03, 0, 3, 4)
    staged = LRSchedule(opt, "iter_cosine", 0.03, 0, 9, 4, stage_starts=(0, 3, 6))
    for start in (0, 3, 6):
        for r in range(3):
            for i in range(4):
                gi = (start + r) * 4 + i
                assert staged.value(start + r, gi) == one.value(r, r * 4 + i)
    assert staged.value(3, 12) > staged.value(2, 11)  # back up at the stage start
    with pytest.raises(ValueError):
        LRSchedule(opt, "iter_cosine", 0.03, 0, 3, 4, stage_starts=(0, 3))


def test_views_stay_inside_the_anchor_part() -> None:
    torch.manual_seed(1)
    x = torch.zeros(2, 1, 64, 64)
    x[:, :, :32, 32:] = 1.0  # the top-right quarter is bright, everything else dark
    box = torch.tensor([[[0, 32], [32, 64]]] * 2)
    v = anatomy_views(x, box, 16, p_jitter=0.0, p_blur=0.0, rotation_deg=0.0)
    assert torch.allclose(v, torch.ones_like(v))  # every pixel of the view comes from the part
    whole = resized_crops(x, box, 32, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    torch.testing.assert_close(whole, x[:, :, :32, 32:])  # the full part at its own size: itself
    x3 = torch.rand(1, 1, 16, 16, 16)
    b3 = torch.tensor([[[8, 16], [0, 8], [8, 16]]])
    torch.testing.assert_close(resized_crops(x3, b3, 8, (1.0, 1.0), (1.0, 1.0)), x3[:, :, 8:, :8, 8:])


def test_gradients_reach_the_query_side_only_and_the_queue_fills_after_the_step() -> None:
    m = _method()
    m.on_round_start(1, 3)  # level 2: pruning on
    m.stage_starts(3)
    m.on_round_start(1, 3)
    m.train()
    before = m.queue.keys.clone()
    x = torch.rand(4, 1, 64, 64)
    out = m.training_step({"image": x, "id": ["a", "b", "c", "d"]}, "adam")
    assert torch.equal(m.queue.keys, before)  # nothing enqueued before the optimiser step
    out.loss.backward()
    student = [n for n, p in m.student.named_parameters() if p.grad is not None]
    assert len(student) == len(list(m.student.parameters()))
    assert all(p.grad is None for p in m.teacher.parameters())
    assert not any(p.requires_grad for p in m.teacher.parameters())
    assert out.loss.item() > 0 and 0.0 <= out.terms["pruned_fraction"].item() <= 1.0
    m.on_step_end("adam", 0, 3)
    assert int(m.queue.ptr) == 4
    torch.testing.assert_close(m.queue.keys[:4].norm(dim=1), torch.ones(4))
    assert torch.equal(m.queue.keys[4:], before[4:])
    assert len(set(m.queue.ids[:4].tolist())) == 4


def test_no_pruning_at_level0_and_key_momentum() -> None:
    m = _method(gamma=-1.0)  # would prune every negative at n > 0
    m.stage_starts(3)
    m.on_round_start(0, 3)
    m.train()
    out = m.training_step({"image": torch.rand(4, 1, 64, 64)}, "adam")
    assert out.terms["pruned_fraction"].item() == 0.0
    assert out.loss.item() > 1e-3  # all 12 queue keys stay in the denominator
    m.on_round_start(1, 3)
    out = m.training_step({"image": torch.rand(4, 1, 64, 64)}, "adam")
    assert out.terms["pruned_fraction"].item() == 1.0 and out.loss.item() == pytest.approx(0.0, abs=1e-6)
    t0 = [p.clone() for p in m.teacher.parameters()]
    with torch.no_grad():
        for p in m.student.parameters():
            p.add_(1.0)
    m.on_step_end("adam", 0, 9)
    for t, s, a in zip(m.teacher.parameters(), m.student.parameters(), t0, strict=True):
        torch.testing.assert_close(t, 0.999 * a + 0.001 * s)
    cos = _method(key_momentum_schedule="cosine")
    cos.stage_starts(3)
    cos.on_round_start(1, 3)  # stage 2 of 3 rounds x 4 iterations: restarts at iteration 4
    assert cos.momentum(4, 12) == pytest.approx(0.999) and cos.momentum(7, 12) > 0.999


def test_2d_transfer_loads_into_plain_monai_resnet() -> None:
    from monai.networks.nets import ResNet

    m = _method()
    spec = m.backbone_spec()
    net = ResNet(**spec.kwargs)
    res = net.load_state_dict(m.transfer_state_dict(), strict=False)
    assert res.unexpected_keys == [] and sorted(res.missing_keys) == ["fc.bias", "fc.weight"]
    assert spec.kwargs["spatial_dims"] == 2 and m.transfer_parts() == {p: True for p in spec.parts}
    full = build_method({"name": "adam"}, ModelConfig())  # the published default: ResNet-50, K = 65536
    assert full.backbone_spec().kwargs["block"] == "bottleneck" and full.queue.size == 65536
    assert full.student.projector[0].in_features == 2048 and full.in_ch == 3
    assert (full.cfg.temperature, full.cfg.key_momentum, full.cfg.gamma) == (0.2, 0.999, 0.8)
    # the paper's torchvision ResNet-50 halves the resolution in its stem (MONAI's default keeps it)
    stem = full.student.encoder.conv1
    assert full.backbone_spec().kwargs["conv1_t_stride"] == 2 and stem.stride == (2, 2)
    x = torch.zeros(1, 3, 64, 64)
    assert stem(x).shape[-2:] == (32, 32)
    kept = _method(resnet_stem_stride=1)
    assert kept.student.encoder.conv1.stride == (1, 1)
    assert ResNet(**kept.backbone_spec().kwargs).conv1.stride == (1, 1)  # recorded for the downstream
    with pytest.raises(ConfigError, match="resnet_stem_stride=3: 1 or 2"):
        _method(resnet_stem_stride=3)


def test_3d_swin_variant_transfers_swinvit() -> None:
    from monai.networks.nets import SwinUNETR

    from asa3d.models.backbones.swinunetr import monai_swinunetr_kwargs

    model = ModelConfig(feature_size=12, depths=(1, 1, 1, 1), num_heads=(3, 3, 3, 3), window_size=4)
    m = build_method(
        {
            "name": "adam",
            "spatial_dims": 3,
            "backbone": "swinunetr",
            "levels": [0, 3, 6],
            "proj_hidden_dim": 16,
            "proj_dim": 8,
            "queue_size": 8,
            "volume_size": 32,
            "view_size": 32,
        },
        model,
    )
    m.stage_starts(3)
    m.on_round_start(2, 3)  # level 6: 4x4x4 parts of a 32^3 cube
    m.train()
    vols = [torch.rand(1, 40, 36, 30), torch.rand(1, 30, 30, 30)]  # whole volumes of any shape
    out = m.training_step({"image": vols, "id": ["v0", "v1"]}, "adam")
    out.loss.backward()
    assert all(p.grad is not None for p in m.student.encoder.backbone.net.swinViT.parameters())
    net = SwinUNETR(**monai_swinunetr_kwargs(dict(m.backbone_spec().kwargs)))
    res = net.load_state_dict(m.transfer_state_dict(), strict=False)
    assert res.unexpected_keys == [] and all(k.startswith("out.") for k in res.missing_keys)
    parts = m.transfer_parts()
    assert parts["patch_embed"] and parts["layers4"] and not parts["encoders"] and not parts["decoder"]
    assert m.backbone_spec().check_parts(parts, "adam") is not None
    with pytest.raises(ConfigError, match="3D only"):
        build_method({"name": "adam", "backbone": "swinunetr"}, model)


@pytest.mark.parametrize("name", ["adam2d", "adam2d_tiny", "adam3d", "adam3d_tiny"])
def test_configs_load_with_the_published_settings(name: str) -> None:
    from asa3d.config import from_dict, read_yaml
    from asa3d.config_sections import PretrainConfig
    from asa3d.methods.adam import AdamConfig

    cfg = from_dict(PretrainConfig, read_yaml(f"pretrain/{name}.yaml"))
    section = {k: v for k, v in cfg.method.items() if k != "name"}
    m = from_dict(AdamConfig, section, where="method")
    assert cfg.method["name"] == "adam" and (m.temperature, m.gamma) == (0.2, 0.8)
    if name == "adam2d":
        assert (m.resnet_depth, m.queue_size, m.key_momentum, m.levels) == (50, 65536, 0.999, [0, 2, 4])
        assert (cfg.train.batch_size, cfg.train.epochs, cfg.train.optimizer, cfg.train.lr) == (
            256,
            600,
            "sgd",
            0.03,
        )
        assert cfg.train.warmup_epochs == 0 and cfg.data.preset == "chestxray14"
    if name == "adam3d":
        assert (m.backbone, m.queue_size, m.levels, m.view_size) == ("swinunetr", 4096, [0, 3, 6], 64)
        assert (cfg.train.optimizer, cfg.train.lr, cfg.train.batch_size) == ("adamw", 1e-4, 32)
