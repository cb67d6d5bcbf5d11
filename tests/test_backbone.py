"""SwinBackbone: the stage-limited encoder equals MONAI's, the full forward equals net(x), and
stage-3 tokens follow the F_perm block raster order."""

from __future__ import annotations

import pytest
import torch

from asa3d.config_sections import ModelConfig
from asa3d.models.backbones.swinunetr import (
    SwinBackbone,
    build_student_teacher,
    encoder_parameter_names,
    stage_for_subvolume,
    tap_channels,
)
from asa3d.views.shuffle import to_blocks


@pytest.fixture(scope="module")
def net() -> SwinBackbone:
    torch.manual_seed(0)
    return SwinBackbone(ModelConfig(feature_size=12), out_channels=1).eval()


@pytest.fixture(scope="module")
def x64() -> torch.Tensor:
    return torch.rand(1, 1, 64, 64, 64, generator=torch.Generator().manual_seed(1))


def test_stage_helpers() -> None:
    assert [stage_for_subvolume(p) for p in (2, 4, 8, 16, 32)] == [0, 1, 2, 3, 4]
    assert stage_for_subvolume(16, patch_size=4) == 2
    with pytest.raises(ValueError):
        stage_for_subvolume(12)
    with pytest.raises(ValueError):
        stage_for_subvolume(64)
    assert tap_channels(48, 3) == 384 and tap_channels(12, 3) == 96 and tap_channels(24, 4) == 384
    assert encoder_parameter_names(2) == ("swinViT.patch_embed.", "swinViT.layers1.", "swinViT.layers2.")


def test_state_dict_keys_are_monai_keys(net: SwinBackbone) -> None:
    keys = list(net.state_dict())
    assert all(k.startswith("net.") for k in keys)
    assert list(net.swinunetr_state_dict()) == list(net.net.state_dict())
    assert net.net.swinViT.layers1[0].blocks[0].drop_path is not None  # MONAI kwarg name mapped


def test_encode_matches_swinvit_and_skips_late_modules(net: SwinBackbone, x64: torch.Tensor) -> None:
    called: list[str] = []
    hooks = [
        getattr(net.net, n).register_forward_hook(lambda *a, n=n: called.append(n))
        for n in ("encoder1", "encoder10", "decoder1")
    ]
    hooks.append(net.net.swinViT.layers4.register_forward_hook(lambda *a: called.append("layers4")))
    hooks.append(net.net.swinViT.layers4[0].register_forward_hook(lambda *a: called.append("layers4")))
    with torch.no_grad():
        hs3 = net.encode(x64, 3)
    for h in hooks:
        h.remove()
    assert called == [] and len(hs3) == 4
    with torch.no_grad():
        ref = net.net.swinViT(x64, True)
        out, hs4 = net.forward_full(x64)
        full = net.net(x64)
    for k in range(4):
        assert hs3[k].shape == ref[k].shape
        assert (hs3[k] - ref[k]).abs().max().item() <= 1e-6
    assert hs3[3].shape == (1, 96, 4, 4, 4)
    for k in range(5):
        assert (hs4[k] - ref[k]).abs().max().item() <= 1e-6
    assert (out - full).abs().max().item() <= 1e-6


def test_gradient_checkpointing_through_encode() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(feature_size=12, window_size=4, depths=(1, 1, 1, 1))
    a = SwinBackbone(cfg).eval()
    b = SwinBackbone(ModelConfig(**{**cfg.__dict__, "use_checkpoint": True})).eval()
    b.load_state_dict(a.state_dict())
    assert b.net.swinViT.layers1[0].blocks[0].use_checkpoint
    x = torch.rand(1, 1, 32, 32, 32)
    for m in (a, b):
        m.zero_grad()
        m.encode(x, 3)[3].pow(2).sum().backward()
    ga, gb = (
        a.net.swinViT.layers2[0].blocks[0].attn.qkv.weight.grad,
        b.net.swinViT.layers2[0].blocks[0].attn.qkv.weight.grad,
    )
    assert torch.allclose(ga, gb, atol=1e-5)


def test_student_teacher_pair() -> None:
    s, t = build_student_teacher(ModelConfig(feature_size=12, window_size=4, depths=(1, 1, 1, 1)))
    assert not t.training and all(not p.requires_grad for p in t.parameters())
    assert all(
        torch.equal(a, b) for a, b in zip(s.state_dict().values(), t.state_dict().values(), strict=True)
    )


def test_stage3_token_gradient_locality(net: SwinBackbone, x64: torch.Tensor) -> None:
    """The input gradient of h_3 token (1,2,3) concentrates (~73 %) in input block (1,2,3)."""
    x = x64.clone().requires_grad_(True)
    h3 = net.encode(x, 3)[3]  # (1, 96, 4, 4, 4)
    h3[0, :, 1, 2, 3].pow(2).sum().backward()
    mass = to_blocks(x.grad.abs(), 16)[0].flatten(1).sum(1)  # (64,) in raster order
    share = mass / mass.sum()
    t = (1 * 4 + 2) * 4 + 3
    assert share.argmax().item() == t
    assert share[t].item() > 0.6


def test_changed_block_changes_same_token_most(net: SwinBackbone, x64: torch.Tensor) -> None:
    """Block index == token index: alter exactly one 16^3 sub-volume, the matching flattened
    stage-3 token (raster order, axis 2 fastest) changes most."""
    variants = [x64]
    targets = [(0, 1, 3), (3, 2, 0)]
    for i0, i1, i2 in targets:
        v = x64.clone()
        v[..., i0 * 16 : i0 * 16 + 16, i1 * 16 : i1 * 16 + 16, i2 * 16 : i2 * 16 + 16] = 1.0
        variants.append(v)
    with torch.no_grad():
        tok = net.encode(torch.cat(variants), 3)[3].flatten(2).transpose(1, 2)  # (3, 64, 96)
    for j, (i0, i1, i2) in enumerate(targets, start=1):
        change = (tok[j] - tok[0]).norm(dim=-1)
        assert change.argmax().item() == (i0 * 4 + i1) * 4 + i2


def test_flash_attention_only_where_autograd_is_off(net: SwinBackbone) -> None:
    """model.use_flash_attention (default on) switches MONAI's SDPA window attention, which MONAI
    applies only without autograd: no-grad outputs agree with the explicit path within float
    rounding, and a forward with autograd takes the explicit path bit for bit."""
    x = torch.rand(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(2))
    flags = [m.use_flash_attention for m in net.modules() if hasattr(m, "use_flash_attention")]
    assert flags and all(flags)
    slow = SwinBackbone(ModelConfig(feature_size=12, use_flash_attention=False), out_channels=1).eval()
    slow.load_state_dict(net.state_dict())
    with torch.no_grad():
        fast_h, slow_h = net.encode(x, 3)[3], slow.encode(x, 3)[3]
    assert not torch.equal(fast_h, slow_h)  # a different kernel really ran
    torch.testing.assert_close(fast_h, slow_h, atol=1e-5, rtol=1e-5)
    assert torch.equal(net.encode(x, 3)[3].detach(), slow.encode(x, 3)[3].detach())


def test_speed_only_kwargs_are_dropped_on_a_monai_without_them(monkeypatch: pytest.MonkeyPatch) -> None:
    import asa3d.models.backbones.swinunetr as bb

    class OldSwinUNETR:  # the signature of a MONAI before use_flash_attention
        def __init__(self, in_channels: int, out_channels: int, feature_size: int = 24) -> None: ...

    monkeypatch.setattr(bb, "SwinUNETR", OldSwinUNETR)
    kw = {"in_channels": 1, "out_channels": 2, "feature_size": 12, "use_flash_attention": True}
    assert bb.monai_swinunetr_kwargs(kw) == {"in_channels": 1, "out_channels": 2, "feature_size": 12}
    with pytest.raises(TypeError, match="use_v2"):
        bb.monai_swinunetr_kwargs({**kw, "use_v2": True})  # a key that changes the network is refused
