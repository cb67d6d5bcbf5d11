"""Parameter groups: norms and biases get no weight decay, and a group's LR follows its scale."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from asa3d.engine.param_groups import build_optimizer, decay_groups
from asa3d.engine.schedules import LRSchedule


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LayerNorm(4 * 6 * 6), nn.Linear(144, 2)
    )


def test_norm_weights_and_biases_receive_no_weight_decay() -> None:
    torch.manual_seed(0)
    net = _net()
    groups = decay_groups(net, weight_decay=0.5)
    by_name = {g.name: g for g in groups}
    names = {id(p): n for n, p in net.named_parameters()}
    assert sorted(names[id(p)] for p in by_name["decay"].params) == ["0.weight", "4.weight"]
    assert by_name["no_decay"].weight_decay == 0.0 and by_name["decay"].weight_decay == 0.5
    # behaviour, not bookkeeping: with zero gradients only decayed weights shrink under SGD
    opt = build_optimizer("sgd", groups, base_lr=0.1, momentum=0.0)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in net.named_parameters():
        if n in ("0.weight", "4.weight"):
            assert torch.allclose(p, before[n] * (1 - 0.1 * 0.5)), n
        else:
            assert torch.equal(p, before[n]), n  # BatchNorm/LayerNorm weights and all biases


@pytest.mark.parametrize("kind", ["epoch_cosine", "constant"])
def test_group_lr_follows_its_scale_under_the_schedule(kind: str) -> None:
    net = _net()
    groups = decay_groups(
        net, 0.0, skip_norm_and_bias=False, lr_scale=lambda n: 10.0 if n.startswith("4.") else 1.0
    )
    assert sorted(g.lr_scale for g in groups) == [1.0, 10.0]
    opt = build_optimizer("adamw", groups, base_lr=1e-3)
    sched = LRSchedule(opt, kind, 1e-3, warmup=2, epochs=4, iters_per_round=3)
    for r in range(4):
        base = sched.step(r, r * 3)
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(base * g["lr_scale"], rel=0, abs=0)
    assert base == 0.0 or kind == "constant"
