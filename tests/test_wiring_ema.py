"""EMA teacher plumbing on tiny modules: momentum schedule edges, the update's refusals and
dtype handling, buffer copying, parameter pairing by name and prefix, the teacher's isolation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from asa3d.models.ema import copy_buffers_, cosine_momentum, ema_update_, make_teacher, param_pairs


def test_cosine_momentum_formula_clamping_and_refusals() -> None:
    for i in (0, 1, 7, 13, 20):
        want = 1 - (1 - 0.9) * (1 + math.cos(math.pi * i / 20)) / 2
        assert cosine_momentum(i, 20, 0.9) == pytest.approx(want, abs=1e-12)
    assert cosine_momentum(20, 20, 0.9) == 1.0
    assert cosine_momentum(25, 20, 0.9) == 1.0  # clamped: an extended run never overshoots
    assert cosine_momentum(-3, 20, 0.9) == pytest.approx(0.9)
    assert cosine_momentum(5, 0, 0.7) == 0.7 and cosine_momentum(5, -1, 0.7) == 0.7
    assert cosine_momentum(0, 1, 0.7) == pytest.approx(0.7) and cosine_momentum(1, 1, 0.7) == 1.0  # 1 step
    assert cosine_momentum(3, 10, 0.0) == pytest.approx((1 - math.cos(math.pi * 0.3)) / 2)
    assert cosine_momentum(3, 10, 1.0) == 1.0  # both ends of [0, 1] are allowed
    for bad in (-0.01, 1.01):
        with pytest.raises(ValueError, match="momentum m0"):
            cosine_momentum(0, 10, bad)


def test_ema_update_refuses_mismatches() -> None:
    with pytest.raises(ValueError, match="2 teacher tensors but 1 student"):
        ema_update_([torch.zeros(2), torch.zeros(2)], [torch.zeros(2)], 0.5)
    with pytest.raises(ValueError, match=r"shape mismatch \(2,\) vs \(3,\)"):
        ema_update_([torch.zeros(2)], [torch.zeros(3)], 0.5)


def test_ema_update_mixed_dtypes_in_fp32_and_student_untouched() -> None:
    t32 = torch.full((4,), 2.0)
    t16 = torch.full((4,), 1.0, dtype=torch.bfloat16)
    s32, s16 = torch.full((4,), 4.0), torch.full((4,), 3.0, dtype=torch.bfloat16)
    ema_update_([t32, t16], [s32, s16], 0.75)
    assert t32.tolist() == [2.5] * 4 and t16.dtype == torch.bfloat16 and t16.float().tolist() == [1.5] * 4
    assert s32.tolist() == [4.0] * 4 and s16.float().tolist() == [3.0] * 4
    # m = 1 keeps the teacher, m = 0 copies the student
    a = torch.tensor([1.0, 2.0])
    ema_update_([a], [torch.tensor([5.0, 6.0])], 1.0)
    assert a.tolist() == [1.0, 2.0]
    ema_update_([a], [torch.tensor([5.0, 6.0])], 0.0)
    assert a.tolist() == [5.0, 6.0]


def test_ema_update_works_on_a_student_that_requires_grad() -> None:
    student = nn.Linear(2, 2)
    teacher = make_teacher(student)
    with torch.no_grad():
        student.weight.add_(1.0)
    ema_update_(list(teacher.parameters()), list(student.parameters()), 0.5)
    assert torch.allclose(teacher.weight, student.weight - 0.5)
    assert teacher.weight.grad is None and not teacher.weight.requires_grad


def test_copy_buffers_copies_float_buffers_only() -> None:
    student, teacher = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    with torch.no_grad():
        student.running_mean.fill_(0.7)
        student.running_var.fill_(2.0)
        student.num_batches_tracked.fill_(9)
    copy_buffers_(teacher, student)
    assert teacher.running_mean.tolist() == pytest.approx([0.7] * 3)
    assert teacher.running_var.tolist() == [2.0] * 3
    assert int(teacher.num_batches_tracked) == 0  # integer buffers are the teacher's own


def test_make_teacher_is_a_frozen_eval_copy_that_shares_nothing() -> None:
    student = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5))
    student.train()
    teacher = make_teacher(student)
    assert student.training and not teacher.training and not any(m.training for m in teacher.modules())
    assert all(p.requires_grad for p in student.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())
    for (n, pt), (_, ps) in zip(teacher.named_parameters(), student.named_parameters(), strict=True):
        assert torch.equal(pt, ps) and pt.data_ptr() != ps.data_ptr(), n
    with torch.no_grad():
        student[0].weight.add_(1.0)
    assert not torch.equal(teacher[0].weight, student[0].weight)


def test_param_pairs_match_by_name_and_prefix() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Linear(2, 3)
            self.head = nn.Linear(3, 1)
            self.proj = nn.Linear(3, 2)

    student = Net()
    teacher = make_teacher(student)
    tl, sl = param_pairs(teacher, student)
    assert len(tl) == 6 and [t.shape for t in tl] == [s.shape for s in sl]
    names_t = {id(p): n for n, p in teacher.named_parameters()}
    names_s = {id(p): n for n, p in student.named_parameters()}
    assert [names_t[id(t)] for t in tl] == [names_s[id(s)] for s in sl]
    tl, sl = param_pairs(teacher, student, ["enc.", "proj.weight"])
    assert [names_t[id(t)] for t in tl] == ["enc.weight", "enc.bias", "proj.weight"]
    assert [names_s[id(s)] for s in sl] == ["enc.weight", "enc.bias", "proj.weight"]
    assert param_pairs(teacher, student, []) == ([], [])


def test_ema_refusals_say_exactly_what_differs() -> None:
    with pytest.raises(ValueError) as e:
        cosine_momentum(0, 10, 1.5)
    assert str(e.value) == "momentum m0=1.5 must lie in [0, 1]"
    with pytest.raises(ValueError) as e:
        ema_update_([torch.zeros(2)], [torch.zeros(2), torch.zeros(1)], 0.5)
    assert str(e.value) == "EMA: 1 teacher tensors but 2 student tensors"
    with pytest.raises(ValueError) as e:
        ema_update_([torch.zeros(2, 3)], [torch.zeros(3, 2)], 0.5)
    assert str(e.value) == "EMA: shape mismatch (2, 3) vs (3, 2)"


def test_ema_update_low_precision_teacher_from_fp32_student_in_fp32() -> None:
    # 1 - m = 2**-10: in bf16 the increment would round away; through the fp32 copy it lands
    t = torch.full((3,), 1.0, dtype=torch.bfloat16)
    ema_update_([t], [torch.full((3,), 257.0)], 1.0 - 2.0**-10)
    assert t.dtype == torch.bfloat16 and t.float().tolist() == [1.25] * 3
    t64 = torch.full((2,), 1.0, dtype=torch.float64)
    ema_update_([t64], [torch.full((2,), 3.0, dtype=torch.float64)], 0.25)
    assert t64.dtype == torch.float64 and t64.tolist() == [2.5, 2.5]
