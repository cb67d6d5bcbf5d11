"""SimMIM's masked encoder on MONAI's SwinUNETR: a learnable mask token between the patch embedding
and the first Swin stage, composed from the MONAI modules (MONAI has no hook there).

Where the mask acts, and why there:
- On the token grid after ``swinViT.patch_embed`` (S/patch_size tokens per axis): masked tokens are
  replaced by the mask token, h <- h (1 - m) + t m, then the stages run as usual; no token is
  dropped (SimMIM, not MAE). h0, which ``encoder2`` reads, is taken after the blend.
- In the input itself: SwinUNETR's ``encoder1`` reads the raw volume, a skip path the mask token
  never reaches, so with the raw input the decoder could copy the masked voxels straight to its
  output. The caller therefore passes the volume with its masked voxels already filled
  (``asa3d.views.masking.fill_masked``: 0 or the visible mean), and that filled volume is what
  both the patch embedding and ``encoder1`` read. The masked voxels then reach the output through
  nothing at all: the reconstruction of a masked cell depends only on the visible context.
"""

from __future__ import annotations

import torch
from torch import nn

from asa3d.models.backbone import SwinBackbone, decode_swinunetr

__all__ = ["MaskToken", "masked_encode", "masked_forward"]


class MaskToken(nn.Module):
    """One learnable (1, C, 1, 1, 1) embedding, truncated-normal init with std 0.02 (SimMIM).
    Kept out of weight decay by the method's parameter groups."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, dim, 1, 1, 1))
        nn.init.trunc_normal_(self.token, std=0.02)

    def blend(self, h: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """(B, C, *grid) embeddings with the tokens of ``token_mask`` (B, *grid) replaced."""
        if token_mask.shape != (h.shape[0], *h.shape[2:]):
            raise ValueError(
                f"token mask {tuple(token_mask.shape)} does not match the patch embedding {tuple(h.shape)}"
            )
        m = token_mask[:, None].to(h.dtype)
        return h * (1 - m) + self.token.to(h.dtype) * m


def masked_encode(
    backbone: SwinBackbone, x_filled: torch.Tensor, token_mask: torch.Tensor, mask_token: MaskToken
) -> list[torch.Tensor]:
    """Hidden states h0..h4 of ``backbone.net.swinViT`` with the masked tokens replaced after the
    patch embedding (normalised as MONAI's forward when ``normalize``)."""
    vit = backbone.net.swinViT
    normalize = backbone.net.normalize
    h = vit.pos_drop(mask_token.blend(vit.patch_embed(x_filled), token_mask))
    outs = [vit.proj_out(h, normalize)]
    for k in range(1, 5):
        if vit.use_v2:
            h = getattr(vit, f"layers{k}c")[0](h.contiguous())
        h = getattr(vit, f"layers{k}")[0](h.contiguous())
        outs.append(vit.proj_out(h, normalize))
    return outs


def masked_forward(
    backbone: SwinBackbone, x_filled: torch.Tensor, token_mask: torch.Tensor, mask_token: MaskToken
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(SwinUNETR decoder output, hidden states) with ``encoder1`` reading the filled volume."""
    backbone.net._check_input_size(x_filled.shape[2:])
    hidden = masked_encode(backbone, x_filled, token_mask, mask_token)
    return decode_swinunetr(backbone.net, x_filled, hidden), hidden
