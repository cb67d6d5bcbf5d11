"""Adam's pruned InfoNCE: hand computation, pruning rule, equivalence to a per-sample loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from asa3d.methods.adam_losses import pruned_infonce


def _unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_negative_above_gamma_leaves_the_denominator() -> None:
    q = torch.tensor([_unit(0)])
    k = torch.tensor([_unit(10)])  # positive, cos 0.985 >= gamma: kept all the same
    queue = torch.tensor([_unit(20), _unit(90), _unit(180)])  # cos 0.9397, 0, -1
    tau, gamma = 0.2, 0.8
    out = pruned_infonce(q, k, queue, tau=tau, gamma=gamma)
    assert out.keep.tolist() == [[False, True, True]]
    assert out.pruned_fraction.item() == pytest.approx(1 / 3)
    cpos, kept = math.cos(math.radians(10)), [0.0, -1.0]
    hand = -math.log(math.exp(cpos / tau) / (math.exp(cpos / tau) + sum(math.exp(c / tau) for c in kept)))
    assert out.loss.item() == pytest.approx(hand, rel=1e-5)  # fp32 round-off
    # without pruning the near-duplicate stays a negative and the loss is larger
    full = pruned_infonce(q, k, queue, tau=tau, gamma=None)
    hand_full = -math.log(
        math.exp(cpos / tau)
        / (math.exp(cpos / tau) + sum(math.exp(c / tau) for c in [math.cos(math.radians(20)), *kept]))
    )
    assert full.loss.item() == pytest.approx(hand_full, rel=1e-5)
    assert full.pruned_fraction.item() == 0.0 and full.loss > out.loss


def test_everything_pruned_leaves_the_positive_alone() -> None:
    q = torch.tensor([_unit(0)])
    out = pruned_infonce(q, torch.tensor([_unit(80)]), torch.tensor([_unit(1), _unit(2)]), gamma=0.8)
    assert out.loss.item() == pytest.approx(0.0, abs=1e-6)  # log(e^x / e^x)


def test_vectorised_matches_a_per_sample_loop_and_gradients() -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(6, 8, generator=g, requires_grad=True)
    k = torch.randn(6, 8, generator=g)
    queue = torch.randn(40, 8, generator=g)
    queue[:5] = q.detach()[:5] + 0.05 * torch.randn(5, 8, generator=g)  # near-duplicates: pruned
    qids, kids = torch.arange(6), torch.full((40,), -1)
    kids[10:13] = torch.tensor([2, 2, 4])
    out = pruned_infonce(q, k, queue, tau=0.2, gamma=0.8, query_ids=qids, key_ids=kids)
    losses = []
    for i in range(6):
        qi, ki = F.normalize(q[i], dim=0), F.normalize(k[i], dim=0)
        terms = [torch.exp(qi @ ki / 0.2)]
        for j in range(40):
            kj = F.normalize(queue[j], dim=0)
            if qi @ kj < 0.8 and kids[j] != i:
                terms.append(torch.exp(qi @ kj / 0.2))
        losses.append(-torch.log(terms[0] / torch.stack(terms).sum()))
    loop = torch.stack(losses).mean()
    assert out.loss.item() == pytest.approx(loop.item(), rel=1e-5)
    assert not out.keep[2, 10] and not out.keep[2, 11] and not out.keep[4, 12] and out.keep[3, 10]
    assert (~out.keep[torch.arange(5), torch.arange(5)]).all()  # each query's near-duplicate pruned
    (g1,) = torch.autograd.grad(out.loss, q)
    (g2,) = torch.autograd.grad(loop, q)
    assert torch.allclose(g1, g2, atol=1e-5)


def test_keys_get_no_gradient_and_bad_shapes_are_refused() -> None:
    q = torch.randn(2, 4, requires_grad=True)
    k = torch.randn(2, 4, requires_grad=True)
    pruned_infonce(q, k, torch.randn(5, 4)).loss.backward()
    assert q.grad is not None and k.grad is None
    with pytest.raises(ValueError, match="expected"):
        pruned_infonce(q, k, torch.randn(5, 3))
    with pytest.raises(ValueError, match="tau"):
        pruned_infonce(q, k, torch.randn(5, 4), tau=0)
