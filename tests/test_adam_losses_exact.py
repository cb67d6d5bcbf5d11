"""Adam's pruned InfoNCE on hand-built unit vectors: the defaults (tau 0.2, gamma 0.8), the exact
pruning boundary, the same-source rule (id 0 matches, ids < 0 never do), what carries a gradient,
and every refused input by its message."""

from __future__ import annotations

import math

import pytest
import torch

from asa3d.methods.adam_losses import pruned_infonce


def _unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def _infonce(pos: float, negs: list[float], tau: float) -> float:
    e = [math.exp(c / tau) for c in [pos, *negs]]
    return -math.log(e[0] / sum(e))


def test_defaults_are_tau_0_2_and_gamma_0_8_on_two_queries() -> None:
    # unnormalised inputs (x3, x0.5): the cosines are what count
    q = 3.0 * torch.tensor([_unit(0), _unit(90)])
    k = 0.5 * torch.tensor([_unit(30), _unit(60)])
    queue = 2.0 * torch.tensor([_unit(10), _unit(100), _unit(180)])
    out = pruned_infonce(q, k, queue)
    c = [[math.cos(math.radians(a - b)) for b in (10, 100, 180)] for a in (0, 90)]
    # query 0: the key at 10 deg (cos 0.985 >= 0.8) is pruned; query 1: the key at 100 deg is
    keep = [[False, True, True], [True, False, True]]
    assert out.keep.tolist() == keep
    want = [
        _infonce(math.cos(math.radians(30)), [c[0][1], c[0][2]], 0.2),
        _infonce(math.cos(math.radians(30)), [c[1][0], c[1][2]], 0.2),
    ]
    assert out.loss.item() == pytest.approx(sum(want) / 2, rel=1e-5)
    assert out.pruned_fraction.item() == pytest.approx(2 / 6)
    assert not out.pruned_fraction.requires_grad and out.loss.dtype == torch.float32
    # another temperature, no pruning: every queue key in both denominators
    full = pruned_infonce(q, k, queue, tau=0.5, gamma=None)
    want = [_infonce(math.cos(math.radians(30)), c[i], 0.5) for i in range(2)]
    assert full.loss.item() == pytest.approx(sum(want) / 2, rel=1e-5)
    assert full.keep.all() and full.pruned_fraction.item() == 0.0


def test_a_key_exactly_at_gamma_is_pruned() -> None:
    """The rule is cos >= gamma: an orthogonal key (cos exactly 0) is pruned at gamma 0, kept at
    any gamma above."""
    q, k = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]])
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    at = pruned_infonce(q, k, queue, tau=1.0, gamma=0.0)
    assert at.keep.tolist() == [[False, True]]
    assert at.loss.item() == pytest.approx(_infonce(1.0, [-1.0], 1.0), rel=1e-6)
    above = pruned_infonce(q, k, queue, tau=1.0, gamma=1e-3)
    assert above.keep.tolist() == [[True, True]]
    assert above.loss.item() == pytest.approx(_infonce(1.0, [0.0, -1.0], 1.0), rel=1e-6)


def test_same_source_keys_leave_the_denominator_and_negative_ids_never_match() -> None:
    q = torch.tensor([_unit(0), _unit(0)])
    k = torch.tensor([_unit(0), _unit(0)])
    queue = torch.tensor([_unit(90), _unit(120), _unit(180), _unit(150)])
    qids = torch.tensor([0, -1])
    kids = torch.tensor([0, -1, 5, 0])  # key 0 and 3 come from query 0's source; -1 is "unknown"
    out = pruned_infonce(q, k, queue, tau=0.5, gamma=None, query_ids=qids, key_ids=kids)
    assert out.keep.tolist() == [[False, True, True, False], [True, True, True, True]]
    cos = [math.cos(math.radians(a)) for a in (90, 120, 180, 150)]
    want0 = _infonce(1.0, [cos[1], cos[2]], 0.5)
    want1 = _infonce(1.0, cos, 0.5)
    assert out.loss.item() == pytest.approx((want0 + want1) / 2, rel=1e-5)
    assert out.pruned_fraction.item() == pytest.approx(2 / 8)
    # both rules at once: the union is removed
    both = pruned_infonce(q, k, queue, tau=0.5, gamma=-0.6, query_ids=qids, key_ids=kids)
    assert both.keep.tolist() == [[False, False, True, False], [False, False, True, True]]
    assert both.pruned_fraction.item() == pytest.approx(5 / 8)
    with pytest.raises(ValueError, match="^pass both query_ids and key_ids, or neither$"):
        pruned_infonce(q, k, queue, query_ids=qids)
    with pytest.raises(ValueError, match="^pass both query_ids and key_ids, or neither$"):
        pruned_infonce(q, k, queue, key_ids=kids)


def test_only_the_query_gets_a_gradient_and_it_matches_the_hand_derivative() -> None:
    q = torch.tensor([[1.0, 0.0]], requires_grad=True)
    k = torch.tensor([[1.0, 0.0]], requires_grad=True)
    queue = torch.tensor([[0.0, 1.0]], requires_grad=True)
    out = pruned_infonce(q, k, queue, tau=1.0, gamma=None)
    out.loss.backward()
    assert k.grad is None and queue.grad is None
    # L = -log(e^{q.k} / (e^{q.k} + e^{q.n})) at unit q: dL/dq = -(1 - p) k + (1 - p) n projected
    # orthogonally to q (normalisation), p = e / (e + 1); only the n direction survives
    p = math.e / (math.e + 1)
    assert q.grad is not None
    torch.testing.assert_close(q.grad, torch.tensor([[0.0, 1 - p]]))


def test_an_empty_queue_leaves_the_positive_alone() -> None:
    q, k = torch.randn(3, 4), torch.randn(3, 4)
    out = pruned_infonce(q, k, torch.zeros(0, 4))
    assert out.keep.shape == (3, 0)
    assert out.pruned_fraction.item() == 0.0 and out.loss.item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    "shapes",
    [((4,), (4,), (5, 4)), ((2, 4), (3, 4), (5, 4)), ((2, 4), (2, 4), (4,)), ((2, 4), (2, 4), (5, 3))],
)
def test_every_shape_mismatch_is_refused(shapes: tuple[tuple[int, ...], ...]) -> None:
    q, k, queue = (torch.ones(s) for s in shapes)
    with pytest.raises(ValueError, match=r"; expected \(B, D\), \(B, D\), \(K, D\)$"):
        pruned_infonce(q, k, queue)


def test_temperature_must_be_positive() -> None:
    q = torch.ones(1, 2)
    with pytest.raises(ValueError, match="^temperature tau=-0.1 must be > 0$"):
        pruned_infonce(q, q, q, tau=-0.1)
    assert pruned_infonce(q, q, q, tau=1.5, gamma=None).loss.item() == pytest.approx(math.log(2), rel=1e-6)


@pytest.mark.parametrize("which", ["q", "k", "queue"])
def test_computed_in_fp32_whatever_the_input_precision(which: str) -> None:
    g = torch.Generator().manual_seed(3)
    t = {
        "q": torch.randn(2, 4, generator=g),
        "k": torch.randn(2, 4, generator=g),
        "queue": torch.randn(5, 4, generator=g),
    }
    ref = pruned_infonce(t["q"], t["k"], t["queue"], gamma=0.5)
    t[which] = t[which].double()
    got = pruned_infonce(t["q"], t["k"], t["queue"], gamma=0.5)
    assert got.loss.dtype == torch.float32 and got.loss.item() == pytest.approx(ref.loss.item(), rel=1e-6)
    assert torch.equal(got.keep, ref.keep)


def test_stays_on_the_device_of_the_embeddings() -> None:
    """The meta device stands in for an accelerator: every tensor made inside follows the inputs
    (a stray CPU tensor fails there), and ids may come from the data loader on the CPU."""
    meta = torch.device("meta")
    q, queue = torch.empty(2, 4, device=meta), torch.empty(5, 4, device=meta)
    out = pruned_infonce(q, q, queue, query_ids=torch.tensor([0, 1]), key_ids=torch.arange(5))
    assert out.loss.device == out.keep.device == out.pruned_fraction.device == meta
    assert out.loss.shape == () and out.keep.shape == (2, 5)
