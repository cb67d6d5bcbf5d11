"""MLP heads and projectors. Every size follows from the tap channels C and the config.

Projectors use LayerNorm (not BatchNorm) so the loss of a sample does not depend on the other
samples of the batch: gradient accumulation and DDP give the same result as one large batch.
"""

from __future__ import annotations

from torch import nn

__all__ = ["OrderHead", "Projector"]


class OrderHead(nn.Sequential):
    """Per-token order regressor: Linear(C,C) -> ReLU -> Linear(C,C) -> ReLU -> Linear(C,out).

    ``out_dim`` is 3 for 3D coordinates, 1 for the scalar 1D target, N for 1D classification.
    """

    def __init__(self, in_dim: int, out_dim: int = 3) -> None:
        super().__init__(
            nn.Linear(in_dim, in_dim),
            nn.ReLU(inplace=True),
            nn.Linear(in_dim, in_dim),
            nn.ReLU(inplace=True),
            nn.Linear(in_dim, out_dim),
        )


class Projector(nn.Sequential):
    """Linear(C,W) -> LN -> ReLU -> Linear(W,W) -> LN -> ReLU -> Linear(W,W, bias=False).

    Global projector: W = ``global_proj_dim`` (8192 in the reference setup, ~137 M parameters
    at C=384); local projector: W = ``local_proj_dim`` (512).
    """

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__(
            nn.Linear(in_dim, dim),
            nn.LayerNorm(dim),
            nn.ReLU(inplace=True),
            nn.Linear(dim, dim),
            nn.LayerNorm(dim),
            nn.ReLU(inplace=True),
            nn.Linear(dim, dim, bias=False),
        )
