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
        """Keyword arguments for MONAI's network (kept for callers; the backbone module owns them)."""
        from asa3d.models.backbones.swinunetr import swinunetr_kwargs

        return swinunetr_kwargs(self, out_channels)


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
    # btcv | amos22_paper | amos22_ct | lits | pancreas_ct | luna16 | msd; 2D: phantom_drr | chestxray14
    preset: str | None = None
    labels: str | None = None  # folder of label maps matched by file name (folder datalists)
    split: str = "training"  # which datalist section to use
    cache_dir: str | None = None  # default: <root>/.asa3d_cache or ~/.cache/asa3d
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    skip_bad: bool = False  # report and skip unreadable/invalid scans instead of stopping
    num_workers: int = 2


@dataclass
class TrainConfig:
    """The optimisation loop shared by all methods (``asa3d.engine``)."""

    # How long, in one of two units (never both; docs/engine.md, "LR schedules"):
    # rounds (one pass of every phase; default 400, with 5 warm-up rounds), or optimiser steps
    # (total_steps, warmup_steps: papers that count steps, e.g. Swin UNETR SSL's 500 of 100k).
    epochs: int | None = None  # None: 400 unless total_steps is given
    batch_size: int = 12  # global batch (split across ranks); per GPU with batch_scope: per_rank
    # global: batch_size is the whole step's batch, split across ranks (the lr is for it);
    # per_rank: batch_size volumes per process, so the global batch is batch_size x world_size and
    # grows with the GPUs at a fixed lr (as reference code that sets a per-GPU batch behaves)
    batch_scope: Literal["global", "per_rank"] = "global"
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 1e-3  # base LR for the global batch
    momentum: float = 0.9
    weight_decay: float = 0.0
    amsgrad: bool = False  # AdamW's AMSGrad variant (VoCo's released code); adamw only
    warmup_epochs: int | None = None  # None: 5 unless total_steps is given
    total_steps: int | None = None  # optimiser steps of the whole run (replaces epochs)
    warmup_steps: int | None = None  # warm-up steps of the step schedule (default 0; replaces warmup_epochs)
    lr_schedule: Literal["epoch_cosine", "iter_cosine", "constant"] = "epoch_cosine"
    min_lr: float = 0.0  # where the cosine ends (SimMIM: 1e-5); 0 as ASA
    warmup_start_lr: float = 0.0  # where the cosine's linear warm-up starts (SimMIM: 1e-6)
    # linear scaling rule (Goyal et al. 2017): when > 0, lr, min_lr and warmup_start_lr are given
    # for this global batch and multiplied by batch_size / lr_reference_batch (SimMIM: 512)
    lr_reference_batch: int = 0
    phase_alternation: Literal["epoch", "iteration"] = "epoch"
    # the last incomplete batch of a pass: false = filled by wrapping around to the pass's first
    # volumes (every volume seen each pass); true = dropped, as the ASA reference code's loader
    # does. The paper does not say; false keeps every volume in every pass.
    drop_last: bool = False
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # bf16 training on a CPU: off trains in fp32 there (oneDNN's bf16 conv3d weight gradients are
    # unreliable on CPUs; docs/scaling.md, 'Precision'); on forces bf16 autocast.
    cpu_bf16: bool = False
    grad_accum: int = 1
    grad_clip: float | None = None
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"  # auto | cpu | cuda
    ckpt_every_iters: int = 0  # 0: only at the end of each round
    keep_last: int = 3
    log_every: int = 10
    monitor_every: int = 50
    image_every: int = 500  # iterations between TensorBoard image summaries (the method's views); 0: none
    max_bad_steps: int = 5  # consecutive NaN/inf steps before the run stops
    max_iters_per_phase: int | None = None  # cap iterations of each phase pass (smoke tests)
    progress: bool = True

    def __post_init__(self) -> None:
        # the rounds' defaults apply only when the run is not measured in steps (validate() refuses
        # a mix), and here rather than as field defaults so that "not given" stays visible
        if self.total_steps is None and self.warmup_steps is None:
            self.epochs = 400 if self.epochs is None else self.epochs
            self.warmup_epochs = 5 if self.warmup_epochs is None else self.warmup_epochs

    @property
    def step_based(self) -> bool:
        """True when the run is measured in optimiser steps (``total_steps``), not rounds."""
        return self.total_steps is not None

    def validate(self) -> None:
        if self.total_steps is None and self.warmup_steps is not None:
            raise ConfigError(
                f"train.warmup_steps={self.warmup_steps} needs train.total_steps (the run's length in "
                "optimiser steps); or use train.warmup_epochs with train.epochs."
            )
        if self.step_based:
            given = [k for k in ("epochs", "warmup_epochs") if getattr(self, k) is not None]
            if given:
                raise ConfigError(
                    f"train.total_steps={self.total_steps} measures the run in optimiser steps, but "
                    f"{', '.join('train.' + k for k in given)} measure(s) it in rounds: give one unit, "
                    "not both. Set " + " ".join(f"train.{k}=null" for k in given) + " (and "
                    "train.warmup_steps for the warm-up), or drop train.total_steps/warmup_steps."
                )
            assert self.total_steps is not None
            self.warmup_steps = 0 if self.warmup_steps is None else self.warmup_steps
            if self.total_steps < 1 or not 0 <= self.warmup_steps <= self.total_steps:
                raise ConfigError(
                    f"train.total_steps={self.total_steps}, train.warmup_steps={self.warmup_steps}: "
                    "need total_steps >= 1 and 0 <= warmup_steps <= total_steps."
                )
            if self.lr_schedule == "epoch_cosine":
                raise ConfigError(
                    "train.lr_schedule=epoch_cosine sets the LR once per round, which a step-based run "
                    "(train.total_steps) does not have: use train.lr_schedule=iter_cosine (warm-up "
                    "cosine per step) or constant."
                )
        else:
            assert self.epochs is not None and self.warmup_epochs is not None  # __post_init__
            if self.epochs < 1:
                raise ConfigError(f"train.epochs={self.epochs}: must be at least 1.")
            if self.warmup_epochs < 0:
                raise ConfigError(f"train.warmup_epochs={self.warmup_epochs}: must be >= 0.")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("train.batch_size and train.grad_accum must be at least 1.")
        if self.amsgrad and self.optimizer != "adamw":
            raise ConfigError(f"train.amsgrad=true needs train.optimizer=adamw (got {self.optimizer!r}).")

    def global_batch(self, world_size: int) -> int:
        """Volumes per optimiser step over all ranks (``batch_scope`` decides what batch_size counts)."""
        return self.batch_size * world_size if self.batch_scope == "per_rank" else self.batch_size


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
