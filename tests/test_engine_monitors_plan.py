"""Collapse monitors and the memory planner."""

from __future__ import annotations

import torch

from asa3d.engine.memory_plan import format_plan, plan
from asa3d.engine.monitors import collapse_warning, embedding_health
from asa3d.methods.base import build_method
from engine_toy_method import toy_config


def test_collapse_is_detected_and_healthy_is_not() -> None:
    g = torch.Generator().manual_seed(0)
    healthy = embedding_health({"teacher": torch.randn(32, 16, generator=g)})
    assert healthy["teacher_std_ratio"] > 0.5 and healthy["teacher_erank"] > 8
    assert collapse_warning(healthy) is None
    base = torch.randn(1, 16, generator=g)
    collapsed = embedding_health(
        {"teacher": base + 1e-6 * torch.randn(32, 16, generator=g), "student": base.expand(32, 16)}
    )
    assert collapsed["teacher_std_ratio"] < 0.01 and collapsed["student_teacher_cos"] > 0.99
    assert "collapse" in (collapse_warning(collapsed) or "")


def test_plan_table_on_cpu() -> None:
    cfg = toy_config()
    method = build_method(cfg.method, cfg.model)
    rows = plan(method, "fp32", torch.device("cpu"), budget_gb=1.0, optimizer="sgd")
    assert [r.phase for r in rows] == ["recon", "consist"]
    assert all(r.mem2 > r.mem1 > 0 and r.max_micro_batch >= 1 for r in rows)
    text = format_plan(rows, torch.device("cpu"), 1.0, 12)
    assert "largest micro-batch that fits every phase" in text
