"""Network pieces of the peer methods on a tiny MONAI SwinUNETR: SimMIM's masked encoder (no leak
through the skip path), Swin SSL heads (which tokens they read, where gradients go), VoCo's
features and projector."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from asa3d.config_sections import ModelConfig
from asa3d.methods.simmim_losses import masked_l1
from asa3d.models.backbone import SwinBackbone, decode_swinunetr
from asa3d.models.heads_peers import (
    SimMIMLightHead,
    SwinSSLHeads,
    VoCoProjector,
    voco_feature_dim,
    voco_features,
)
from asa3d.models.masked_swin import MaskToken, masked_encode, masked_forward
from asa3d.views.masking import fill_masked, simmim_view

TINY = ModelConfig(feature_size=12, window_size=4, depths=(1, 1, 1, 1), drop_path_rate=0.0)


@pytest.fixture(scope="module")
def backbone() -> SwinBackbone:
    torch.manual_seed(0)
    return SwinBackbone(TINY, out_channels=1).eval()


def _grads(module: torch.nn.Module) -> set[str]:
    """Top-level SwinUNETR parts (swinViT, encoder1, decoder5, ...) that received a non-zero gradient."""
    return {
        n.split(".")[0] for n, p in module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0
    }


# ---- SimMIM ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fill", ["zero", "mean"])
def test_masked_voxels_cannot_reach_the_output(backbone: SwinBackbone, fill: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 64, 64, 64, generator=g)
    view = simmim_view(x, cell_size=16, ratio=0.5, patch_size=2, fill=fill, generator=g)  # type: ignore[arg-type]
    x2 = x.clone()
    m = view.voxel_mask[:, None]
    x2[m] = torch.randn(int(m.sum()), generator=g) * 10  # new content in every masked cell
    tok = MaskToken(backbone.channels(0))
    with torch.no_grad():
        out1, _ = masked_forward(backbone, view.x_masked, view.token_mask, tok)
        out2, _ = masked_forward(backbone, fill_masked(x2, view.voxel_mask, fill), view.token_mask, tok)  # type: ignore[arg-type]
        assert torch.equal(out1, out2)  # exact: the whole output, masked cells included
        # Negative control: feeding the raw volume to encoder1 (the UNETR skip) leaks the content.
        hidden = masked_encode(backbone, view.x_masked, view.token_mask, tok)
        leak1 = decode_swinunetr(backbone.net, x, hidden)
        leak2 = decode_swinunetr(backbone.net, x2, hidden)
        assert not torch.allclose(leak1[m], leak2[m])


def test_h0_at_masked_tokens_is_the_normalised_mask_token(backbone: SwinBackbone) -> None:
    x = torch.rand(2, 1, 64, 64, 64)
    view = simmim_view(x, 16, 0.5, 2, generator=torch.Generator().manual_seed(1))
    tok = MaskToken(backbone.channels(0))
    with torch.no_grad():
        h0 = masked_encode(backbone, view.x_masked, view.token_mask, tok)[0]  # (B, C, 32, 32, 32)
    c = h0.shape[1]
    at_masked = h0.permute(0, 2, 3, 4, 1)[view.token_mask]  # (n_masked, C)
    want = F.layer_norm(tok.token.flatten(), [c])
    assert at_masked.shape[0] == view.token_mask.sum() and torch.allclose(
        at_masked, want.expand_as(at_masked), atol=1e-5
    )
    assert abs(MaskToken(4096).token.std().item() - 0.02) < 0.002  # SimMIM's init


def test_simmim_loss_trains_mask_token_and_whole_network(backbone: SwinBackbone) -> None:
    net = SwinBackbone(TINY, out_channels=1)
    tok = MaskToken(net.channels(0))
    x = torch.rand(1, 1, 64, 64, 64)
    view = simmim_view(x, 16, 0.5, 2, generator=torch.Generator().manual_seed(2))
    recon, _ = masked_forward(net, view.x_masked, view.token_mask, tok)
    masked_l1(recon, x, view.voxel_mask).backward()
    assert tok.token.grad is not None and tok.token.grad.abs().sum() > 0
    parts = _grads(net.net)
    assert {"swinViT", "encoder1", "encoder2", "encoder10", "decoder1", "decoder5", "out"} <= parts
    with pytest.raises(ValueError, match="token mask"):
        tok.blend(torch.zeros(1, 12, 4, 4, 4), torch.zeros(1, 2, 2, 2, dtype=torch.bool))


def test_simmim_light_head_upsamples_32x() -> None:
    head = SimMIMLightHead(192, scale=32)
    out = head(torch.randn(2, 192, 2, 2, 2))
    assert out.shape == (2, 1, 64, 64, 64)
    assert head.conv.out_channels == 32**3


# ---- Swin UNETR SSL ----------------------------------------------------------------------------
def test_swin_ssl_heads_read_tokens_0_and_1() -> None:
    torch.manual_seed(0)
    heads = SwinSSLHeads(192, 512, "code").eval()
    h4 = torch.randn(2, 192, 2, 2, 2)
    with torch.no_grad():
        rot, con, rec = heads(h4)
        assert rot.shape == (2, 4) and con.shape == (2, 512) and rec.shape == (2, 1, 64, 64, 64)
        other = h4.clone()
        other[:, :, 1, 1, 1] += 5.0  # token 7: neither head reads it
        r2, c2, _ = heads(other)
        assert torch.equal(r2, rot) and torch.equal(c2, con)
        t0 = h4.clone()
        t0[:, :, 0, 0, 0] += 5.0  # token 0: rotation only
        r3, c3, _ = heads(t0)
        assert not torch.equal(r3, rot) and torch.equal(c3, con)
        t1 = h4.clone()
        t1[:, :, 0, 0, 1] += 5.0  # token 1 (axis 2 fastest): contrastive only
        r4, c4, _ = heads(t1)
        assert torch.equal(r4, rot) and not torch.equal(c4, con)
        pooled = SwinSSLHeads(192, 16, "pooled_mlp").eval()
        r5, c5, _ = pooled(h4)
        assert r5.shape == (2, 4) and c5.shape == (2, 16)
    with pytest.raises(ValueError, match="tokens 0 and 1"):
        heads(torch.randn(1, 192, 1, 1, 1))


def test_swin_ssl_gradients_reach_swinvit_and_heads_only() -> None:
    torch.manual_seed(0)
    net = SwinBackbone(TINY, out_channels=1)
    heads = SwinSSLHeads(net.channels(4), 32)
    x = torch.rand(2, 1, 64, 64, 64)
    rot, con, rec = heads(net.encode(x, 4)[4])
    (F.cross_entropy(rot, torch.tensor([0, 3])) + con.pow(2).mean() + (rec - x).abs().mean()).backward()
    assert _grads(net.net) == {"swinViT"}  # the UNETR conv blocks and decoder stay untrained
    assert _grads(heads) == {"rotation_head", "contrastive_head", "inpainting_head"}


# ---- VoCo --------------------------------------------------------------------------------------
def test_voco_features_and_gradient_routing() -> None:
    torch.manual_seed(0)
    net = SwinBackbone(TINY, out_channels=1)
    x = torch.rand(3, 1, 64, 64, 64)
    hidden = net.encode(x, 4)
    f = voco_features(net.net, x, hidden)
    assert f.shape == (3, voco_feature_dim(12)) == (3, 24 * 12)
    assert voco_features(net.net, x, hidden, "last_stage").shape == (3, 16 * 12)
    proj = VoCoProjector(f.shape[1], 64, 32)
    z = proj(f)
    assert z.shape == (3, 32)
    z.pow(2).sum().backward()
    assert _grads(net.net) == {"swinViT", "encoder1", "encoder2", "encoder3", "encoder4", "encoder10"}


def test_voco_projector_uses_batch_statistics_and_holds_no_buffer() -> None:
    proj = VoCoProjector(8, 16, 4)
    assert list(proj.buffers()) == []
    bns = [m for m in proj if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(bns) == 2 and all(not bn.affine for bn in bns)
    a = torch.randn(4, 8)
    # the output of a row depends on the other rows of the batch (BatchNorm), in eval mode too
    out1 = proj.eval()(a)[0]
    b = a.clone()
    b[1:] += 3.0
    assert not torch.allclose(proj(b)[0], out1)
