"""Loss terms of SimMIM, Swin UNETR SSL and VoCo on hand-made inputs against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
from monai.losses import ContrastiveLoss

from asa3d.methods.simmim_losses import masked_l1, visible_l1
from asa3d.methods.swinssl_losses import inpainting_loss, nt_xent, rotation_loss
from asa3d.methods.voco_losses import base_regularization_loss, prediction_loss, symmetric_logits, voco_logits


# ---- SimMIM ------------------------------------------------------------------------------------
def test_masked_l1_by_hand_and_ignores_visible_voxels() -> None:
    target = torch.zeros(1, 1, 2, 1, 1)
    pred = torch.tensor([3.0, 100.0]).view(1, 1, 2, 1, 1)
    mask = torch.tensor([True, False]).view(1, 2, 1, 1)
    assert masked_l1(pred, target, mask).item() == pytest.approx(3.0 / (1 + 1e-5))
    pred2 = pred.clone()
    pred2[0, 0, 1] = -7.0  # a visible voxel: the loss does not move
    assert masked_l1(pred2, target, mask).item() == masked_l1(pred, target, mask).item()
    assert visible_l1(pred, target, mask).item() == pytest.approx(100.0 / (1 + 1e-5), rel=1e-6)
    # two channels: divided by C as SimMIM (the mask counts voxels, not channel entries)
    p2 = torch.ones(1, 2, 2, 1, 1)
    assert masked_l1(p2, torch.zeros_like(p2), mask).item() == pytest.approx(2.0 / (1 + 1e-5) / 2)
    p = pred.clone().requires_grad_(True)
    masked_l1(p, target, mask).backward()
    assert p.grad[0, 0, 1].item() == 0.0 and p.grad[0, 0, 0].item() != 0.0  # type: ignore[index]


# ---- Swin UNETR SSL ----------------------------------------------------------------------------
def test_rotation_and_inpainting_by_hand() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0]])
    want = -math.log(math.exp(2) / (math.exp(2) + 3))
    assert rotation_loss(logits, torch.tensor([0])).item() == pytest.approx(want, rel=1e-6)
    recon = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 4, 1, 1)
    target = torch.zeros_like(recon)
    assert inpainting_loss(recon, target).item() == pytest.approx(2.5)
    m = torch.tensor([False, True, True, False]).view(1, 4, 1, 1)
    assert inpainting_loss(recon, target, m, "cutout").item() == pytest.approx(2.5)
    m = torch.tensor([False, False, False, True]).view(1, 4, 1, 1)
    assert inpainting_loss(recon, target, m, "cutout").item() == pytest.approx(4.0)


def test_nt_xent_by_hand_for_one_pair() -> None:
    # n = 1: the only candidate besides itself is the positive -> loss 0 whatever the vectors.
    assert nt_xent(torch.randn(1, 3), torch.randn(1, 3)).item() == pytest.approx(0.0, abs=1e-6)
    # n = 2, orthogonal axes: z1 = [e0, e1], z2 = [e0, e2] in R^3, tau = 0.5.
    z1 = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    z2 = torch.tensor([[1.0, 0, 0], [0, 0, 1.0]])
    e = math.exp
    # anchor z1[0]=e0: pos z2[0] (cos 1), negatives z1[1] (0), z2[1] (0)
    l0 = -math.log(e(2) / (e(2) + 2))
    # anchor z1[1]=e1: pos z2[1] (0), negatives z1[0] (0), z2[0] (0)
    l1 = -math.log(1 / 3)
    want = (2 * l0 + 2 * l1) / 4  # the two z2 anchors mirror the z1 ones
    assert nt_xent(z1, z2, 0.5).item() == pytest.approx(want, rel=1e-6)


def test_nt_xent_equals_monai_contrastive_loss() -> None:
    torch.manual_seed(0)
    z1, z2 = torch.randn(6, 16), torch.randn(6, 16)
    ours = nt_xent(z1, z2, 0.5)
    ref = ContrastiveLoss(temperature=0.5)(z1, z2)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)


def test_nt_xent_gathered_slices_average_to_the_global_loss() -> None:
    torch.manual_seed(1)
    z1, z2 = torch.randn(8, 5), torch.randn(8, 5)
    whole = nt_xent(z1, z2)
    per_rank = [
        nt_xent(z1[r * 4 : r * 4 + 4], z2[r * 4 : r * 4 + 4], 0.5, z1, z2, offset=r * 4) for r in (0, 1)
    ]
    assert (sum(per_rank) / 2).item() == pytest.approx(whole.item(), rel=1e-5)
    assert not math.isclose(nt_xent(z1[:4], z2[:4]).item(), per_rank[0].item())  # more negatives
    # the gradient reaches the local rows even when the gathered copies are detached
    loc = z1[4:].clone().requires_grad_(True)
    nt_xent(loc, z2[4:], 0.5, z1.detach(), z2.detach(), offset=4).backward()
    assert loc.grad is not None and loc.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="exceeds"):
        nt_xent(z1[:4], z2[:4], 0.5, z1, z2, offset=6)


# ---- VoCo --------------------------------------------------------------------------------------
def test_voco_logits_are_relu_cosines() -> None:
    crops = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    bases = torch.tensor([[[2.0, 0.0], [-1.0, 0.0]]])
    p = voco_logits(crops, bases)
    assert torch.allclose(p, torch.tensor([[[1.0, 0.0], [1 / math.sqrt(2), 0.0]]]))
    assert (p >= 0).all() and (p <= 1).all()


def test_voco_prediction_loss_by_hand() -> None:
    p = torch.tensor([[[0.5, 0.2, 0.0, 0.0], [1.0, 0.0, 0.3, 0.1]]])
    y = torch.tensor([[[0.75, 0.25, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]])
    pos, neg = prediction_loss(p, y)
    want_pos = (
        -(0.75 * math.log(1 - 0.25 + 1e-6) + 0.25 * math.log(1 - 0.05 + 1e-6) + 1.0 * math.log(1 + 1e-6))
        / 2.0
    )
    want_neg = (0.0 + 0.0 + 0.0 + 0.3**2 + 0.1**2) / 5
    assert pos.item() == pytest.approx(want_pos, rel=1e-5)
    assert neg.item() == pytest.approx(want_neg, rel=1e-5)
    # perfect logits give (almost) zero loss
    pos0, neg0 = prediction_loss(y, y)
    assert pos0.item() == pytest.approx(0.0, abs=1e-5) and neg0.item() == 0.0


def test_voco_regularisation_zero_for_orthogonal_one_for_identical() -> None:
    eye = torch.eye(16)[None]  # 16 orthogonal bases: 120 pairs, all cos 0
    assert base_regularization_loss(eye).item() == 0.0
    same = torch.ones(2, 16, 4)
    assert base_regularization_loss(same).item() == pytest.approx(1.0, rel=1e-6)
    # by hand with 3 bases: cos(b0,b1) = 1/sqrt2, cos(b0,b2) = -1 (ReLU -> 0), cos(b1,b2) = -1/sqrt2
    b = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]]])
    assert base_regularization_loss(b).item() == pytest.approx((0.5 + 0 + 0) / 3, rel=1e-6)
    # the gradient is stopped on the second base of each pair: the last base gets none
    g = b.clone().requires_grad_(True)
    base_regularization_loss(g[:, :2]).backward()
    assert g.grad[0, 1].abs().sum().item() == 0.0 and g.grad[0, 0].abs().sum().item() > 0  # type: ignore[index]


def test_voco_symmetric_logits_stop_the_teacher() -> None:
    torch.manual_seed(0)
    sc, sb = torch.randn(1, 2, 4, requires_grad=True), torch.randn(1, 3, 4, requires_grad=True)
    tc, tb = torch.randn(1, 2, 4, requires_grad=True), torch.randn(1, 3, 4, requires_grad=True)
    p = symmetric_logits(sc, tc, sb, tb)
    assert torch.allclose(p, 0.5 * (voco_logits(sc, tb) + voco_logits(tc, sb)))
    p.sum().backward()
    assert tc.grad is None and tb.grad is None and sc.grad is not None and sb.grad is not None


def _gather_worker(rank: int, init: str, z1: torch.Tensor, z2: torch.Tensor, out: str) -> None:
    import torch.distributed as dist

    from asa3d.methods.dist_context import DistContext

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        n = z1.shape[0] // 2
        loc1, loc2 = z1[rank * n : (rank + 1) * n], z2[rank * n : (rank + 1) * n]
        ctx = DistContext(rank, 2)  # what the engine hands Swin UNETR SSL as ``self.dist``
        a1, a2, off = ctx.all_gather(loc1), ctx.all_gather(loc2), rank * n
        loss = nt_xent(loc1, loc2, 0.5, a1, a2, off)
        torch.save({"loss": loss, "offset": off}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_nt_xent_gathered_over_two_gloo_ranks_equals_one_process(tmp_path) -> None:  # noqa: ANN001
    import torch.multiprocessing as mp

    torch.manual_seed(2)
    z1, z2 = torch.randn(6, 8), torch.randn(6, 8)
    out = str(tmp_path / "res")
    mp.spawn(_gather_worker, args=(f"file://{tmp_path / 'store'}", z1, z2, out), nprocs=2, join=True)
    res = [torch.load(f"{out}.{r}", weights_only=True) for r in (0, 1)]
    assert [r["offset"] for r in res] == [0, 3]
    mean = (res[0]["loss"] + res[1]["loss"]) / 2
    assert mean.item() == pytest.approx(nt_xent(z1, z2, 0.5).item(), rel=1e-5)
