"""Swin UNETR SSL and VoCo loss terms on tiny hand-built tensors: exact values against hand
computations and an independent per-anchor loop, fp32 arithmetic for low-precision inputs, where
the gradient goes, and every refused input by its message."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from asa3d.methods.swinssl_losses import inpainting_loss, nt_xent, rotation_loss
from asa3d.methods.voco_losses import base_regularization_loss, prediction_loss, symmetric_logits, voco_logits


# ---- Swin UNETR SSL ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_rotation_loss_is_fp32_cross_entropy_of_long_labels(dtype: torch.dtype) -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    want = (-math.log(math.e**2 / (math.e**2 + 3)) - math.log(math.e / (math.e + 3))) / 2
    got = rotation_loss(logits.to(dtype), torch.tensor([0, 2], dtype=torch.int32))
    assert got.dtype == torch.float32 and got.item() == pytest.approx(want, rel=1e-6)


def test_inpainting_loss_over_every_voxel_or_the_cut_out_ones() -> None:
    recon = torch.tensor([[1.0, -2.0], [3.0, 0.5]]).view(1, 2, 2, 1, 1)  # (B, C=2, X=2, 1, 1)
    target = torch.tensor([[0.0, 0.0], [1.0, 0.0]]).view(1, 2, 2, 1, 1)
    got = inpainting_loss(recon.bfloat16(), target.bfloat16())
    assert got.dtype == torch.float32 and got.item() == pytest.approx((1 + 2 + 2 + 0.5) / 4)
    # cut-out: the mask (B, X, Y, Z) covers the first voxel, in both channels
    mask = torch.tensor([True, False]).view(1, 2, 1, 1)
    for r, t in ((recon.double(), target), (recon, target.double())):  # fp32 whichever is fp64
        assert inpainting_loss(r, t).dtype == inpainting_loss(r, t, mask, "cutout").dtype == torch.float32
    assert inpainting_loss(recon, target, mask, "cutout").item() == pytest.approx((1 + 2) / 2)
    # nothing cut: 0, and still a (zero) gradient
    r = recon.clone().requires_grad_(True)
    none = inpainting_loss(r, target, torch.zeros(1, 2, 1, 1, dtype=torch.bool), "cutout")
    assert none.item() == 0.0
    none.backward()
    assert r.grad is not None and r.grad.abs().sum().item() == 0.0
    # a gradient only on the cut-out voxel: sign(recon - target) / count
    r.grad = None
    inpainting_loss(r, target, mask, "cutout").backward()
    torch.testing.assert_close(r.grad.view(2, 2), torch.tensor([[0.5, 0.0], [0.5, 0.0]]))  # type: ignore[union-attr]


def test_inpainting_loss_refuses_bad_input() -> None:
    x = torch.zeros(1, 1, 2, 2, 2)
    with pytest.raises(
        ValueError, match=r"^reconstruction \(1, 1, 2, 2, 2\) and target \(1, 1, 2, 2, 1\) differ$"
    ):
        inpainting_loss(x, torch.zeros(1, 1, 2, 2, 1))
    with pytest.raises(ValueError, match="^inpainting region 'masked': use 'all' or 'cutout'$"):
        inpainting_loss(x, x, torch.ones(1, 2, 2, 2, dtype=torch.bool), "masked")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="^inpainting region 'cutout' needs the cut-out mask$"):
        inpainting_loss(x, x, None, "cutout")


def _nt_xent_loop(z1: torch.Tensor, z2: torch.Tensor, tau: float, all1=None, all2=None, off: int = 0):  # noqa: ANN001, ANN202
    """Independent reference: per anchor, -log softmax of its positive among every candidate row
    of both (gathered) views except itself; the local rows replace the gathered ones."""
    n = z1.shape[0]
    c1 = (z1 if all1 is None else all1).clone().double()
    c2 = (z2 if all2 is None else all2).clone().double()
    c1[off : off + n], c2[off : off + n] = z1.double(), z2.double()
    cands = F.normalize(torch.cat([c1, c2]), dim=1)
    big = c1.shape[0]
    losses = []
    for view in (0, 1):
        for i in range(n):
            me = view * big + off + i
            pos = (1 - view) * big + off + i
            sims = cands @ cands[me] / tau
            others = [j for j in range(2 * big) if j != me]
            losses.append(-(sims[pos] - torch.logsumexp(sims[others], 0)))
    return torch.stack(losses).mean()


def test_nt_xent_matches_a_per_anchor_loop_locally_and_gathered() -> None:
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    assert nt_xent(z1, z2).item() == pytest.approx(_nt_xent_loop(z1, z2, 0.5).item(), rel=1e-5)
    assert nt_xent(z1, z2, 0.2).item() == pytest.approx(_nt_xent_loop(z1, z2, 0.2).item(), rel=1e-5)
    # gathered: 7 rows, this rank's 3 at offset 2; the gathered copies of them are stale (garbage):
    # the local embeddings take their place
    all1, all2 = torch.randn(7, 4, generator=g), torch.randn(7, 4, generator=g)
    got = nt_xent(z1, z2, 0.3, all1, all2, offset=2)
    want = _nt_xent_loop(z1, z2, 0.3, all1, all2, 2)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    first = _nt_xent_loop(z1, z2, 0.3, all1, all2, 0).item()
    assert nt_xent(z1, z2, 0.3, all1, all2).item() == pytest.approx(first, rel=1e-5)  # offset 0 by default
    for off in (0, 4):  # the first and the last possible place
        assert nt_xent(z1, z2, 0.3, all1, all2, off).item() == pytest.approx(
            _nt_xent_loop(z1, z2, 0.3, all1, all2, off).item(), rel=1e-5
        )
    # the gathered copies of the local rows never matter
    fresh1, fresh2 = all1.clone(), all2.clone()
    fresh1[2:5], fresh2[2:5] = z1, z2
    assert got.item() == pytest.approx(nt_xent(z1, z2, 0.3, fresh1, fresh2, 2).item(), rel=1e-6)


def test_nt_xent_normalises_in_fp32() -> None:
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    all1, all2 = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    h1, h2, ha1, ha2 = (t.bfloat16() for t in (z1, z2, all1, all2))
    ref = _nt_xent_loop(h1.float(), h2.float(), 0.5)
    assert nt_xent(h1, h2).item() == pytest.approx(ref.item(), rel=1e-6)
    ref = _nt_xent_loop(z1, z2, 0.5, ha1.float(), ha2.float(), 1)
    assert nt_xent(z1, z2, 0.5, ha1, ha2, 1).item() == pytest.approx(ref.item(), rel=1e-6)
    for args in (
        (z1.double(), z2),
        (z1, z2.double()),
        (z1, z2, 0.5, all1.double(), all2, 1),
        (z1, z2, 0.5, all1, all2.double(), 1),
    ):
        assert nt_xent(*args).dtype == torch.float32  # type: ignore[arg-type]


def test_nt_xent_refuses_bad_input() -> None:
    z = torch.randn(2, 4)
    with pytest.raises(
        ValueError, match=r"^views must be paired \(n, D\) embeddings, got \(2, 4\) and \(3, 4\)$"
    ):
        nt_xent(z, torch.randn(3, 4))
    with pytest.raises(ValueError, match="views must be paired"):
        nt_xent(torch.randn(4), torch.randn(4))
    with pytest.raises(ValueError, match=r"^temperature must be > 0, got 0\.0$"):
        nt_xent(z, z, 0.0)
    with pytest.raises(ValueError, match="^give both z1_all and z2_all, or neither$"):
        nt_xent(z, z, 0.5, z1_all=torch.randn(4, 4))
    with pytest.raises(ValueError, match="^give both z1_all and z2_all, or neither$"):
        nt_xent(z, z, 0.5, z2_all=torch.randn(4, 4))
    with pytest.raises(ValueError, match=r"^gathered views \(4, 4\) do not match local \(2, 4\)$"):
        nt_xent(z, z, 0.5, torch.randn(4, 4), torch.randn(6, 4))
    with pytest.raises(ValueError, match=r"^gathered views \(4, 5\) do not match local \(2, 4\)$"):
        nt_xent(z, z, 0.5, torch.randn(4, 5), torch.randn(4, 5))
    with pytest.raises(ValueError, match="^offset -1 \\+ 2 local rows exceeds the 4 gathered rows$"):
        nt_xent(z[:, :3], z[:, :3], 0.5, torch.randn(4, 3), torch.randn(4, 3), offset=-1)
    with pytest.raises(ValueError, match="^offset 3 \\+ 2 local rows exceeds the 4 gathered rows$"):
        nt_xent(z[:, :3], z[:, :3], 0.5, torch.randn(4, 3), torch.randn(4, 3), offset=3)


# ---- VoCo --------------------------------------------------------------------------------------
def test_voco_logits_per_volume_in_fp32() -> None:
    crops = torch.tensor([[[1.0, 0.0], [0.0, 3.0]], [[1.0, 1.0], [-1.0, 0.0]]])  # (B=2, sw=2, D=2)
    bases = torch.tensor([[[4.0, 0.0], [0.0, 0.5], [-1.0, -1.0]], [[0.0, 2.0], [3.0, 0.0], [1.0, 1.0]]])
    r = 1 / math.sqrt(2)
    want = torch.tensor(
        [[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [[r, r, 1.0], [0.0, 0.0, 0.0]]]
    )  # volume 1's second crop points away from every base: all ReLU'd to 0
    got = voco_logits(crops.bfloat16(), bases.bfloat16())
    assert got.dtype == torch.float32
    assert (
        voco_logits(crops.double(), bases).dtype == voco_logits(crops, bases.double()).dtype == torch.float32
    )
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    sym = symmetric_logits(crops, 2 * crops, bases, bases.flip(1))
    torch.testing.assert_close(sym, 0.5 * (voco_logits(crops, bases.flip(1)) + voco_logits(crops, bases)))


@pytest.mark.parametrize("shapes", [((1, 4), (1, 3, 4)), ((1, 2, 4), (1, 4)), ((1, 2, 4), (2, 3, 4))])
def test_voco_logits_refuse_bad_shapes(shapes: tuple[tuple[int, ...], tuple[int, ...]]) -> None:
    with pytest.raises(ValueError, match=r"expected \(B, sw, D\) and \(B, K, D\)"):
        voco_logits(torch.ones(shapes[0]), torch.ones(shapes[1]))


def test_voco_prediction_loss_means_over_volumes() -> None:
    # volume 0: one untouched base (p 0.5); volume 1: every base touched (L_neg 0)
    p = torch.tensor([[[0.6, 0.5]], [[0.2, 0.9]]])
    y = torch.tensor([[[1.0, 0.0]], [[0.5, 0.5]]], dtype=torch.float64)
    pos, neg = prediction_loss(p.bfloat16(), y)
    pb = p.bfloat16().float()  # the logits as given, then fp32 arithmetic
    v0 = -math.log(1 - (1 - pb[0, 0, 0].item()) + 1e-6)
    v1 = -(
        0.5 * math.log(1 - abs(0.5 - pb[1, 0, 0].item()) + 1e-6)
        + 0.5 * math.log(1 - abs(0.5 - pb[1, 0, 1].item()) + 1e-6)
    )
    assert pos.dtype == torch.float32 and neg.dtype == torch.float32
    assert pos.item() == pytest.approx((v0 + v1) / 2, rel=1e-5)
    assert neg.item() == pytest.approx((pb[0, 0, 1].item() ** 2 / 1 + 0.0) / 2, rel=1e-6)
    # L_neg counts the untouched bases per volume: 2 in volume 0, 1 in volume 1
    p2 = torch.tensor([[[0.6, 0.5], [0.3, 0.1]], [[0.2, 0.4], [0.7, 0.0]]])
    y2 = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [0.5, 0.5]]])
    assert prediction_loss(p2, y2)[1].item() == pytest.approx(((0.25 + 0.01) / 2 + 0.16 / 1) / 2, rel=1e-6)
    # no label at all: L_pos 0 (not 0/0), every logit a negative
    pos0, neg0 = prediction_loss(torch.full((1, 1, 2), 0.5), torch.zeros(1, 1, 2))
    assert pos0.item() == 0.0 and neg0.item() == pytest.approx(0.25)
    assert all(t.dtype == torch.float32 for t in prediction_loss(p.double(), y.float()))
    with pytest.raises(ValueError, match=r"^logits \(1, 1, 2\) and labels \(1, 2, 1\) differ$"):
        prediction_loss(torch.zeros(1, 1, 2), torch.zeros(1, 2, 1))


def test_voco_regularisation_means_over_volumes_and_pairs() -> None:
    r = 1 / math.sqrt(2)
    b = torch.tensor(
        [
            [[1.0, 0.0], [2.0, 2.0], [0.0, 1.0]],  # cos 01 = r, 02 = 0, 12 = r: (0.5 + 0 + 0.5) / 3
            [[1.0, 0.0], [3.0, 0.0], [-1.0, 0.0]],  # cos 01 = 1, 02 = -1 -> 0, 12 = -1 -> 0: 1/3
            [[1.0, 0.0], [3.0, 0.0], [1.0, 1.0]],  # cos 01 = 1, 02 = r, 12 = r: (1 + 0.5 + 0.5) / 3
        ]
    )
    got = base_regularization_loss(b.bfloat16())
    assert got.dtype == torch.float32 and base_regularization_loss(b.double()).dtype == torch.float32
    assert got.item() == pytest.approx(((2 * r * r) / 3 + 1 / 3 + (1 + 2 * r * r) / 3) / 3, rel=1e-6)
    for bad in (torch.ones(2, 4), torch.ones(1, 1, 4)):
        with pytest.raises(ValueError, match=r"need \(B, K >= 2, D\) base embeddings"):
            base_regularization_loss(bad)


def test_losses_stay_on_the_device_of_their_inputs() -> None:
    """The meta device stands in for an accelerator: an index or mask made on the CPU fails there."""
    meta = torch.device("meta")
    z = torch.empty(2, 4, device=meta)
    assert nt_xent(z, z).device == meta
    assert (
        nt_xent(z, z, 0.5, torch.empty(5, 4, device=meta), torch.empty(5, 4, device=meta), 1).device == meta
    )
    b = torch.empty(1, 3, 4, device=meta)
    assert base_regularization_loss(b).device == meta
    logits = voco_logits(torch.empty(1, 2, 4, device=meta), b)
    assert logits.device == meta and all(t.device == meta for t in prediction_loss(logits, logits))
    x = torch.empty(1, 1, 2, 2, 2, device=meta)
    assert (
        inpainting_loss(x, x, torch.empty(1, 2, 2, 2, dtype=torch.bool, device=meta), "cutout").device == meta
    )
