"""Everything asa3d knows about MONAI's SwinUNETR: its declared spec (parts, head, kwargs), the
layout of MONAI's released self-supervised weights, and an encoder-only forward that stops at a
chosen stage.

``SwinBackbone`` keeps the MONAI network as ``self.net`` so its ``state_dict`` keys are exactly
``net.<SwinUNETR keys>`` and ``swinunetr_state_dict()`` loads into a plain MONAI SwinUNETR.

Stage k (0..4) of ``swinViT`` has ``feature_size * 2**k`` channels on a grid of
``S / (patch_size * 2**k)`` per axis. Methods whose heads read one stage (ASA reads stage 3, one
token per 16^3 sub-volume) call ``encode(x, stage)``: it runs ``patch_embed`` and ``layers1`` ..
``layers<stage>`` only, so neither ``layers4`` nor the UNETR conv blocks/decoder are computed
(they dominate the cost at feature_size 48) and no gradient can reach them.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from monai.networks.nets import SwinUNETR
from torch import nn

from asa3d.config_sections import ModelConfig
from asa3d.models.backbones.spec import (
    BackboneKind,
    BackboneSpec,
    FeatureTap,
    register_backbone,
    register_layout,
)

SWINUNETR_CLASS = "monai.networks.nets.SwinUNETR"

__all__ = [
    "SWINUNETR_CLASS",
    "SwinBackbone",
    "release_key_to_monai",
    "swinunetr_kwargs",
    "swinunetr_spec",
    "build_student_teacher",
    "decode_swinunetr",
    "encoder_parameter_names",
    "monai_swinunetr_kwargs",
    "stage_for_subvolume",
    "swin_hidden_states",
    "tap_channels",
    "trained_parts",
]


# SwinUNETR arguments that change only speed (never weights, outputs beyond float rounding, or
# gradients); a MONAI that lacks them still builds the same network.
SPEED_ONLY_KWARGS = ("use_flash_attention",)


def stage_for_subvolume(p: int, patch_size: int = 2) -> int:
    """Stage whose tokens cover ``p``^3 voxels each: p = patch_size * 2**k (p=16 -> k=3)."""
    if p < patch_size or p % patch_size:
        raise ValueError(f"sub-volume size {p} must be a multiple of the patch size {patch_size}")
    ratio = p // patch_size
    k = int(round(math.log2(ratio)))
    if 2**k != ratio or not 0 <= k <= 4:
        raise ValueError(
            f"sub-volume size {p} must be patch_size * 2**k with k in 0..4 "
            f"(patch_size {patch_size}: {[patch_size * 2**j for j in range(5)]})"
        )
    return k


def tap_channels(feature_size: int, stage: int) -> int:
    """Channels of the stage-``stage`` hidden state (C_k = F * 2**k)."""
    if not 0 <= stage <= 4:
        raise ValueError(f"stage must be in 0..4, got {stage}")
    return feature_size * 2**stage


def monai_swinunetr_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Adapt keyword names to the installed MONAI (``drop_path_rate`` is ``dropout_path_rate``
    in MONAI 1.x), and refuse anything it does not know, naming the key."""
    params = inspect.signature(SwinUNETR.__init__).parameters
    out = dict(kwargs)
    if "drop_path_rate" in out and "drop_path_rate" not in params:
        out["dropout_path_rate"] = out.pop("drop_path_rate")
    for key in SPEED_ONLY_KWARGS:  # change no weight and no gradient: safe to drop where unknown
        if key in out and key not in params:
            out.pop(key)
    unknown = sorted(k for k in out if k not in params)
    if unknown:
        raise TypeError(
            f"SwinUNETR does not accept {unknown}; valid: {sorted(p for p in params if p != 'self')}"
        )
    return out


def swinunetr_kwargs(model_cfg: ModelConfig, out_channels: int) -> dict[str, Any]:
    """Keyword arguments for ``SwinUNETR`` (no ``img_size``: refused by MONAI >= 1.5)."""
    m = model_cfg
    return dict(
        in_channels=m.in_channels,
        out_channels=out_channels,
        feature_size=m.feature_size,
        patch_size=m.patch_size,
        window_size=m.window_size,
        depths=tuple(m.depths),
        num_heads=tuple(m.num_heads),
        norm_name=m.norm_name,
        normalize=m.normalize,
        use_v2=m.use_v2,
        drop_path_rate=m.drop_path_rate,
        use_checkpoint=m.use_checkpoint,
        use_flash_attention=m.use_flash_attention,
        spatial_dims=3,
    )


def _parts(kwargs: Any) -> dict[str, tuple[str, ...]]:
    """Transfer granularity: each Swin stage on its own (a method may train layers1-3 but not
    layers4), the UNETR conv blocks on the skip path, the decoder."""
    parts: dict[str, tuple[str, ...]] = {"patch_embed": ("swinViT.patch_embed.",)}
    for k in range(1, 5):
        parts[f"layers{k}"] = (f"swinViT.layers{k}.", f"swinViT.layers{k}c.")  # layersKc: v2 only
    parts["encoders"] = tuple(f"encoder{i}." for i in (1, 2, 3, 4, 10))
    parts["decoder"] = tuple(f"decoder{i}." for i in range(1, 6))
    return parts


def check_input_size(kwargs: Any, size: Any) -> str | None:
    """SwinUNETR takes sides that are multiples of patch_size**5 (32; MONAI's own check), and its
    bottleneck (size / 32) needs more than one voxel: InstanceNorm refuses a single spatial
    element (so 32^3 fails; 32x32x64 works)."""
    unit = int(kwargs.get("patch_size", 2)) ** 5
    if any(int(s) % unit for s in size) or math.prod(int(s) // unit for s in size) < 2:
        return (
            f"every side must be a multiple of {unit} and at least one side >= {2 * unit} (SwinUNETR's "
            f"bottleneck is size/{unit} and InstanceNorm needs > 1 voxel)."
        )
    return None


def feature_tap(kwargs: Any) -> FeatureTap:
    """The hidden states h_0..h_4 of ``swinViT`` (C_k = F * 2**k), normalised as the network
    normalises them before its decoder."""
    fs = int(kwargs.get("feature_size", 48))
    normalize = bool(kwargs.get("normalize", True))
    return FeatureTap(
        attr="swinViT",
        channels=tuple(fs * 2**k for k in range(5)),
        forward=lambda vit, x: list(vit(x, normalize)),
    )


PATCH_EMBED_KEY = "swinViT.patch_embed.proj.weight"


def explain_mismatch(source: Any, model: Any) -> list[str]:
    """Read the source off its patch embedding (out, in, p, p, p): "feature size 48, expected 12"
    says at once which setting differs."""
    key = PATCH_EMBED_KEY
    if key not in source or key not in model or source[key].ndim != 5:
        return []
    (fs, ci), (fm, cm) = source[key].shape[:2], model[key].shape[:2]
    found = []
    if fs != fm:
        found.append(f"feature size {fs}, expected {fm} (model.feature_size)")
    if ci != cm:
        found.append(f"{ci} input channel(s), expected {cm} (model.in_channels)")
    return found


register_backbone(
    BackboneKind(
        name="swinunetr",
        network=SWINUNETR_CLASS,
        adapt=lambda kw: monai_swinunetr_kwargs(kw),
        parts=_parts,
        head=("out.",),
        encoder=("patch_embed", "layers1", "layers2", "layers3", "layers4"),  # swinViT
        out_key="out_channels",
        # the coarse name older methods report; a stage it claims but never trains is then
        # reported as trained, so methods should report the stages themselves
        groups={"swinViT": ("patch_embed", "layers1", "layers2", "layers3", "layers4")},
        skip=("encoders",),  # the UNETR conv blocks encoder1-4 and encoder10
        training_only=(
            "drop_rate",
            "attn_drop_rate",
            "dropout_path_rate",
            "drop_path_rate",
            "use_checkpoint",
            *SPEED_ONLY_KWARGS,
        ),
        check_input=check_input_size,
        features=feature_tap,
        explain=explain_mismatch,
    )
)


def swinunetr_spec(model_cfg: ModelConfig, out_channels: int = 1) -> BackboneSpec:
    return BackboneSpec.create("swinunetr", swinunetr_kwargs(model_cfg, out_channels))


def trained_parts(
    parts: Any, swin_stages: int = 4, encoders: bool = False, decoder: bool = False
) -> dict[str, bool]:
    """``transfer_parts()`` at the spec's granularity: patch_embed and layers1..layers<swin_stages>
    of ``swinViT``, the UNETR conv blocks (``encoders``) and the ``decoder``, each trained or not."""
    trained = set(swin_stage_parts(swin_stages))
    if encoders:
        trained.add("encoders")
    if decoder:
        trained.add("decoder")
    return {p: p in trained for p in parts}


def swin_stage_parts(stage: int) -> list[str]:
    """Spec parts that ``encode(x, stage)`` runs (patch_embed, layers1..layers<stage>)."""
    return ["patch_embed"] + [f"layers{k}" for k in range(1, stage + 1)]


def release_key_to_monai(key: str) -> str | None:
    """MONAI's released self-supervised ``model_swinvit.pt`` key -> SwinUNETR key (the mapping
    ``SwinUNETR.load_from`` applies: ``module.X`` -> ``swinViT.X`` and ``mlp.fc1/fc2`` ->
    ``mlp.linear1/linear2``). Other keys (rotation / contrastive / reconstruction heads) have no
    counterpart: None."""
    if not key.startswith("module."):
        return None
    rest = key[len("module.") :]
    if not (rest.startswith("patch_embed.") or rest.startswith("layers")):
        return None
    rest = rest.replace(".mlp.fc1.", ".mlp.linear1.").replace(".mlp.fc2.", ".mlp.linear2.")
    return "swinViT." + rest


def is_release_layout(keys: Any) -> bool:
    return any(k.startswith("module.layers") for k in keys)


register_layout("monai-swinvit-ssl", is_release_layout, release_key_to_monai)


def encoder_parameter_names(stage: int, use_v2: bool = False) -> tuple[str, ...]:
    """Prefixes (relative to ``SwinUNETR``) of the modules ``encode(x, stage)`` runs."""
    names = ["swinViT.patch_embed."]
    for k in range(1, stage + 1):
        if use_v2:
            names.append(f"swinViT.layers{k}c.")
        names.append(f"swinViT.layers{k}.")
    return tuple(names)


def decode_swinunetr(net: SwinUNETR, x: torch.Tensor, hidden: list[torch.Tensor]) -> torch.Tensor:
    """The UNETR conv blocks and decoder of ``SwinUNETR.forward`` on given hidden states h_0..h_4
    (MONAI's forward does not take precomputed hidden states, hence this copy of its wiring)."""
    enc0 = net.encoder1(x)
    enc1 = net.encoder2(hidden[0])
    enc2 = net.encoder3(hidden[1])
    enc3 = net.encoder4(hidden[2])
    dec4 = net.encoder10(hidden[4])
    dec3 = net.decoder5(dec4, hidden[3])
    dec2 = net.decoder4(dec3, enc3)
    dec1 = net.decoder3(dec2, enc2)
    dec0 = net.decoder2(dec1, enc1)
    return net.out(net.decoder1(dec0, enc0))


def swin_hidden_states(
    net: SwinUNETR, x: torch.Tensor, stage: int = 4, patch_size: int | None = None
) -> list[torch.Tensor]:
    """Hidden states h_0..h_stage of a plain MONAI ``SwinUNETR``'s ``swinViT`` for ``x``, each
    (B, C_k, ...), normalised as MONAI does; runs ``patch_embed`` and ``layers1..layers<stage>`` only."""
    if not 0 <= stage <= 4:
        raise ValueError(f"stage must be in 0..4, got {stage}")
    vit = net.swinViT
    patch = int(patch_size if patch_size is not None else vit.patch_size[0])
    unit = patch * 2**stage
    if any(s % unit for s in x.shape[2:]):
        raise ValueError(
            f"input spatial shape {tuple(x.shape[2:])} must be divisible by {unit} for stage {stage}"
        )
    normalize = net.normalize
    h = vit.pos_drop(vit.patch_embed(x))
    outs = [vit.proj_out(h, normalize)]
    for k in range(1, stage + 1):
        if vit.use_v2:
            h = getattr(vit, f"layers{k}c")[0](h.contiguous())
        h = getattr(vit, f"layers{k}")[0](h.contiguous())
        outs.append(vit.proj_out(h, normalize))
    return outs


class SwinBackbone(nn.Module):
    """A MONAI ``SwinUNETR`` (``self.net``) with stage-limited and full forwards."""

    def __init__(self, model_cfg: ModelConfig, out_channels: int = 1, **overrides: Any) -> None:
        super().__init__()
        kwargs = swinunetr_kwargs(model_cfg, out_channels)
        kwargs.update(overrides)
        self.kwargs = monai_swinunetr_kwargs(kwargs)
        self.net = SwinUNETR(**self.kwargs)
        self.feature_size = int(model_cfg.feature_size)
        self.patch_size = int(model_cfg.patch_size)
        self.use_v2 = bool(model_cfg.use_v2)

    def channels(self, stage: int) -> int:
        return tap_channels(self.feature_size, stage)

    def encode(self, x: torch.Tensor, stage: int = 4) -> list[torch.Tensor]:
        """Hidden states h_0..h_stage, each (B, C_k, ...), normalised as MONAI does
        (parameter-free LayerNorm over channels when ``normalize``)."""
        return swin_hidden_states(self.net, x, stage, self.patch_size)

    def decode(self, x: torch.Tensor, hidden: list[torch.Tensor]) -> torch.Tensor:
        return decode_swinunetr(self.net, x, hidden)

    def forward_full(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(net(x), [h_0..h_4])`` in one pass (the hidden states are reused, not recomputed)."""
        self.net._check_input_size(x.shape[2:])
        hidden = self.encode(x, 4)
        return self.decode(x, hidden), hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_full(x)[0]

    def swinunetr_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights keyed exactly as a plain MONAI ``SwinUNETR``."""
        return {k: v.detach().clone() for k, v in self.net.state_dict().items()}


def build_student_teacher(model_cfg: ModelConfig, out_channels: int = 1) -> tuple[SwinBackbone, SwinBackbone]:
    """A student backbone and its EMA teacher (an exact frozen copy in eval mode)."""
    from asa3d.models.ema import make_teacher

    student = SwinBackbone(model_cfg, out_channels)
    return student, make_teacher(student)
