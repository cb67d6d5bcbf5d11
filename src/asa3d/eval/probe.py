"""Linear probing, two ways (docs/evaluation.md, "fine-tune vs probe vs strict linear probe").

- ``probe`` (the paper's "linear probing", asa.md §10): the pretrained Swin encoder ``swinViT`` is
  frozen, everything else (UNETR conv blocks encoder1-4/10, decoder, out) is trained. Not linear:
  about 54 M of 62 M parameters still train at feature size 48. Option ``freeze_encoders``: also
  freeze encoder1-4 and encoder10 (the conv blocks on the skip paths).
- ``strict_linear``: a truly linear probe. The frozen multi-scale features h0..h4 of ``swinViT``
  are upsampled (trilinear) to the input grid, concatenated, and a single 1x1x1 convolution maps
  them to class logits. Only that convolution trains.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets import SwinUNETR
from torch import nn

SKIP_ENCODERS = ("encoder1", "encoder2", "encoder3", "encoder4", "encoder10")


def freeze_for_probe(model: SwinUNETR, freeze_encoders: bool = False) -> list[str]:
    """Freeze ``swinViT`` (and optionally the skip-path conv blocks); returns the frozen names."""
    frozen = []
    prefixes = ("swinViT.",) + (tuple(f"{e}." for e in SKIP_ENCODERS) if freeze_encoders else ())
    for name, p in model.named_parameters():
        if name.startswith(prefixes):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


class StrictLinearProbe(nn.Module):
    """1x1x1 convolution over upsampled, concatenated frozen ``swinViT`` features."""

    def __init__(
        self, backbone: SwinUNETR, out_channels: int, stages: Sequence[int] = (0, 1, 2, 3, 4)
    ) -> None:
        super().__init__()
        self.swinViT = backbone.swinViT
        self.normalize = bool(getattr(backbone, "normalize", True))
        for p in self.swinViT.parameters():
            p.requires_grad_(False)
        self.stages = tuple(int(s) for s in stages)
        if not self.stages or min(self.stages) < 0 or max(self.stages) > 4:
            raise ValueError(f"strict probe stages {stages} must be a non-empty subset of 0..4")
        fs = backbone.swinViT.embed_dim
        chans = [fs * 2**i for i in range(5)]
        self.head = nn.Conv3d(sum(chans[s] for s in self.stages), out_channels, kernel_size=1)

    def train(self, mode: bool = True) -> StrictLinearProbe:
        super().train(mode)
        self.swinViT.eval()  # frozen features: deterministic
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            hs = self.swinViT(x, self.normalize)
            feats = [
                F.interpolate(hs[s], size=x.shape[2:], mode="trilinear", align_corners=False)
                for s in self.stages
            ]
        return self.head(torch.cat(feats, dim=1))


def trainable_parameters(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def prepare_model(
    model: SwinUNETR,
    mode: str,
    out_channels: int,
    freeze_encoders: bool = False,
    stages: Sequence[int] = (0, 1, 2, 3, 4),
) -> nn.Module:
    """``finetune``: the model as is; ``probe``: frozen swinViT; ``strict_linear``: the 1x1x1 probe."""
    if mode == "finetune":
        return model
    if mode == "probe":
        freeze_for_probe(model, freeze_encoders)
        return _ProbeWrapper(model)
    if mode == "strict_linear":
        return StrictLinearProbe(model, out_channels, stages)
    raise ValueError(f"unknown training mode {mode!r}: finetune | probe | strict_linear")


class _ProbeWrapper(nn.Module):
    """SwinUNETR with its frozen encoder kept in eval mode; state-dict keys stay MONAI's."""

    def __init__(self, model: SwinUNETR) -> None:
        super().__init__()
        self.model = model

    def train(self, mode: bool = True) -> _ProbeWrapper:
        super().train(mode)
        self.model.swinViT.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def state_dict(self, *args, **kwargs):  # type: ignore[override]
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        return self.model.load_state_dict(state_dict, strict=strict, assign=assign)
