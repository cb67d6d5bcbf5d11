"""ASA loss terms on known inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from asa3d.methods.asa_losses import (
    appearance_loss,
    consistency_loss,
    order_loss_1d,
    order_loss_1d_ce,
    order_loss_3d,
)


def test_sum_form_equals_mean_form_times_dim() -> None:
    torch.manual_seed(0)
    for d, norm in [(8192, True), (512, True), (512, False), (7, True)]:
        s, t = torch.randn(5, d), torch.randn(5, d)
        ls = consistency_loss(s, t, norm, "sum")
        lm = consistency_loss(s, t, norm, "mean")
        assert ls.item() == pytest.approx(lm.item() * d, rel=1e-5)


def test_normalised_sum_is_two_minus_two_cos() -> None:
    s, t = torch.randn(4, 32), torch.randn(4, 32)
    expected = (2 - 2 * F.cosine_similarity(s, t, dim=-1)).mean()
    assert consistency_loss(s, t).item() == pytest.approx(expected.item(), rel=1e-5)
    assert consistency_loss(s, 3 * s).item() == pytest.approx(0.0, abs=1e-6)  # scale invariant
    assert consistency_loss(s, -s).item() == pytest.approx(4.0, rel=1e-6)


def test_consistency_stops_teacher_gradient_and_handles_empty() -> None:
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 4, requires_grad=True)
    consistency_loss(s, t).backward()
    assert s.grad is not None and t.grad is None
    e = torch.zeros(0, 4, requires_grad=True)
    out = consistency_loss(e, torch.zeros(0, 4))
    out.backward()
    assert out.item() == 0.0


def test_order_and_appearance_losses() -> None:
    pred = torch.zeros(2, 8, 3)
    tgt = torch.full((2, 8, 3), 2.0)
    assert order_loss_3d(pred, tgt).item() == pytest.approx(4.0)
    assert order_loss_1d(torch.ones(2, 8, 1), torch.zeros(2, 8)).item() == pytest.approx(1.0)
    n = 8
    logits = torch.zeros(2, n, n)
    assert order_loss_1d_ce(logits, torch.arange(n).repeat(2, 1)).item() == pytest.approx(math.log(n))
    x = torch.rand(1, 1, 4, 4, 4)
    assert appearance_loss(x + 0.5, x).item() == pytest.approx(0.25)


# ---- exact values on hand-built tensors (each pins one argument of each term) ------------------
def test_order_loss_1d_squeezes_only_a_trailing_singleton() -> None:
    target = torch.tensor([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])
    pred = torch.tensor([[1.0, 1.0, 4.0], [3.0, 6.0, 5.0]])  # squared errors 1, 0, 4, 0, 4, 0
    assert order_loss_1d(pred[..., None], target).item() == pytest.approx(9.0 / 6.0)
    assert order_loss_1d(pred, target).item() == pytest.approx(9.0 / 6.0)  # (B, N) as it is
    # fp16 inputs are compared in fp32 (no rounding of the difference)
    half = order_loss_1d(pred.half()[..., None], target.half())
    assert half.dtype == torch.float32 and half.item() == pytest.approx(1.5)


def test_order_loss_3d_is_the_element_mean_in_fp32() -> None:
    pred = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]], dtype=torch.bfloat16)
    tgt = torch.zeros(1, 2, 3, dtype=torch.bfloat16)
    out = order_loss_3d(pred, tgt)
    assert out.dtype == torch.float32 and out.item() == pytest.approx(5.0 / 6.0)


def test_order_loss_1d_ce_by_hand() -> None:
    # B=2, N=2: row (b, i) has logits over the N source positions; perm[b, i] is the class
    logits = torch.tensor([[[2.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [3.0, -1.0]]])
    perm = torch.tensor([[0, 1], [1, 0]])

    def ce(row: list[float], k: int) -> float:
        return -row[k] + math.log(sum(math.exp(v) for v in row))

    want = (ce([2, 0], 0) + ce([0, 0], 1) + ce([0, 1], 1) + ce([3, -1], 0)) / 4
    out = order_loss_1d_ce(logits.half(), perm)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(want, rel=1e-3)
    assert order_loss_1d_ce(logits, perm).item() == pytest.approx(want, rel=1e-6)


def test_appearance_loss_in_fp32() -> None:
    recon = torch.tensor([1.0, 3.0], dtype=torch.bfloat16).view(1, 1, 2, 1, 1)
    out = appearance_loss(recon, torch.zeros(1, 1, 2, 1, 1, dtype=torch.bfloat16))
    assert out.dtype == torch.float32 and out.item() == pytest.approx(5.0)


def test_consistency_by_hand_normalised_and_raw() -> None:
    s = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0]])
    t = torch.tensor([[0.0, 5.0, 0.0], [0.0, 0.0, -1.0]])
    # normalised rows: (0.6, 0.8, 0) vs (0, 1, 0): 0.36 + 0.04 = 0.4; (0,0,1) vs (0,0,-1): 4
    assert consistency_loss(s, t, True, "sum").item() == pytest.approx((0.4 + 4.0) / 2, rel=1e-6)
    assert consistency_loss(s, t, True, "mean").item() == pytest.approx((0.4 + 4.0) / 6, rel=1e-6)
    # raw rows: 9 + 1 = 10 and 9
    assert consistency_loss(s, t, False, "sum").item() == pytest.approx(19.0 / 2)
    assert consistency_loss(s, t, False, "mean").item() == pytest.approx(19.0 / 6)
    assert consistency_loss(s, t).item() == pytest.approx(2.2, rel=1e-6)  # default: normalised, sum
    # normalised along the embedding (last) axis only: a (1, 1) pair is +1 vs -1
    assert consistency_loss(torch.tensor([[2.0]]), torch.tensor([[-0.5]])).item() == pytest.approx(4.0)
    # batched (..., D) with a leading axis: rows pair up element by element
    s3, t3 = s[None].repeat(2, 1, 1), t[None].repeat(2, 1, 1)
    assert consistency_loss(s3, t3).item() == pytest.approx(2.2, rel=1e-6)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    for red in ("sum", "mean"):  # each of student and teacher normalised per row, never across rows
        flat = consistency_loss(a.reshape(6, 4), b.reshape(6, 4), True, red)
        assert consistency_loss(a, b, True, red).item() == pytest.approx(flat.item(), rel=1e-6)
    half = consistency_loss(s.half(), t.half(), False, "sum")
    assert half.dtype == torch.float32 and half.item() == pytest.approx(9.5)


def test_consistency_gradient_is_that_of_the_student_only() -> None:
    s = torch.tensor([[1.0, 2.0]], requires_grad=True)
    t = torch.tensor([[0.0, 0.0]], requires_grad=True)
    consistency_loss(s, t, False, "sum").backward()
    assert s.grad.tolist() == [[2.0, 4.0]] and t.grad is None


def test_consistency_of_no_rows_is_a_differentiable_zero() -> None:
    e = torch.zeros(0, 3, requires_grad=True)
    out = consistency_loss(e, torch.zeros(0, 3), False, "mean")
    assert out.item() == 0.0 and out.requires_grad
    out.backward()
    assert e.grad is not None and e.grad.shape == (0, 3)


def test_consistency_refusals_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"consistency: shapes differ \(2, 3\) vs \(2, 4\)"):
        consistency_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"reduction 'max': use 'sum' or 'mean'"):
        consistency_loss(torch.ones(2, 3), torch.ones(2, 3), True, "max")  # type: ignore[arg-type]
