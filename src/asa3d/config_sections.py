"""Config sections shared by every training command (pretrain, finetune, probe, evaluate).

Defaults are paper scale (what a GPU user gets); ``configs/*_tiny.yaml`` shrink them for a CPU.
Method-specific options live in each method's own dataclass (``asa3d.methods.<name>``) and are
validated when the method is built, keyed by ``method.name``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from asa3d.config import ConfigError


@dataclass
class ModelConfig:
    """MONAI SwinUNETR hyper-parameters (``monai.networks.nets.SwinUNETR``)."""

    feature_size: int = 48
    in_channels: int = 1
    patch_size: int = 2
    window_size: int = 7
    depths: tuple[int, int, int, int] = (2, 2, 2, 2)
    num_heads: tuple[int, int, int, int] = (3, 6, 12, 24)
    norm_name: str = "instance"
    normalize: bool = True
    use_v2: bool = False
    drop_path_rate: float = 0.1
    use_checkpoint: bool = False  # gradient checkpointing inside the Swin blocks (saves memory)
    # MONAI's scaled-dot-product window attention. MONAI applies it only where autograd is off
    # (EMA-teacher forwards, sliding-window inference), so training gradients are unchanged; it
    # halves the cost of those forwards on CPU and GPU. Dropped silently on a MONAI without it.
    use_flash_attention: bool = True

    def validate(self) -> None:
        if self.feature_size % 12 != 0:
            raise ConfigError(
                f"model.feature_size={self.feature_size}: SwinUNETR needs a multiple of 12 (12, 24, 48)."
            )

    def swinunetr_kwargs(self, out_channels: int) -> dict[str, Any]:
        """Keyword arguments for ``SwinUNETR`` (no ``img_size``: refused by MONAI >= 1.5)."""
        return dict(
            in_channels=self.in_channels,
            out_channels=out_channels,
            feature_size=self.feature_size,
            patch_size=self.patch_size,
            window_size=self.window_size,
            depths=tuple(self.depths),
            num_heads=tuple(self.num_heads),
            norm_name=self.norm_name,
            normalize=self.normalize,
            use_v2=self.use_v2,
            drop_path_rate=self.drop_path_rate,
            use_checkpoint=self.use_checkpoint,
            use_flash_attention=self.use_flash_attention,
            spatial_dims=3,
        )


@dataclass
class PreprocessConfig:
    """Canonical preprocessing: the contract a checkpoint records and a downstream user must match."""

    orientation: str = "RAS"
    spacing: tuple[float, float, float] = (1.5, 1.5, 2.0)  # mm, array axes (x, y, z) after RAS
    window: tuple[float, float] = (-175.0, 250.0)  # HU clipped to this range, scaled to [0, 1]
    image_interp: Literal["bilinear", "nearest"] = "bilinear"

    def validate(self) -> None:
        if self.window[0] >= self.window[1]:
            raise ConfigError(f"preprocess.window={self.window}: the lower bound must be below the upper.")
        if min(self.spacing) <= 0:
            raise ConfigError(f"preprocess.spacing={self.spacing}: spacings must be positive (mm).")

    def contract(self) -> dict[str, Any]:
        return {
            "orientation": self.orientation,
            "spacing_mm": list(self.spacing),
            "hu_window": list(self.window),
            "intensity_range": [0.0, 1.0],
            "axis_order": "channel-first, then array axes x, y, z of the RAS-oriented volume (MONAI)",
        }


@dataclass
class DataConfig:
    """Where the scans are and how they are cached."""

    root: str | None = None  # a folder of scans, a dataset.json, or a preset's download folder
    preset: str | None = None  # btcv | amos22_paper | amos22_ct | lits | pancreas_ct | luna16 | msd
    labels: str | None = None  # folder of label maps matched by file name (folder datalists)
    split: str = "training"  # which datalist section to use
    cache_dir: str | None = None  # default: <root>/.asa3d_cache or ~/.cache/asa3d
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    skip_bad: bool = False  # report and skip unreadable/invalid scans instead of stopping
    num_workers: int = 2


@dataclass
class TrainConfig:
    """The optimisation loop shared by all methods (``asa3d.engine``)."""

    epochs: int = 400  # rounds: one pass of every phase
    batch_size: int = 12  # global batch (split across ranks)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 1e-3  # base LR for the global batch
    momentum: float = 0.9
    weight_decay: float = 0.0
    warmup_epochs: int = 5
    lr_schedule: Literal["epoch_cosine", "iter_cosine", "constant"] = "epoch_cosine"
    phase_alternation: Literal["epoch", "iteration"] = "epoch"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_accum: int = 1
    grad_clip: float | None = None
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"  # auto | cpu | cuda
    ckpt_every_iters: int = 0  # 0: only at the end of each round
    keep_last: int = 3
    log_every: int = 10
    monitor_every: int = 50
    max_bad_steps: int = 5  # consecutive NaN/inf steps before the run stops
    max_iters_per_phase: int | None = None  # cap iterations of each phase pass (smoke tests)
    progress: bool = True

    def validate(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"train.epochs={self.epochs}: must be at least 1.")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("train.batch_size and train.grad_accum must be at least 1.")


@dataclass
class PretrainConfig:
    """``asa3d pretrain``: method + backbone + data + loop."""

    method: dict[str, Any] = field(default_factory=lambda: {"name": "asa"})
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        if "name" not in self.method:
            raise ConfigError("method.name is required (e.g. method.name=asa).")
