"""ASA method: config validation, gradient routing (docs/methods/asa.md), EMA, teacher mode, transfer."""

from __future__ import annotations

import copy

import pytest
import torch
from monai.networks.nets import SwinUNETR

from asa3d.config import ConfigError
from asa3d.config_sections import ModelConfig
from asa3d.methods.base import build_method
from asa3d.models.backbones.swinunetr import monai_swinunetr_kwargs
from asa3d.models.ema import cosine_momentum, ema_update_, make_teacher

MODEL = ModelConfig(feature_size=12, window_size=4, depths=(2, 2, 2, 2))
SMALL = {
    "name": "asa",
    "input_size": 64,
    "subvolume_size": 16,
    "p2_max_offset_cells": 1,
    "global_proj_dim": 32,
    "local_proj_dim": 16,
}


def _build(**kw):
    return build_method({**SMALL, **kw}, MODEL)


@pytest.fixture(scope="module")
def method():
    torch.manual_seed(0)
    return _build()


@pytest.fixture(scope="module")
def vols() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.rand(1, 70, 60, 52, generator=g), torch.rand(1, 64, 64, 64, generator=g)]


# ---- config ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"input_size": 80}, "multiple of 32"),
        ({"input_size": 96, "subvolume_size": 64}, "one of 4, 8, 16, 32"),
        ({"input_size": 32, "subvolume_size": 32}, "G=1"),
        ({"p2_max_offset_cells": 4}, r"\[0, 3\]"),
        ({"phases": [{"name": "P1", "view": "related_crops", "tasks": ["sop"]}]}, "cannot run task"),
        ({"phases": [{"name": "P1", "view": "shuffle", "tasks": []}]}, "no tasks"),
        ({"phases": [{"name": "P1", "view": "shuffle", "tasks": ["rot"]}]}, "not one of"),
        ({"perm_ratio": 1.5}, "perm_ratio"),
        ({"input_size": 32, "subvolume_size": 8, "p2_max_offset_cells": 1}, "input_size >= 64"),
        ({"lambda_local": -1.0}, "lambda_local"),
        ({"colour": 1}, "unknown key"),
    ],
)
def test_config_refusals(override: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_method({**SMALL, **override}, MODEL)


def test_defaults_are_paper_s11() -> None:
    from asa3d.methods.asa import ASAConfig

    c = ASAConfig()
    assert [(p.name, p.view, p.tasks) for p in c.phases] == [
        ("P1", "shuffle", ["sop", "var", "gc"]),
        ("P2", "related_crops", ["gc", "lc"]),
    ]
    assert (c.input_size, c.subvolume_size, c.p2_size, c.grid) == (128, 16, 160, 8)
    assert (c.p1_teacher_input, c.ema_momentum_start, c.ema_scope, c.local_normalize) == (
        "original",
        0.9,
        "paper",
        True,
    )
    assert (c.p2_symmetric, c.consistency_reduction, c.global_proj_dim, c.local_proj_dim) == (
        False,
        "sum",
        8192,
        512,
    )


def test_method_layout(method) -> None:
    assert method.phases() == ["P1", "P2"] and method.stage == 3
    assert method.sample_spec("P1").mode == "whole"
    assert method.student.order_head[-1].out_features == 3
    assert method.student.global_proj[0].in_features == 96
    assert all(not p.requires_grad for p in method.teacher.parameters())
    names = {n for n, _ in method.named_parameters()}
    assert {n for n, p in method.named_parameters() if p.requires_grad} == {
        n for n in names if n.startswith("student.")
    }
    assert len(list(method.trainable_parameters())) == len(list(method.student.parameters()))


def test_teacher_always_eval(method) -> None:
    method.train()
    assert method.student.training and not method.teacher.training
    assert not any(m.training for m in method.teacher.modules())
    method.eval()
    method.train(True)
    assert not method.teacher.training


# ---- gradient routing (docs/methods/asa.md) ----------------------------------------------------------------
ENC3 = (
    "backbone.net.swinViT.patch_embed.",
    "backbone.net.swinViT.layers1.",
    "backbone.net.swinViT.layers2.",
    "backbone.net.swinViT.layers3.",
)
LATE = ("backbone.net.swinViT.layers4.", "backbone.net.encoder", "backbone.net.decoder", "backbone.net.out.")


def _reached(method, loss: torch.Tensor) -> set[str]:
    params = dict(method.student.named_parameters())
    grads = torch.autograd.grad(loss, list(params.values()), retain_graph=True, allow_unused=True)
    return {n for (n, _), g in zip(params.items(), grads, strict=True) if g is not None and g.abs().sum() > 0}


def _prefix_hit(names: set[str], prefix: str) -> bool:
    return any(n.startswith(prefix) for n in names)


def test_gradient_routing_phase1(method, vols) -> None:
    method.train()
    torch.manual_seed(1)
    out = method.training_step({"image": vols[:1]}, "P1")  # batch 1: the decoder at 64^3 is the cost
    assert set(out.terms) == {"vop", "var", "global"}
    every = {n for n, _ in method.student.named_parameters()}
    total = _reached(method, out.loss)
    # every prefix of encoder, layers4, UNETR blocks, decoder and heads except the local projector
    for pre in (
        ENC3
        + LATE
        + (
            "backbone.net.encoder1.",
            "backbone.net.encoder10.",
            "backbone.net.decoder5.",
            "order_head.",
            "global_proj.",
        )
    ):
        assert _prefix_hit(total, pre), pre
    assert not _prefix_hit(total, "local_proj.")
    vop = _reached(method, out.terms["vop"])
    assert vop == {n for n in every if n.startswith(ENC3 + ("order_head.",))}
    glob = _reached(method, out.terms["global"])
    assert glob == {n for n in every if n.startswith(ENC3 + ("global_proj.",))}
    var = _reached(method, out.terms["var"])
    assert not _prefix_hit(var, "order_head.") and not _prefix_hit(var, "global_proj.")
    assert _prefix_hit(var, "backbone.net.swinViT.layers4.") and _prefix_hit(var, "backbone.net.out.")
    out.loss.backward()
    assert all(p.grad is None for p in method.teacher.parameters())
    method.zero_grad(set_to_none=True)


@pytest.mark.parametrize("symmetric", [False, True])
def test_gradient_routing_phase2(method, vols, symmetric: bool) -> None:
    m = copy.copy(method)  # shallow: same modules, own cfg
    m.cfg = copy.deepcopy(method.cfg)
    m.cfg.p2_symmetric = symmetric
    m.train()
    out = m.training_step({"image": vols}, "P2")
    assert set(out.terms) == {"global", "local"}
    every = {n for n, _ in method.student.named_parameters()}
    reached = _reached(m, out.loss)
    assert reached == {n for n in every if n.startswith(ENC3 + ("global_proj.", "local_proj."))}
    assert not any(_prefix_hit(reached, pre) for pre in LATE + ("order_head.",))
    assert _reached(m, out.terms["local"]) == {n for n in every if n.startswith(ENC3 + ("local_proj.",))}
    out.loss.backward()
    assert all(p.grad is None for p in method.teacher.parameters())
    method.zero_grad(set_to_none=True)


def test_p2_symmetric_weights(method) -> None:
    """Symmetric P2 = 1/2 (G12 + G21) + 1/4 (L12 + L21), from two one-direction evaluations."""
    from asa3d.views.related_crops import CropPair

    method.eval()  # no drop-path so both evaluations see the same networks
    g = torch.Generator().manual_seed(5)
    from asa3d.views.related_crops import related_crops

    pair = related_crops(torch.rand(2, 1, 80, 80, 80, generator=g), 64, 16, 1, generator=g)
    swap = CropPair(pair.crop2, pair.crop1, pair.offset2, pair.offset1, pair.mask2, pair.mask1)
    m = copy.copy(method)
    m.cfg = copy.deepcopy(method.cfg)
    with torch.no_grad():
        a = m.crops_step(pair, ["gc", "lc"])
        b = m.crops_step(swap, ["gc", "lc"])
        m.cfg.p2_symmetric = True
        s = m.crops_step(pair, ["gc", "lc"])
    expected = 0.5 * (a.terms["global"] + b.terms["global"]) + 0.25 * (a.terms["local"] + b.terms["local"])
    assert s.loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    method.train()


# ---- EMA ----------------------------------------------------------------------------------------
def test_cosine_momentum() -> None:
    assert cosine_momentum(0, 100, 0.9) == pytest.approx(0.9)
    assert cosine_momentum(99, 100, 0.9) == pytest.approx(1.0, abs=1e-4)
    assert cosine_momentum(50, 100, 0.9) == pytest.approx(0.95)
    ms = [cosine_momentum(i, 100, 0.996) for i in range(100)]
    assert all(b >= a for a, b in zip(ms, ms[1:], strict=False))


def test_ema_update_exact() -> None:
    t = [torch.randn(3, 4), torch.randn(5)]
    s = [torch.randn(3, 4), torch.randn(5)]
    old = [x.clone() for x in t]
    ema_update_(t, s, 0.9)
    for a, o, b in zip(t, old, s, strict=True):
        assert torch.allclose(a, 0.9 * o + 0.1 * b, atol=1e-7, rtol=1e-6)
    h = [torch.zeros(4, dtype=torch.bfloat16)]
    ema_update_(h, [torch.ones(4)], 0.5)
    assert h[0].float().tolist() == [0.5] * 4


@pytest.mark.parametrize("scope", ["paper", "all"])
def test_on_step_end_ema_scope(method, scope: str) -> None:
    m = copy.copy(method)
    m.cfg = copy.deepcopy(method.cfg)
    m.cfg.ema_scope = scope
    # perturb the student so teacher and student differ everywhere
    with torch.no_grad():
        for p in m.student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    for phase, it in (("P2", 7), ("P1", 3)):
        before_t = {n: p.clone() for n, p in m.teacher.named_parameters()}
        stud = dict(m.student.named_parameters())
        logs = m.on_step_end(phase, it, 20)
        mom = cosine_momentum(it, 20, 0.9)
        assert logs == {"ema_momentum": pytest.approx(mom)}
        for n, p in m.teacher.named_parameters():
            expected = mom * before_t[n] + (1 - mom) * stud[n]
            in_scope = scope == "all" or phase == "P1" or n.startswith(ENC3 + ("global_proj.", "local_proj."))
            if in_scope:
                assert torch.allclose(p, expected, atol=1e-6, rtol=1e-5), n
            else:
                assert torch.equal(p, before_t[n]), n


# ---- transfer -----------------------------------------------------------------------------------
def test_transfer_state_dict_loads_into_plain_swinunetr(method) -> None:
    sd = method.transfer_state_dict()
    assert set(sd) == set(method.teacher.backbone.net.state_dict())
    kwargs = monai_swinunetr_kwargs(MODEL.swinunetr_kwargs(3))
    fresh = SwinUNETR(**kwargs).eval()
    own = fresh.state_dict()
    loadable = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(sd) - set(loadable))
    assert skipped and all(k.startswith("out.") for k in skipped)
    res = fresh.load_state_dict(loadable, strict=False)
    assert res.unexpected_keys == [] and all(k.startswith("out.") for k in res.missing_keys)
    x = torch.rand(1, 1, 64, 64, 64)
    with torch.no_grad():
        ours = method.teacher.backbone.encode(x, 3)[3]
        theirs = fresh.swinViT(x, True)[3]
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_monitor_embeddings(method, vols) -> None:
    with torch.no_grad():
        emb = method.monitor_embeddings({"image": vols})
    assert emb["teacher"].shape == emb["student"].shape == (2, 32)


def test_make_teacher_is_independent_copy() -> None:
    net = torch.nn.Linear(3, 3)
    t = make_teacher(net)
    assert t is not net and not t.training and not t.weight.requires_grad
    assert torch.equal(t.weight, net.weight)
