"""Mixed precision and determinism switches."""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections.abc import Iterator

import numpy as np
import torch

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def autocast(precision: str, device: torch.device) -> Iterator[None]:
    """``torch.autocast`` on the training device for bf16/fp16; a no-op for fp32. Methods keep
    teacher/EMA arithmetic in fp32 themselves (EMA runs after the step, outside autocast)."""
    if precision == "fp32":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=DTYPES[precision]):
        yield


def training_precision(precision: str, device: torch.device, cpu_bf16: bool = False) -> str:
    """The precision training runs at: bf16 on a CPU trains in fp32 unless ``train.cpu_bf16``.

    Why: PyTorch's oneDNN bf16 conv3d weight gradient on AVX-512-BF16 CPUs returns garbage
    (values ~1e32, run to run) for the small spatial sizes of a U-Net's bottleneck; measured
    with torch 2.13 by ``benchmarks/cpu_bf16_conv.py``, and of the same kind as pytorch/pytorch
    issue 169688. One such step ruins the AdamW state, so this is not left to a loss check.
    CUDA bf16 and CPU inference (the forward pass) are unaffected and keep bf16.
    """
    if precision == "bf16" and device.type == "cpu" and not cpu_bf16:
        log.warning(
            "train.precision=bf16 on the CPU: training in fp32, because PyTorch's bf16 conv3d "
            "weight gradients are unreliable on CPUs (docs/scaling.md, 'Precision'); "
            "train.cpu_bf16=true forces bf16."
        )
        return "fp32"
    return precision


def make_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling only where it is needed: fp16 on CUDA (bf16 has fp32's exponent range)."""
    enabled = precision == "fp16" and device.type == "cuda"
    if precision == "fp16" and device.type != "cuda":
        log.warning("train.precision=fp16 on %s: running without a GradScaler; prefer bf16 on CPU.", device)
    return torch.amp.GradScaler(device.type if enabled else "cpu", enabled=enabled)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_deterministic(enabled: bool) -> None:
    """Bitwise-reproducible kernels (same device, same thread count). Slower on GPU."""
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=False)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
