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
