"""``asa3d finetune`` / ``asa3d probe``: supervised segmentation with MONAI SwinUNETR (asa.md §10).

Defaults are the ASA supplement's downstream protocol: (1.5, 1.5, 1.5) mm, HU [-175, 250] -> [0, 1],
random 128^3 crops after padding, flips p=0.1 per axis, axial 90-degree rotations p=0.1, intensity
shift +-0.1 p=0.5, AdamW 1e-4 (wd 1e-5), Dice loss, 30,000 iterations at batch 1, sliding-window
inference (Gaussian, overlap 0.5), model selection = the final checkpoint.

Length: ``train.iterations`` is the primary knob (the paper counts iterations). ``train.epochs=N``
is accepted everywhere as an alternative: when set, iterations = ceil(N * n_train_cases /
batch_size), i.e. N passes over the (possibly label-fraction-reduced) training cases.

Run directory: ``config.yaml`` (resolved), ``transfer.json``, ``model_final.pt`` (a plain
state dict, ``torch.load(weights_only=True)``), ``model.json`` (model class + kwargs, mode,
preprocessing contract, label names, inference settings: all that ``asa3d predict`` needs),
``train_log.csv``, ``metrics.json`` + ``per_case.csv`` (test split, per case and class).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss, DiceLoss

from asa3d.config import ConfigError, save_config, to_dict
from asa3d.config_sections import DataConfig, ModelConfig, PreprocessConfig
from asa3d.engine.distributed import resolve_device
from asa3d.engine.precision import autocast, make_scaler
from asa3d.eval.metrics import case_metrics, json_safe, mean_over_classes, nanmean
from asa3d.eval.probe import prepare_model, trainable_parameters
from asa3d.eval.transfer import InitConfig, build_model, init_model

log = logging.getLogger(__name__)


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
    lr_schedule: Literal["constant", "warmup_cosine"] = "constant"
    warmup_iters: int = 0
    loss: Literal["dice", "dice_ce"] = "dice"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # fp16: with a GradScaler on CUDA
    flip_prob: float = 0.1  # per axis
    rot90_prob: float = 0.1  # axial plane, k in {1, 2, 3}
    shift_prob: float = 0.5
    shift_offset: float = 0.1  # intensity offset drawn from U(-offset, offset)
    grad_clip: float | None = None
    seed: int = 0
    device: str = "auto"
    val_every: int = 0  # iterations between validation passes (needs eval.val_split); 0: none
    select: Literal["final", "best"] = "final"  # best: by validation Dice (never the test split)
    log_every: int = 50
    num_threads: int = 0  # torch CPU threads (0: leave torch's default)

    def validate(self) -> None:
        if self.iterations < 1 or (self.epochs is not None and self.epochs < 1):
            raise ConfigError("train.iterations and train.epochs must be at least 1.")
        if self.batch_size < 1:
            raise ConfigError("train.batch_size must be at least 1.")
        check_roi(self.crop_size, "train.crop_size")


def check_roi(size: Sequence[int], where: str) -> None:
    """SwinUNETR needs multiples of 32, and its bottleneck (size / 32) more than one voxel:
    InstanceNorm refuses a single spatial element (so 32^3 fails; 32x32x64 works)."""
    if any(int(s) % 32 for s in size) or math.prod(int(s) // 32 for s in size) < 2:
        raise ConfigError(
            f"{where}={list(size)}: every side must be a multiple of 32 and at least one side "
            ">= 64 (SwinUNETR's bottleneck is size/32 and InstanceNorm needs > 1 voxel)."
        )


@dataclass
class ProbeConfig:
    """Options of the probing modes (``mode=probe`` / ``mode=strict_linear``)."""

    freeze_encoders: bool = False  # probe: also freeze encoder1-4 and encoder10
    stages: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])  # strict_linear: which h_i


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
    # liver Dice the field reports counts the tumour as liver (asa.md §10)
    merged_classes: dict[str, list[int]] = field(default_factory=dict)

    def validate(self) -> None:
        if self.roi_size is not None:
            check_roi(self.roi_size, "eval.roi_size")
        for name, ids in self.merged_classes.items():
            if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and i > 0 for i in ids):
                raise ConfigError(
                    f"eval.merged_classes.{name}={ids!r}: give a list of foreground label values, "
                    'e.g. eval.merged_classes={"liver": [1, 2]}'
                )
        if self.split is not None and self.split == self.val_split:
            raise ConfigError(
                f"eval.val_split={self.val_split!r} equals the test split: model selection on the test "
                "set inflates results (asa.md §10). Use a separate validation section."
            )


def _finetune_data() -> DataConfig:
    return DataConfig(preprocess=PreprocessConfig(spacing=(1.5, 1.5, 1.5)))


@dataclass
class FinetuneConfig:
    """``asa3d finetune`` / ``asa3d probe``."""

    mode: Literal["finetune", "probe", "strict_linear"] = "finetune"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=_finetune_data)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    init: InitConfig = field(default_factory=InitConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    eval: InferenceConfig = field(default_factory=InferenceConfig)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def n_classes_of(label_names: Mapping[int, str]) -> int:
    if not label_names:
        raise ConfigError("the dataset has no label names: fine-tuning needs labelled cases")
    return int(max(int(k) for k in label_names)) + 1


def total_iterations(cfg: FinetuneTrainConfig, n_train: int) -> int:
    if cfg.epochs is not None:
        return max(1, math.ceil(cfg.epochs * n_train / cfg.batch_size))
    return cfg.iterations


def augment(
    image: torch.Tensor, label: torch.Tensor, cfg: FinetuneTrainConfig, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched, seeded augmentations applied jointly to (B,1,X,Y,Z) image and label.

    Our own tensor ops rather than MONAI dict transforms: they run on the training device on the
    collated batch, draw from one seeded generator, and are four lines each.
    """
    out_i, out_l = [], []
    for b in range(image.shape[0]):
        im, lb = image[b], label[b]
        r = torch.rand(6, generator=gen)
        for ax in range(3):
            if r[ax] < cfg.flip_prob:
                im, lb = im.flip(ax + 1), lb.flip(ax + 1)
        if r[3] < cfg.rot90_prob:
            k = int(torch.randint(1, 4, (1,), generator=gen))
            if im.shape[1] != im.shape[2]:
                k = 2  # a non-square axial crop only keeps its shape under 180 degrees
            im, lb = torch.rot90(im, k, (1, 2)), torch.rot90(lb, k, (1, 2))
        if r[4] < cfg.shift_prob:
            im = im + (float(r[5]) * 2 - 1) * cfg.shift_offset
        out_i.append(im)
        out_l.append(lb)
    return torch.stack(out_i), torch.stack(out_l)


def _lr_lambda(cfg: FinetuneTrainConfig, total: int):
    def f(step: int) -> float:
        if cfg.lr_schedule == "constant":
            return 1.0
        if step < cfg.warmup_iters:
            return (step + 1) / max(1, cfg.warmup_iters)
        t = (step - cfg.warmup_iters) / max(1, total - cfg.warmup_iters)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def _positions(index: Any, ids: Sequence[str] | None) -> list[int]:
    cases = list(index.cases)
    if ids is None:
        return list(range(len(cases)))
    pos = {c.id: i for i, c in enumerate(cases)}
    missing = [i for i in ids if i not in pos]
    if missing:
        raise ConfigError(f"training case ids not in the dataset: {missing[:5]}")
    return [pos[i] for i in ids]


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_index(data: DataConfig, split: str | None = None) -> Any:
    """The cached, labelled index of ``split`` (default: ``data.split``)."""
    from asa3d.data.prepare import ensure_cache

    cfg = data if split is None else dataclasses.replace(data, split=split)
    return ensure_cache(cfg, with_labels=True)


def make_model(cfg: FinetuneConfig, n_classes: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    kwargs = cfg.model.swinunetr_kwargs(n_classes)
    return build_model(kwargs), kwargs


# --------------------------------------------------------------------------------------------
# inference + scoring
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def predict_volume(
    model: torch.nn.Module,
    image: np.ndarray | torch.Tensor,
    roi: Sequence[int],
    overlap: float = 0.5,
    mode: str = "gaussian",
    sw_batch_size: int = 1,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
) -> np.ndarray:
    """Label map (argmax) of one preprocessed volume (X, Y, Z) with sliding windows."""
    x = torch.as_tensor(np.asarray(image), dtype=torch.float32)[None, None].to(device)
    was_training = model.training
    model.eval()
    dev = torch.device(device)
    with autocast(precision, dev):
        logits = sliding_window_inference(
            x, tuple(int(r) for r in roi), sw_batch_size, model, overlap=overlap, mode=mode
        )
    model.train(was_training)
    return logits.float().argmax(1)[0].to(torch.uint8 if logits.shape[1] < 256 else torch.int16).cpu().numpy()


def score_cases(
    model: torch.nn.Module,
    index: Any,
    cfg: FinetuneConfig,
    n_classes: int,
    device: torch.device,
    pred_dir: Path | None = None,
) -> list[dict[str, Any]]:
    """Per-case rows ``{id, metric: {class_name: value}}`` on ``eval.grid``."""
    names = {int(k): str(v) for k, v in index.label_names.items()}
    roi = cfg.eval.roi_size or cfg.train.crop_size
    rows = []
    cases = list(index.cases)[: cfg.eval.max_cases] if cfg.eval.max_cases else list(index.cases)
    for case in cases:
        gt = case.label()
        if gt is None:
            raise ConfigError(f"case {case.id} has no label: the test split must be labelled")
        pred = predict_volume(
            model,
            case.image(),
            roi,
            cfg.eval.overlap,
            cfg.eval.mode,
            cfg.eval.sw_batch_size,
            device,
            cfg.train.precision,
        )
        spacing = case.spacing
        scored = pred
        if cfg.eval.grid == "native":
            scored, gt, spacing = _to_native(pred, case)
        m = case_metrics(
            scored,
            gt,
            n_classes,
            spacing=spacing,
            metrics=cfg.eval.metrics,
            nsd_tolerance_mm=cfg.eval.nsd_tolerance_mm,
        )
        row: dict[str, Any] = {"id": case.id}
        for metric, vals in m.items():
            row[metric] = {
                names.get(c, f"class{c}"): v for c, v in zip(range(1, n_classes), vals, strict=True)
            }
        for name, ids in cfg.eval.merged_classes.items():
            region = case_metrics(
                np.isin(scored, ids).astype(np.uint8),
                np.isin(gt, ids).astype(np.uint8),
                2,
                spacing=spacing,
                metrics=cfg.eval.metrics,
                nsd_tolerance_mm=cfg.eval.nsd_tolerance_mm,
            )
            for metric, vals in region.items():
                if name in row[metric]:
                    raise ConfigError(f"eval.merged_classes: {name!r} is already a class name")
                row[metric][name] = vals[0]
        rows.append(row)
        if pred_dir is not None:
            pred_dir.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(pred_dir / f"{case.id}.npz", pred=pred)
    return rows


def _to_native(pred: np.ndarray, case: Any) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Prediction on the source grid + the source label map + source spacing."""
    from asa3d.data.io import read_volume
    from asa3d.eval.predict import labels_to_source

    if not getattr(case, "label_source", None):
        raise ConfigError(f"eval.grid=native: case {case.id} records no label source file")
    gt_vol = read_volume(case.label_source)
    native = labels_to_source(pred, case.affine, case.source_affine, case.source_shape)
    return native, np.rint(gt_vol.array).astype(np.int16), gt_vol.spacing


def summarise(
    rows: Sequence[Mapping[str, Any]], metrics: Sequence[str], exclude: Collection[str] = ()
) -> dict[str, Any]:
    """Mean per class over cases (NaN-excluded) and the overall mean of those class means
    (``exclude``: merged regions, reported per class but left out of the mean)."""
    out: dict[str, Any] = {}
    for metric in metrics:
        classes = list(rows[0][metric]) if rows else []
        per_class = {c: nanmean([r[metric][c] for r in rows]) for c in classes}
        out[metric] = {"per_class": per_class, "mean": mean_over_classes(per_class, exclude)}
    return out


def write_per_case_csv(
    path: Path, rows: Sequence[Mapping[str, Any]], extra: Mapping[str, Any] | None = None
) -> None:
    """Long format: one line per (case, metric, class)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        keys = list(extra or {})
        w.writerow(keys + ["case", "metric", "class", "value"])
        for r in rows:
            for metric, vals in r.items():
                if metric == "id":
                    continue
                for cls, v in vals.items():
                    w.writerow([extra[k] for k in keys] + [r["id"], metric, cls, v])


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------
def run_finetune(
    cfg: FinetuneConfig,
    out_dir: str | Path,
    train_ids: Sequence[str] | None = None,
    train_index: Any = None,
    test_index: Any = None,
    val_index: Any = None,
) -> dict[str, Any]:
    """Train and score one model; returns the metrics document (also written to ``metrics.json``).

    ``train_ids`` restricts training to those case ids (label fractions); indices may be passed
    in by the evaluation grid so the cache is opened once.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tc = cfg.train
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed % (2**32))
    device = resolve_device(tc.device)
    save_config(cfg, out / "config.yaml")

    train_index = train_index if train_index is not None else load_index(cfg.data)
    n_classes = n_classes_of(train_index.label_names)
    model, kwargs = make_model(cfg, n_classes)
    contract = cfg.data.preprocess.contract()
    report = init_model(model, cfg.init, run_dir=out, contract=contract)
    net = prepare_model(model, cfg.mode, n_classes, cfg.probe.freeze_encoders, cfg.probe.stages).to(device)

    from asa3d.data.dataset import CachedVolumeDataset, collate_volumes
    from asa3d.methods.base import SampleSpec

    positions = _positions(train_index, train_ids)
    ds = CachedVolumeDataset(
        train_index,
        SampleSpec("crop", tuple(tc.crop_size)),
        seed=tc.seed,
        with_labels=True,
        balanced=tc.balanced_crops,
    )
    subset = torch.utils.data.Subset(ds, positions)
    gen = torch.Generator().manual_seed(tc.seed)
    loader = torch.utils.data.DataLoader(
        subset,
        batch_size=tc.batch_size,
        shuffle=True,
        generator=gen,
        collate_fn=collate_volumes,
        num_workers=cfg.data.num_workers,
        persistent_workers=False,
    )
    total = total_iterations(tc, len(positions))
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(tc, total))
    if tc.loss == "dice":
        loss_fn: torch.nn.Module = DiceLoss(to_onehot_y=True, softmax=True, include_background=True)
    else:
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=True)
    aug_gen = torch.Generator().manual_seed(tc.seed + 1)
    scaler = make_scaler(tc.precision, device)

    if val_index is None and cfg.eval.val_split and (tc.val_every or tc.select == "best"):
        val_index = load_index(cfg.data, cfg.eval.val_split)
    if tc.select == "best" and val_index is None:
        raise ConfigError("train.select=best needs eval.val_split (a validation section, not the test split)")

    log_rows: list[tuple[int, float, float]] = []
    val_hist: list[dict[str, float]] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    it, epoch = 0, 0
    net.train()
    log.info(
        "%s: %d iterations on %d cases, %d trainable params (%s)",
        cfg.mode,
        total,
        len(positions),
        sum(p.numel() for p in params),
        device,
    )
    while it < total:
        if hasattr(ds, "set_epoch"):
            ds.set_epoch(epoch)
        for batch in loader:
            img = batch["image"].to(device)
            lbl = batch["label"].to(device).long()
            img, lbl = augment(img, lbl, tc, aug_gen)
            with autocast(tc.precision, device):
                logits = net(img)
            loss = loss_fn(logits.float(), lbl)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at iteration {it}")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if tc.grad_clip:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
            scaler.step(opt)  # skips the step when fp16 gradients overflowed
            scaler.update()
            sched.step()
            it += 1
            log_rows.append((it, loss.item(), float(sched.get_last_lr()[0])))
            if tc.log_every and it % tc.log_every == 0:
                log.info("iter %d/%d loss %.4f", it, total, log_rows[-1][1])
            if val_index is not None and tc.val_every and (it % tc.val_every == 0 or it == total):
                rows = score_cases(net, val_index, _dice_only(cfg), n_classes, device)
                vd = summarise(rows, ["dice"])["dice"]["mean"]
                val_hist.append({"iteration": it, "val_dice": vd})
                if best is None or (not math.isnan(vd) and vd > best[0]):
                    best = (vd, it, {k: v.detach().clone() for k, v in net.state_dict().items()})
            if it >= total:
                break
        epoch += 1

    with open(out / "train_log.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["iteration", "loss", "lr"])
        w.writerows(log_rows)
    final_state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    _atomic_torch_save(final_state, out / "model_final.pt")
    selected = "final"
    if tc.select == "best" and best is not None:
        _atomic_torch_save({k: v.cpu() for k, v in best[2].items()}, out / "model_best.pt")
        net.load_state_dict(best[2])
        selected = f"best (iteration {best[1]}, validation Dice {best[0]:.4f})"
    model_info = {
        "format": "asa3d-finetune/1",
        "model_class": "monai.networks.nets.SwinUNETR",
        "model_kwargs": to_dict(kwargs),
        "mode": cfg.mode,
        "probe": to_dict(cfg.probe),
        "n_classes": n_classes,
        "label_names": {str(k): v for k, v in train_index.label_names.items()},
        "preprocessing": contract,
        "inference": {
            "roi_size": list(cfg.eval.roi_size or tc.crop_size),
            "overlap": cfg.eval.overlap,
            "mode": cfg.eval.mode,
            "sw_batch_size": cfg.eval.sw_batch_size,
        },
        "weights": "model_best.pt" if selected != "final" else "model_final.pt",
    }
    _atomic_write_text(out / "model.json", json.dumps(model_info, indent=1))

    losses = [r[1] for r in log_rows]
    k = max(1, min(10, len(losses) // 4))
    doc: dict[str, Any] = {
        "mode": cfg.mode,
        "init": cfg.init.source,
        "iterations": total,
        "train_cases": len(positions),
        "train_ids": [list(train_index.cases)[p].id for p in positions],
        "seed": tc.seed,
        "selected": selected,
        "transfer": report.summary(),
        "loss_first": float(np.mean(losses[:k])),
        "loss_last": float(np.mean(losses[-k:])),
        "validation": val_hist,
        "grid": cfg.eval.grid,
    }
    if cfg.eval.split is not None:
        test_index = test_index if test_index is not None else load_index(cfg.data, cfg.eval.split)
        pred_dir = out / "predictions" if cfg.eval.save_predictions else None
        rows = score_cases(net, test_index, cfg, n_classes, device, pred_dir)
        doc["test_split"] = cfg.eval.split
        doc["per_case"] = rows
        doc["summary"] = summarise(rows, cfg.eval.metrics, exclude=cfg.eval.merged_classes)
        write_per_case_csv(out / "per_case.csv", rows)
    doc["seconds"] = round(time.time() - t0, 2)
    _atomic_write_text(out / "metrics.json", json.dumps(json_safe(doc), indent=1, default=_json_default))
    return doc


def _dice_only(cfg: FinetuneConfig) -> FinetuneConfig:
    return dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, metrics=["dice"], max_cases=None))


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def trainable_names(net: torch.nn.Module) -> list[str]:
    return trainable_parameters(net)
