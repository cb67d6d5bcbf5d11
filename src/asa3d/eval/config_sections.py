"""Schemas of the downstream verbs (``finetune``, ``probe``, ``evaluate``): dataclasses only.

Kept apart from the modules that run them (``finetune``, ``transfer``, ``evaluate`` import torch
and MONAI) so that ``asa3d VERB --help`` can show every key and its default without importing
torch; those modules re-export these names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from asa3d.config import ConfigError
from asa3d.config_sections import DataConfig, ModelConfig, PreprocessConfig


@dataclass
class InitConfig:
    """Where the segmentation model's initial weights come from."""

    source: str = "scratch"  # scratch | path to .pt checkpoint / .safetensors export / state dict
    key_map: list[str] = field(default_factory=list)  # "from_prefix:to_prefix" rename rules
    expect: Literal["auto", "encoder", "all"] = "auto"  # keys that must all match (auto: by source)
    allow_partial: bool = False  # accept a load that leaves expected keys unmatched


@dataclass
class FinetuneTrainConfig:
    """The supervised loop (``train.*``)."""

    iterations: int = 30000  # optimiser steps (paper: 30,000)
    epochs: int | None = None  # alternative: passes over the training cases (overrides iterations)
    batch_size: int = 1
    crop_size: tuple[int, int, int] = (128, 128, 128)
    balanced_crops: bool = False  # 1:1 foreground/background crop centres (data layer option)
    lr: float = 1e-4
    weight_decay: float = 1e-5
    adam_eps: float = 1e-8  # AdamW eps (PyTorch default); larger: smaller steps for near-zero gradients
    lr_schedule: Literal["constant", "warmup_cosine"] = "constant"
    warmup_iters: int = 0
    loss: Literal["dice", "dice_ce"] = "dice"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # fp16: with a GradScaler on CUDA
    cpu_bf16: bool = False  # bf16 training on a CPU (off: fp32 there; docs/scaling.md, 'Precision')
    flip_prob: float = 0.1  # per axis
    rot90_prob: float = 0.1  # axial plane, k in {1, 2, 3}
    shift_prob: float = 0.5
    shift_offset: float = 0.1  # intensity offset drawn from U(-offset, offset)
    rotation_deg: float = 7.0  # 2D only: in-plane rotation drawn from U(-deg, deg) (Adam's protocol)
    grad_clip: float | None = None
    seed: int = 0
    device: str = "auto"
    val_every: int = 0  # iterations between validation passes (needs eval.val_split); 0: none
    select: Literal["final", "best"] = "final"  # best: by validation Dice (never the test split)
    log_every: int = 50
    progress: bool = True  # a tqdm bar with ETA and the loss (stderr); TensorBoard scalars are always written
    num_threads: int = 0  # torch CPU threads (0: leave torch's default)
    deterministic: bool = False  # bitwise-reproducible kernels (as pretraining's train.deterministic)
    # iterations between resumable checkpoints in RUN/checkpoints (model, optimiser, scheduler, scaler,
    # data order, augmentation and RNG states); one is also written at the end of training and on
    # SIGTERM/SIGINT, and the folder is removed once metrics.json is written. 0: only those two.
    ckpt_every: int = 1000
    max_bad_steps: int = 5  # consecutive NaN/inf steps (each skipped) before the run stops, as pretraining

    def validate(self) -> None:
        if self.iterations < 1 or (self.epochs is not None and self.epochs < 1):
            raise ConfigError("train.iterations and train.epochs must be at least 1.")
        if self.ckpt_every < 0 or self.max_bad_steps < 1:
            raise ConfigError("train.ckpt_every must be >= 0 and train.max_bad_steps >= 1.")
        if self.batch_size < 1:
            raise ConfigError("train.batch_size must be at least 1.")


@dataclass
class ProbeConfig:
    """Options of the probing modes (``mode=probe`` / ``mode=strict_linear``)."""

    freeze_encoders: bool = (
        False  # probe: also freeze the backbone's skip-path parts (BackboneSpec.skip_parts)
    )
    stages: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])  # strict_linear: which scales
    # probe parts the init's pretraining never trained (random weights; its record says so):
    # refused unless true
    allow_untrained: bool = False


@dataclass
class InferenceConfig:
    """Sliding-window inference and scoring (``eval.*``)."""

    split: str | None = "validation"  # datalist section scored as the test set (None: no test)
    val_split: str | None = None  # section used for validation / best-model selection
    roi_size: tuple[int, int, int] | None = None  # default: train.crop_size
    overlap: float = 0.5
    mode: Literal["gaussian", "constant"] = "gaussian"
    sw_batch_size: int = 1
    metrics: list[str] = field(default_factory=lambda: ["dice"])  # dice | hd95 | nsd
    nsd_tolerance_mm: float = 2.0
    # where Dice is computed: the preprocessed grid the model sees (paper), or each scan's original
    # grid (prediction resampled back nearest-neighbour, as `asa3d predict` does; GT read from source)
    grid: Literal["resampled", "native"] = "resampled"
    save_predictions: bool = False  # write predictions (uint8 .npz, resampled grid) to the run dir
    max_cases: int | None = None  # score only the first N test cases (smoke runs)
    # extra scored regions, each the union of label values, e.g. LiTS {"liver": [1, 2]}: the
    # liver Dice the field reports counts the tumour as liver (docs/evaluation.md)
    merged_classes: dict[str, list[int]] = field(default_factory=dict)

    def validate(self) -> None:
        for name, ids in self.merged_classes.items():
            if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and i > 0 for i in ids):
                raise ConfigError(
                    f"eval.merged_classes.{name}={ids!r}: give a list of foreground label values, "
                    'e.g. eval.merged_classes={"liver": [1, 2]}'
                )
        if self.split is not None and self.split == self.val_split:
            raise ConfigError(
                f"eval.val_split={self.val_split!r} equals the test split: model selection on the test "
                "set inflates results (docs/evaluation.md). Use a separate validation section."
            )


@dataclass
class NetworkConfig:
    """The downstream network (``network.*``): ``default`` is the ``model:`` section's; any other
    name is a backbone family that builds from ``options`` (docs/evaluation.md, "2D tasks")."""

    name: str = "default"
    options: dict[str, Any] = field(default_factory=dict)  # e.g. depth, widths, in_channels


@dataclass
class Image2DConfig:
    """How 2D images enter the network (``image2d.*``): as the pretraining fed them."""

    channels: int = 1  # 3: grey replicated to three channels (as Adam's published 2D pretraining)
    normalize: Literal["none", "imagenet"] = "none"  # imagenet: mean/std (one channel: 0.449 / 0.226)
    size: int | None = None  # resize every image to size x size (ChestX-ray14: 224); None: as stored
    batch_size: int = 16  # images per forward at scoring time

    def validate(self) -> None:
        if self.channels not in (1, 3):
            raise ConfigError(f"image2d.channels={self.channels}: 1 or 3")
        if self.size is not None and self.size < 16:
            raise ConfigError(f"image2d.size={self.size}: at least 16 pixels")


def _finetune_data() -> DataConfig:
    return DataConfig(preprocess=PreprocessConfig(spacing=(1.5, 1.5, 1.5)))


@dataclass
class FinetuneConfig:
    """``asa3d finetune`` / ``asa3d probe``."""

    mode: Literal["finetune", "probe", "strict_linear"] = "finetune"
    # segmentation (label maps; 3D volumes or 2D images) or classification (2D images, multi-label)
    task: Literal["segmentation", "classification"] = "segmentation"
    model: ModelConfig = field(default_factory=ModelConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    data: DataConfig = field(default_factory=_finetune_data)
    image2d: Image2DConfig = field(default_factory=Image2DConfig)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    init: InitConfig = field(default_factory=InitConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    eval: InferenceConfig = field(default_factory=InferenceConfig)

    def validate(self) -> None:
        if self.task == "classification":
            if list(self.eval.metrics) != ["auc"]:
                raise ConfigError(
                    f"task=classification is scored by AUC: set eval.metrics=[auc] (got {self.eval.metrics})."
                )
            if self.train.select == "best" or self.mode == "strict_linear":
                raise ConfigError(
                    "task=classification: train.select=final and mode finetune or probe (a linear "
                    "head on the frozen encoder)."
                )
        elif "auc" in self.eval.metrics:
            raise ConfigError("eval.metrics: auc scores task=classification; segmentation: dice, hd95, nsd.")


@dataclass
class InitSpec:
    """One named initialisation of the grid."""

    name: str = "scratch"
    source: str = "scratch"  # scratch | checkpoint / export / state-dict path
    # pretrain with this config first, in-process as `asa3d pretrain` (source = its last checkpoint)
    pretrain_config: str | None = None
    pretrain_overrides: list[str] = field(default_factory=list)
    key_map: list[str] = field(default_factory=list)
    expect: Literal["auto", "encoder", "all"] = "auto"
    allow_partial: bool = False


@dataclass
class GridConfig:
    inits: list[InitSpec] = field(default_factory=lambda: [InitSpec()])
    modes: list[Literal["finetune", "probe", "strict_linear"]] = field(
        default_factory=lambda: ["finetune", "probe"]
    )
    fractions: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.5, 1.0])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    reference: str = "scratch"  # the init every other init is compared with in stats
    table_style: Literal["auto", "plain", "btcv"] = "auto"  # btcv: also the paper's 12 columns
    keep_models: bool = False  # keep each cell's model_final.pt (large at paper scale)
    n_boot: int = 10000
    # when data.root is unset: write a phantom data set into OUT/phantom first, with these
    # write_phantom_dataset arguments (n, n_validation, shape, spacing, seed); lets one command run
    # from a fresh clone
    phantom: dict[str, Any] | None = None
    plots: bool = True
    report: bool = True

    def validate(self) -> None:
        names = [i.name for i in self.inits]
        if len(set(names)) != len(names):
            raise ConfigError(f"grid.inits: names must be unique, got {names}")
        if not self.inits:
            raise ConfigError("grid.inits: at least one initialisation")
        for f in self.fractions:
            if not 0 < f <= 1:
                raise ConfigError(f"grid.fractions: {f} is not in (0, 1]")


@dataclass
class EvaluateConfig(FinetuneConfig):
    """Every key of ``asa3d finetune`` (the per-cell recipe) plus ``grid``."""

    grid: GridConfig = field(default_factory=GridConfig)
