"""LR schedule values, batch arithmetic, data order across ranks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from asa3d.config import ConfigError
from asa3d.engine.distributed import phase_order, rank_indices
from asa3d.engine.schedules import LRSchedule, warmup_cosine
from asa3d.engine.trainer import micro_batch_size, round_plan


def test_epoch_cosine_matches_spec() -> None:
    base, w, e_max = 1e-3, 5, 400
    assert warmup_cosine(base, 1, w, e_max) == pytest.approx(0.2 * base)  # round 1 at base/W
    assert warmup_cosine(base, 5, w, e_max) == pytest.approx(base)  # end of warm-up: the peak
    assert warmup_cosine(base, 400, w, e_max) == pytest.approx(0.0, abs=1e-15)  # cosine end
    mid = (w + e_max) / 2
    assert warmup_cosine(base, mid, w, e_max) == pytest.approx(base / 2)
    vals = [warmup_cosine(base, e, w, e_max) for e in range(5, 401)]
    assert all(a >= b for a, b in zip(vals, vals[1:], strict=False))  # monotone after warm-up


def test_schedule_kinds_set_param_groups() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s = LRSchedule(opt, "epoch_cosine", 1.0, 2, 10, iters_per_round=4)
    assert s.step(0, 3) == pytest.approx(0.5) and opt.param_groups[0]["lr"] == pytest.approx(0.5)
    assert s.value(0, 0) == s.value(0, 3)  # constant within a round
    it = LRSchedule(opt, "iter_cosine", 1.0, 2, 10, iters_per_round=4)
    assert it.value(0, 3) == pytest.approx(0.5)  # end of round 1 equals the epoch curve at e=1
    assert it.value(0, 0) == pytest.approx(0.125)
    assert it.value(9, 39) == pytest.approx(0.0, abs=1e-12)
    c = LRSchedule(opt, "constant", 1.0, 0, 10, iters_per_round=4)
    assert c.value(0, 0) == c.value(9, 39) == 1.0
    assert math.isnan(LRSchedule(opt, "constant", 1.0, 0, 1, 1).state_dict()["last_lr"])


def test_micro_batch_divisibility() -> None:
    assert micro_batch_size(12, 4, 1) == 3
    assert micro_batch_size(12, 2, 3) == 2
    with pytest.raises(ConfigError, match="divisible by world_size"):
        micro_batch_size(12, 5, 1)


def test_round_plan_orders() -> None:
    assert round_plan(2, [2, 2], "epoch") == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert round_plan(2, [2, 2], "iteration") == [(0, 0), (1, 0), (0, 1), (1, 1)]


def test_rank_shards_partition_the_global_batch() -> None:
    order = phase_order(10, seed=3, round_=1, phase_index=0)
    assert sorted(order) == list(range(10))
    assert not np.array_equal(order, phase_order(10, 3, 1, 1))  # each phase pass its own order
    single = rank_indices(order, 4, 3, rank=0, world=1)
    r0 = rank_indices(order, 4, 3, rank=0, world=2)
    r1 = rank_indices(order, 4, 3, rank=1, world=2)
    for i in range(3):  # iteration i: ranks split exactly the single process's global batch
        assert single[4 * i : 4 * i + 4] == r0[2 * i : 2 * i + 2] + r1[2 * i : 2 * i + 2]
    assert rank_indices(order, 4, 3, 0, 2, start_iter=1) == r0[2:]  # resume skips consumed batches


def test_warmup_start_and_floor_shape_the_cosine() -> None:
    """SimMIM's form: linear warm-up from ``start``, cosine from the peak down to ``floor``; at
    start = floor = 0 the schedule is the ASA curve bit for bit."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s = LRSchedule(opt, "iter_cosine", 1.0, 2, 10, iters_per_round=4, start=0.1, floor=0.01)
    assert s.value(0, 3) == pytest.approx(0.1 + 0.9 * 0.5)  # e = 1 of a 2-round warm-up
    assert s.value(1, 7) == pytest.approx(1.0)  # peak at the end of warm-up
    assert s.value(9, 39) == pytest.approx(0.01)  # ends at the floor, not 0
    mid = s.value(5, 23)  # e = 6: halfway through the cosine
    assert mid == pytest.approx(0.01 + 0.99 * 0.5)
    plain = LRSchedule(opt, "epoch_cosine", 1e-3, 5, 40, iters_per_round=3)
    zero = LRSchedule(opt, "epoch_cosine", 1e-3, 5, 40, iters_per_round=3, start=0.0, floor=0.0)
    assert [plain.value(r, 0) for r in range(40)] == [zero.value(r, 0) for r in range(40)]
    assert [plain.value(r, 0) for r in range(40)] == [warmup_cosine(1e-3, r + 1, 5, 40) for r in range(40)]
