"""``asa3d plan``: how large a per-device micro-batch fits in a memory budget.

One real training step (forward + backward) of each phase is run at micro-batch 1 and 2; the
peak memory is extrapolated linearly (fixed part + per-sample part). On CUDA the peak is
``torch.cuda.max_memory_allocated``; on CPU it is an estimate: parameters, buffers, gradients
and optimiser state plus every tensor autograd saves for backward (counted through
``torch.autograd.graph.saved_tensors_hooks``), which dominates activation memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from asa3d.data.sampling import SampleSpec
from asa3d.engine.precision import autocast
from asa3d.methods.base import PretrainMethod

GB = 1024**3


@dataclass
class PhasePlan:
    phase: str
    mem1: float  # bytes at micro-batch 1
    mem2: float  # bytes at micro-batch 2
    budget: float

    @property
    def per_sample(self) -> float:
        return max(self.mem2 - self.mem1, 1.0)

    @property
    def fixed(self) -> float:
        return self.mem1 - self.per_sample

    @property
    def max_micro_batch(self) -> int:
        return max(0, math.floor((self.budget - self.fixed) / self.per_sample))


def synthetic_batch(
    spec: SampleSpec, n: int, volume_shape: tuple[int, int, int], device: torch.device
) -> dict:
    if spec.mode == "crop":
        assert spec.crop_size is not None
        image: Any = torch.rand(n, 1, *spec.crop_size, device=device)
    else:
        image = [torch.rand(1, *volume_shape, device=device) for _ in range(n)]
    return {"image": image, "id": [f"plan{i}" for i in range(n)]}


def _state_bytes(method: PretrainMethod, optimizer: str) -> int:
    trainable = list(method.trainable_parameters())
    ids = {id(p) for p in trainable}
    tensors = [*method.parameters(), *method.buffers()]
    total = sum(t.numel() * t.element_size() for t in tensors)
    train_bytes = sum(p.numel() * p.element_size() for p in trainable if id(p) in ids)
    states = 2 if optimizer == "adamw" else 1  # Adam: exp_avg + exp_avg_sq; SGD: momentum buffer
    return total + train_bytes * (1 + states)  # + gradients + optimiser state


def measure(
    method: PretrainMethod, phase: str, batch: dict, precision: str, device: torch.device, optimizer: str
) -> float:
    """Peak bytes of one forward+backward of ``phase`` on ``batch``."""
    method.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        with autocast(precision, device):
            out = method.training_step(batch, phase)
        out.loss.backward()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        method.zero_grad(set_to_none=True)
        # optimiser state is not allocated before the first step: add it
        states = 2 if optimizer == "adamw" else 1
        return float(peak + states * sum(p.numel() * p.element_size() for p in method.trainable_parameters()))
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter):
            try:
                key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
                seen[key] = t.untyped_storage().nbytes()
            except (RuntimeError, NotImplementedError):
                seen[(id(t), 0)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(precision, device):
        out = method.training_step(batch, phase)
    out.loss.backward()
    method.zero_grad(set_to_none=True)
    return float(sum(seen.values()) + _state_bytes(method, optimizer))


def plan(
    method: PretrainMethod,
    precision: str,
    device: torch.device,
    budget_gb: float,
    optimizer: str,
    volume_shape: tuple[int, int, int] = (128, 128, 128),
) -> list[PhasePlan]:
    method.to(device).train()
    rows = []
    for phase in method.phases():
        spec = method.sample_spec(phase)
        m1 = measure(
            method, phase, synthetic_batch(spec, 1, volume_shape, device), precision, device, optimizer
        )
        m2 = measure(
            method, phase, synthetic_batch(spec, 2, volume_shape, device), precision, device, optimizer
        )
        rows.append(PhasePlan(phase, m1, m2, budget_gb * GB))
    return rows


def format_plan(
    rows: list[PhasePlan], device: torch.device, budget_gb: float, global_batch: int, per_rank: bool = False
) -> str:
    """The table and the advice; ``per_rank``: ``global_batch`` is ``train.batch_size`` under
    ``batch_scope: per_rank``, i.e. volumes per process."""
    how = (
        "measured (torch.cuda.max_memory_allocated)"
        if device.type == "cuda"
        else "estimated on CPU (params + grads + optimiser state + tensors saved for backward)"
    )
    lines = [
        f"memory plan, budget {budget_gb:g} GB per device, {how}",
        f"{'phase':<12}{'mb=1 GB':>10}{'mb=2 GB':>10}{'fixed GB':>10}{'/sample GB':>12}"
        f"{'max micro-batch':>17}",
    ]
    for r in rows:
        lines.append(
            f"{r.phase:<12}{r.mem1 / GB:>10.2f}{r.mem2 / GB:>10.2f}{r.fixed / GB:>10.2f}"
            f"{r.per_sample / GB:>12.3f}{r.max_micro_batch:>17d}"
        )
    fit = min((r.max_micro_batch for r in rows), default=0)
    lines.append(f"largest micro-batch that fits every phase: {fit}")
    if fit == 0:
        lines.append(
            "nothing fits: set model.use_checkpoint=true, precision bf16, or a smaller crop/input size."
        )
    elif per_rank:
        lines.append(
            f"for train.batch_size={global_batch} per process (batch_scope: per_rank): choose "
            f"train.grad_accum so that {global_batch} / grad_accum <= {fit}."
        )
    else:
        lines.append(
            f"for train.batch_size={global_batch}: choose world_size x grad_accum so that "
            f"{global_batch} / (world_size x grad_accum) <= {fit}."
        )
    return "\n".join(lines)
