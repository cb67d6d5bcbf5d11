"""ASA's pieces one by one, on stub networks whose outputs are known: the exact loss of every phase
and setting (which tensors reach which term, with which weight), the views each phase draws, the
EMA scope, the transferred parts and every config refusal. No training run: each test is cheap,
so the mutation run (scripts/mutation.py) can afford them per mutant."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from asa3d.config import ConfigError
from asa3d.config_sections import ModelConfig
from asa3d.methods.asa import ASA, ASAConfig, ASANetwork, PhaseConfig
from asa3d.methods.asa_losses import consistency_loss
from asa3d.methods.base import build_method
from asa3d.views.related_crops import CropPair, related_crops
from asa3d.views.resize import resize_volumes
from asa3d.views.shuffle import shuffle_blocks, unshuffle

MODEL = ModelConfig(feature_size=12, window_size=4, depths=(1, 1, 1, 1), drop_path_rate=0.0)
S, P, M = 32, 8, 2  # G = 4 cells per axis (N = 64 tokens), tap at stage 2, P2 volume 48^3
G, N, C = S // P, (S // P) ** 3, 3  # C: channels of the stub tokens
BASE = {
    "name": "asa",
    "input_size": S,
    "subvolume_size": P,
    "p2_max_offset_cells": M,
    "global_proj_dim": 16,
    "local_proj_dim": 16,
    "phases": [
        {"name": "P1", "view": "shuffle", "tasks": ["sop", "gc"]},
        {"name": "P2", "view": "related_crops", "tasks": ["gc", "lc"]},
    ],
}


def _hidden(x: torch.Tensor, k: int, scale: torch.Tensor) -> torch.Tensor:
    """A stage-k stub hidden state (B, C, G, G, G): the cell means, per-channel scaled, + k."""
    return F.avg_pool3d(x, P) * scale.view(1, C, 1, 1, 1) + float(k)


class StubBackbone(nn.Module):
    def __init__(self, scale: torch.Tensor) -> None:
        super().__init__()
        self.scale = nn.Parameter(scale.clone())
        self.calls: list[str] = []

    def forward_full(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        self.calls.append("full")
        return x * 2.0 + 1.0, [_hidden(x, k, self.scale) for k in range(5)]


class StubNet(nn.Module):
    """The ASANetwork interface with known outputs (stage recorded, heads tiny linear maps)."""

    def __init__(self, seed: int, order_out: int = 3) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.backbone = StubBackbone(torch.rand(C, generator=g) + 0.5)
        self.order_head = nn.Linear(C, order_out)
        self.global_proj = nn.Linear(C, 4)
        self.local_proj = nn.Linear(C, 5)
        with torch.no_grad():
            for p in list(self.order_head.parameters()) + list(self.global_proj.parameters()):
                p.copy_(torch.randn(p.shape, generator=g))
            for p in self.local_proj.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        self.inputs: list[torch.Tensor] = []

    def tokens(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        self.backbone.calls.append(f"tokens{stage}")
        self.inputs.append(x)
        return _hidden(x, stage, self.backbone.scale).flatten(2).transpose(1, 2)


def _flat(h: torch.Tensor) -> torch.Tensor:
    return h.flatten(2).transpose(1, 2)


def _method(order_out: int = 3, **over) -> ASA:  # noqa: ANN003
    torch.manual_seed(0)
    m = build_method({**BASE, **over}, MODEL)
    m.student = StubNet(1, order_out)
    m.teacher = StubNet(2, order_out)
    for p in m.teacher.parameters():
        p.requires_grad_(False)
    return m


def _vol(b: int = 2, size: int = S, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 1, size, size, size, generator=torch.Generator().manual_seed(seed))


LAMBDAS = {"lambda_vop": 3.0, "lambda_var": 2.0, "lambda_global": 5.0, "lambda_local": 7.0}


# ---- phase 1 -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("over", "order_out"),
    [
        ({}, 3),
        ({"order_target": "1d"}, 1),
        ({"order_target": "1d", "order_1d_loss": "ce"}, N),
        ({"consistency_reduction": "mean", "p1_teacher_input": "permuted"}, 3),
    ],
)
def test_shuffle_step_exact_terms_and_weights(over: dict, order_out: int) -> None:
    m = _method(order_out, **LAMBDAS, **over)
    cfg = m.cfg
    x = _vol()
    sh = shuffle_blocks(x, P, generator=torch.Generator().manual_seed(3))
    out = m.shuffle_step(x, sh, ["sop", "var", "gc"])
    s, t = m.student, m.teacher
    # the decoder pass on the permuted volume gives recon and the stage-2 tokens
    recon = sh.x_perm * 2.0 + 1.0
    tok = _flat(_hidden(sh.x_perm, 2, s.backbone.scale))
    var = F.mse_loss(recon, x)
    pred = s.order_head(tok)
    if cfg.order_target == "3d":
        vop = F.mse_loss(pred, sh.target3d)
    elif cfg.order_1d_loss == "mse":
        vop = F.mse_loss(pred[..., 0], sh.target1d)
    else:
        vop = F.cross_entropy(pred.flatten(0, 1), sh.perm.flatten())
    t_in = x if cfg.p1_teacher_input == "original" else sh.x_perm
    z_t = t.global_proj(_flat(_hidden(t_in, 2, t.backbone.scale)).mean(1))
    glob = consistency_loss(s.global_proj(tok.mean(1)), z_t, True, cfg.consistency_reduction)
    assert set(out.terms) == {"var", "vop", "global"}
    for key, want in (("var", var), ("vop", vop), ("global", glob)):
        assert out.terms[key].item() == pytest.approx(want.item(), rel=1e-5), key
    assert out.loss.item() == pytest.approx((2 * var + 3 * vop + 5 * glob).item(), rel=1e-5)
    assert s.backbone.calls == ["full"] and t.backbone.calls == ["tokens2"]
    assert t.inputs[0] is t_in
    # the teacher gets no gradient; the student's scale and every head used do
    out.loss.backward()
    assert all(p.grad is None for p in t.parameters())
    assert s.backbone.scale.grad is not None and s.order_head.weight.grad is not None
    assert s.global_proj.weight.grad is not None and s.local_proj.weight.grad is None


@pytest.mark.parametrize(
    ("tasks", "keys", "calls"),
    [
        (["sop"], {"vop"}, ["tokens2"]),
        (["gc"], {"global"}, ["tokens2"]),
        (["var"], {"var"}, ["full"]),
        (["sop", "gc"], {"vop", "global"}, ["tokens2"]),
    ],
)
def test_shuffle_step_runs_only_what_the_tasks_need(
    tasks: list[str], keys: set[str], calls: list[str]
) -> None:
    m = _method(**LAMBDAS)
    x = _vol(1)
    sh = shuffle_blocks(x, P, generator=torch.Generator().manual_seed(4))
    out = m.shuffle_step(x, sh, tasks)
    assert set(out.terms) == keys and m.student.backbone.calls == calls
    weights = {"var": 2.0, "vop": 3.0, "global": 5.0}
    assert out.loss.item() == pytest.approx(sum(weights[k] * out.terms[k].item() for k in keys), rel=1e-6)
    if "sop" in tasks:  # the order head reads the permuted volume's tokens
        assert m.student.inputs[0] is sh.x_perm
    assert out.loss.dtype == torch.float32 and out.loss.shape == ()


# ---- phase 2 -------------------------------------------------------------------------------------
def _pair(b: int = 2) -> CropPair:
    big = torch.rand(b, 1, S + M * P, S + M * P, S + M * P, generator=torch.Generator().manual_seed(9))
    pair = related_crops(big, S, P, M, generator=torch.Generator().manual_seed(2))
    assert (pair.offset1 != pair.offset2).any() and not torch.equal(pair.mask1, pair.mask2)
    return pair


@pytest.mark.parametrize(
    "over",
    [
        {},
        {"p2_symmetric": True},
        {"local_normalize": False, "consistency_reduction": "mean"},
        {"local_normalize": False, "p2_symmetric": True},
    ],
)
def test_crops_step_exact_terms_and_weights(over: dict) -> None:
    m = _method(**LAMBDAS, **over)
    cfg = m.cfg
    pair = _pair()
    out = m.crops_step(pair, ["gc", "lc"])
    s, t = m.student, m.teacher
    sym = cfg.p2_symmetric
    first = (pair.crop1, pair.mask1), (pair.crop2, pair.mask2)
    rows = [first, first[::-1]] if sym else [first]
    h_s = torch.cat([_flat(_hidden(a[0], 2, s.backbone.scale)) for a, _ in rows])
    h_t = torch.cat([_flat(_hidden(b[0], 2, t.backbone.scale)) for _, b in rows])
    m_s = torch.cat([a[1] for a, _ in rows])
    m_t = torch.cat([b[1] for _, b in rows])
    red = cfg.consistency_reduction
    glob = consistency_loss(s.global_proj(h_s.mean(1)), t.global_proj(h_t.mean(1)), True, red)
    loc = consistency_loss(s.local_proj(h_s[m_s]), t.local_proj(h_t[m_t]), cfg.local_normalize, red)
    assert set(out.terms) == {"global", "local"}
    assert out.terms["global"].item() == pytest.approx(glob.item(), rel=1e-5)
    assert out.terms["local"].item() == pytest.approx(loc.item(), rel=1e-5)
    want = 5 * glob + 7 * (0.5 if sym else 1.0) * loc
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-5)
    # one batched pass per network: the student on crop 1 (then crop 2), the teacher the other way
    assert len(s.inputs) == len(t.inputs) == 1
    assert torch.equal(s.inputs[0], torch.cat([pair.crop1, pair.crop2]) if sym else pair.crop1)
    assert torch.equal(t.inputs[0], torch.cat([pair.crop2, pair.crop1]) if sym else pair.crop2)
    out.loss.backward()
    assert all(p.grad is None for p in t.parameters())
    assert s.order_head.weight.grad is None and s.local_proj.weight.grad is not None


@pytest.mark.parametrize(("tasks", "keys"), [(["gc"], {"global"}), (["lc"], {"local"})])
def test_crops_step_single_task(tasks: list[str], keys: set[str]) -> None:
    m = _method(**LAMBDAS)
    out = m.crops_step(_pair(1), tasks)
    assert set(out.terms) == keys
    (key,) = keys
    assert out.loss.item() == pytest.approx(
        {"global": 5.0, "local": 7.0}[key] * out.terms[key].item(), rel=1e-6
    )
    assert out.loss.dtype == torch.float32 and out.loss.shape == ()


# ---- the views each phase draws --------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["area", "trilinear"])
def test_training_step_feeds_the_configured_views(mode: str) -> None:
    m = _method(resize_mode=mode, perm_ratio=0.5)
    seen = {}
    m.shuffle_step = lambda x, sh, tasks: seen.update(x=x, sh=sh, tasks=tasks) or "p1"  # type: ignore[method-assign]
    m.crops_step = lambda pair, tasks: seen.update(pair=pair, tasks2=tasks) or "p2"  # type: ignore[method-assign]
    g = torch.Generator().manual_seed(0)
    vols = [torch.rand(1, 40, 36, 44, generator=g), torch.rand(1, 50, 50, 30, generator=g)]
    assert m.training_step({"image": vols}, "P1") == "p1"
    want = resize_volumes(vols, S, mode)
    assert torch.equal(seen["x"], want) and seen["tasks"] == ["sop", "gc"]
    assert seen["sh"].perm.shape == (2, N)  # sub-volumes of P^3
    assert torch.equal(unshuffle(seen["sh"].x_perm, seen["sh"].perm, P), want)
    fixed = (seen["sh"].perm == torch.arange(N)).sum(1)
    assert (fixed >= N // 2).all()  # perm_ratio 0.5: half the sub-volumes stay in place
    assert m.training_step({"image": vols}, "P2") == "p2"
    big = resize_volumes(vols, S + M * P, mode)
    pair = seen["pair"]
    assert seen["tasks2"] == ["gc", "lc"] and pair.crop1.shape == (2, 1, S, S, S)
    assert pair.mask1.shape == (2, N)
    for crop, off in ((pair.crop1, pair.offset1), (pair.crop2, pair.offset2)):
        assert int(off.max()) <= M
        for i in range(2):
            a, b, c = (off[i] * P).tolist()
            assert torch.equal(crop[i], big[i, :, a : a + S, b : b + S, c : c + S])
    # over a batch of 16 every offset 0..M shows up: the configured M, not a smaller one
    m.training_step({"image": torch.rand(16, 1, 48, 48, 48)}, "P2")
    assert set(seen["pair"].offset1.flatten().tolist()) == set(range(M + 1))


def test_unknown_phase_is_named() -> None:
    m = _method()
    with pytest.raises(ValueError, match=re.escape("ASA has no phase 'P3'; phases are ['P1', 'P2']")):
        m.training_step({"image": _vol(1)}, "P3")
    assert m.phase_config("P2").view == "related_crops" and m.phases() == ["P1", "P2"]
    assert m.sample_spec("P1").mode == "whole" and m.stage == 2


def test_image_summaries_are_the_middle_slices() -> None:
    m = _method(resize_mode="trilinear", perm_ratio=0.5)
    vols = _vol(2, 40, seed=5)
    torch.manual_seed(7)
    out = m.image_summaries({"image": vols}, "P1")
    torch.manual_seed(7)
    x = resize_volumes(vols[:1], S, "trilinear")
    sh = shuffle_blocks(x, P, 0.5)
    assert set(out) == {"input", "permuted"}
    assert torch.equal(out["input"], x[0, 0, :, :, S // 2])
    assert torch.equal(out["permuted"], sh.x_perm[0, 0, :, :, S // 2])
    torch.manual_seed(8)
    out2 = m.image_summaries({"image": vols}, "P2")
    torch.manual_seed(8)
    pair = related_crops(resize_volumes(vols[:1], S + M * P, "trilinear"), S, P, M)
    assert set(out2) == {"crop1", "crop2"}
    assert torch.equal(out2["crop1"], pair.crop1[0, 0, :, :, S // 2])
    assert torch.equal(out2["crop2"], pair.crop2[0, 0, :, :, S // 2])
    # with appearance recovery, the student's reconstruction of the permuted view
    m._phase["P1"] = PhaseConfig("P1", "shuffle", ["var"])
    torch.manual_seed(7)
    out3 = m.image_summaries({"image": vols}, "P1")
    assert set(out3) == {"input", "permuted", "reconstruction"}
    assert torch.equal(out3["reconstruction"], sh.x_perm[0, 0, :, :, S // 2] * 2.0 + 1.0)


# ---- EMA scope, transfer, monitoring ---------------------------------------------------------------
def test_ema_prefixes_per_phase_and_scope() -> None:
    m = _method()
    assert m.ema_prefixes("P1") is None  # P1 trains all of it
    assert m.ema_prefixes("P2") == (
        "backbone.net.swinViT.patch_embed.",
        "backbone.net.swinViT.layers1.",
        "backbone.net.swinViT.layers2.",
        "global_proj.",
        "local_proj.",
    )
    m.model_cfg = ModelConfig(feature_size=12, use_v2=True)
    assert m.ema_prefixes("P2")[:3] == (
        "backbone.net.swinViT.patch_embed.",
        "backbone.net.swinViT.layers1c.",
        "backbone.net.swinViT.layers1.",
    )
    m.cfg.ema_scope = "all"
    assert m.ema_prefixes("P2") is None and m.ema_prefixes("P1") is None
    with pytest.raises(ValueError, match="no phase 'X'"):
        m.ema_prefixes("X")


def test_transfer_parts_follow_the_tasks() -> None:
    m = _method()
    assert m.transfer_parts() == {
        "patch_embed": True,
        "layers1": True,
        "layers2": True,
        "layers3": False,
        "layers4": False,
        "encoders": False,
        "decoder": False,
    }
    m.cfg = copy.deepcopy(m.cfg)
    m.cfg.phases[0].tasks = ["var"]
    assert all(m.transfer_parts().values())


def test_transfer_state_dict_is_the_teachers() -> None:
    torch.manual_seed(0)
    m = build_method(BASE, MODEL)
    with torch.no_grad():
        for p in m.student.parameters():
            p.add_(1.0)
    sd = m.transfer_state_dict()
    assert set(sd) == set(m.teacher.backbone.net.state_dict())
    for k, v in m.teacher.backbone.net.state_dict().items():
        assert torch.equal(sd[k], v), k


def test_monitor_embeddings_of_both_networks() -> None:
    m = _method(resize_mode="trilinear")
    vols = [torch.rand(1, 40, 40, 40, generator=torch.Generator().manual_seed(1))]
    emb = m.monitor_embeddings({"image": vols})
    x = resize_volumes(vols, S, "trilinear")
    for key, net in (("teacher", m.teacher), ("student", m.student)):
        pooled = _flat(_hidden(x, 2, net.backbone.scale)).mean(1)
        torch.testing.assert_close(emb[key], net.global_proj(pooled))
    assert not emb["student"].requires_grad
    for net in (m.student, m.teacher):
        del net.global_proj
    emb = m.monitor_embeddings({"image": vols})
    for key, net in (("teacher", m.teacher), ("student", m.student)):
        pooled = _flat(_hidden(x, 2, net.backbone.scale)).mean(1)
        torch.testing.assert_close(emb[key], F.normalize(pooled, dim=-1))
    assert emb["teacher"].norm(dim=-1).tolist() == pytest.approx([1.0])


# ---- the network ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("over", "out"),
    [({}, 3), ({"order_target": "1d"}, 1), ({"order_target": "1d", "order_1d_loss": "ce"}, N)],
)
def test_network_heads_follow_the_tasks(over: dict, out: int) -> None:
    cfg = ASAConfig(**{k: v for k, v in BASE.items() if k not in ("name", "phases")}, **over)
    net = ASANetwork(MODEL, cfg, 2)
    assert net.order_head[-1].out_features == out and net.order_head[0].in_features == 48
    assert net.global_proj[0].in_features == 48 and net.local_proj[0].in_features == 48
    gp = [m for m in net.global_proj.modules() if isinstance(m, nn.Linear)][-1]
    lp = [m for m in net.local_proj.modules() if isinstance(m, nn.Linear)][-1]
    assert (gp.out_features, lp.out_features) == (16, 16)
    cfg.phases = [PhaseConfig("P1", "shuffle", ["gc"])]
    only_gc = ASANetwork(MODEL, cfg, 2)
    assert hasattr(only_gc, "global_proj")
    assert not hasattr(only_gc, "order_head") and not hasattr(only_gc, "local_proj")
    cfg.phases = [PhaseConfig("P1", "related_crops", ["lc"])]
    only_lc = ASANetwork(MODEL, cfg, 2)
    assert hasattr(only_lc, "local_proj") and not hasattr(only_lc, "global_proj")


def test_tokens_are_the_stage_hidden_state_in_raster_order() -> None:
    torch.manual_seed(0)
    cfg = ASAConfig(input_size=S, subvolume_size=P, global_proj_dim=4, local_proj_dim=4)
    net = ASANetwork(MODEL, cfg, 2).eval()
    x = _vol(1)
    with torch.no_grad():
        h = net.backbone.encode(x, 2)[2]
        tok = net.tokens(x, 2)
    assert tok.shape == (1, N, 48)
    for i0, i1, i2 in [(0, 0, 1), (1, 2, 3), (3, 0, 2)]:
        torch.testing.assert_close(tok[0, (i0 * G + i1) * G + i2], h[0, :, i0, i1, i2], rtol=0, atol=0)


# ---- config --------------------------------------------------------------------------------------
def _cfg(**over) -> ASAConfig:  # noqa: ANN003
    base = {k: v for k, v in BASE.items() if k not in ("name", "phases")}
    phases = [PhaseConfig(**ph) for ph in BASE["phases"]]  # type: ignore[arg-type]
    return ASAConfig(**{**base, "phases": phases, **over})


@pytest.mark.parametrize(
    ("over", "msg"),
    [
        ({"phases": []}, "method.phases: at least one phase is required."),
        (
            {"phases": [PhaseConfig("A", "shuffle", ["sop"]), PhaseConfig("A", "shuffle", ["gc"])]},
            "method.phases: phase names must be unique, got ['A', 'A']",
        ),
        ({"subvolume_size": 2}, "method.subvolume_size=2: must be one of 4, 8, 16, 32."),
        ({"subvolume_size": 64, "input_size": 128}, "method.subvolume_size=64: must be one of 4, 8, 16, 32."),
        ({"input_size": 48}, "method.input_size=48: SwinUNETR needs a multiple of 32 (e.g. 64, 96, 128)."),
        (
            {"input_size": 32, "subvolume_size": 32, "p2_max_offset_cells": 0},
            "method.input_size=32 / subvolume_size=32 gives G=1 sub-volume per axis; need >= 2.",
        ),
        (
            {"phases": [PhaseConfig("P1", "shuffle", ["var"])]},
            "method.input_size=32: task var runs the SwinUNETR decoder, whose bottleneck InstanceNorm "
            "needs at least 2 voxels per axis at stage 4; use input_size >= 64.",
        ),
        (
            {"p2_max_offset_cells": 4},
            "method.p2_max_offset_cells=4: must lie in [0, G-1] = [0, 3] "
            "(G = input_size/subvolume_size = 4), or the two crops may not overlap.",
        ),
        ({"p2_max_offset_cells": -1}, "method.p2_max_offset_cells=-1: must lie in [0, G-1] = [0, 3]"),
        ({"perm_ratio": 0.0}, "method.perm_ratio=0.0: must lie in (0, 1]."),
        ({"perm_ratio": 1.01}, "method.perm_ratio=1.01: must lie in (0, 1]."),
        ({"ema_momentum_start": -0.1}, "method.ema_momentum_start=-0.1: must lie in [0, 1]."),
        ({"ema_momentum_start": 1.1}, "method.ema_momentum_start=1.1: must lie in [0, 1]."),
        ({"global_proj_dim": 0}, "method.global_proj_dim=0: must be positive."),
        ({"local_proj_dim": 0}, "method.local_proj_dim=0: must be positive."),
        ({"lambda_vop": -1.0}, "method.lambda_vop=-1.0: loss weights must be >= 0."),
        ({"lambda_var": -1.0}, "method.lambda_var=-1.0: loss weights must be >= 0."),
        ({"lambda_global": -0.5}, "method.lambda_global=-0.5: loss weights must be >= 0."),
        ({"lambda_local": -2.0}, "method.lambda_local=-2.0: loss weights must be >= 0."),
    ],
)
def test_config_refusals_exact(over: dict, msg: str) -> None:
    with pytest.raises(ConfigError) as err:
        _cfg(**over).validate()
    assert str(err.value).startswith(msg), str(err.value)


@pytest.mark.parametrize(
    "over",
    [
        {"subvolume_size": 4},
        {"subvolume_size": 8, "p2_max_offset_cells": 3},
        {"subvolume_size": 16, "input_size": 64, "p2_max_offset_cells": 1},
        {"subvolume_size": 32, "input_size": 64, "p2_max_offset_cells": 0},
        {"input_size": 64, "phases": [PhaseConfig("P1", "shuffle", ["var"])]},
        {"p2_max_offset_cells": 0, "perm_ratio": 1.0, "ema_momentum_start": 0.0},
        {"perm_ratio": 0.01, "ema_momentum_start": 1.0, "global_proj_dim": 1, "local_proj_dim": 1},
        {"lambda_vop": 0.0, "lambda_var": 0.0, "lambda_global": 0.0, "lambda_local": 0.0},
    ],
)
def test_config_edges_accepted(over: dict) -> None:
    _cfg(**over).validate()


def test_config_derived_sizes() -> None:
    c = _cfg(input_size=96, subvolume_size=16, p2_max_offset_cells=3)
    assert (c.grid, c.p2_size) == (6, 96 + 48)
    assert c.tasks() == {"sop", "gc", "lc"}
    c.phases = [PhaseConfig("P2", "related_crops", ["lc"])]
    assert c.tasks() == {"lc"}


@pytest.mark.parametrize(
    ("phase", "msg"),
    [
        (
            PhaseConfig("P9", "shuffle", []),
            "method.phases: phase 'P9' has no tasks; remove the phase instead "
            "(a config with no P1 task has no P1 pass).",
        ),
        (
            PhaseConfig("P9", "shuffle", ["gc", "gc"]),
            "method.phases: phase 'P9' lists a task twice: ['gc', 'gc']",
        ),
        (
            PhaseConfig("P9", "related_crops", ["var", "sop", "gc"]),
            "method.phases: phase 'P9' (view related_crops) cannot run task(s) ['sop', 'var']; "
            "view related_crops supports ['gc', 'lc'].",
        ),
        (
            PhaseConfig("P9", "shuffle", ["lc"]),
            "method.phases: phase 'P9' (view shuffle) cannot run task(s) ['lc']; "
            "view shuffle supports ['gc', 'sop', 'var'].",
        ),
    ],
)
def test_phase_refusals_exact(phase: PhaseConfig, msg: str) -> None:
    with pytest.raises(ConfigError) as err:
        phase.validate()
    assert str(err.value) == msg


def test_every_view_accepts_its_tasks() -> None:
    PhaseConfig("a", "shuffle", ["sop", "var", "gc"]).validate()
    PhaseConfig("b", "related_crops", ["gc", "lc"]).validate()


def test_method_refusals() -> None:
    with pytest.raises(ConfigError, match=re.escape("model.in_channels=2: ASA pretrains on 1-channel CT.")):
        ASA(_cfg(), ModelConfig(feature_size=12, in_channels=2))
    with pytest.raises(ConfigError) as err:
        ASA(_cfg(), ModelConfig(feature_size=12, patch_size=3))
    assert str(err.value) == "method.subvolume_size: sub-volume size 8 must be a multiple of the patch size 3"
    assert err.value.__cause__ is None and err.value.__suppress_context__
