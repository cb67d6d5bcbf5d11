"""``asa3d finetune`` / ``asa3d probe``: supervised training of a downstream model (docs/evaluation.md).

The network is the backbone spec's (``finetune_spec``: by default the one the ``model:`` section
describes, with one output channel per class); nothing here names a network. Inference and
scoring live in ``asa3d.eval.inference`` and ``asa3d.eval.results``.

Defaults are the ASA supplement's downstream protocol: (1.5, 1.5, 1.5) mm, HU [-175, 250] -> [0, 1],
random 128^3 crops after padding, flips p=0.1 per axis, axial 90-degree rotations p=0.1, intensity
shift +-0.1 p=0.5, AdamW 1e-4 (wd 1e-5), Dice loss, 30,000 iterations at batch 1, sliding-window
inference (Gaussian, overlap 0.5), model selection = the final checkpoint.

Length: ``train.iterations`` is the primary knob (the paper counts iterations). ``train.epochs=N``
is accepted everywhere as an alternative: when set, iterations = ceil(N * n_train_cases /
batch_size), i.e. N passes over the (possibly label-fraction-reduced) training cases.

Run directory: ``config.yaml`` (resolved), ``transfer.json``, ``model_final.pt`` (a plain
state dict, ``torch.load(weights_only=True)``), ``model.json`` (backbone spec, mode, preprocessing
contract, label names, inference settings: all that ``asa3d predict`` needs), ``train_log.csv``,
``provenance.json``, ``metrics.json`` (written last: its presence marks a finished run) +
``per_case.csv`` (test split, per case and class). A run that starts fresh (no checkpoint to
resume, or ``overwrite``) first deletes every output an earlier run left in the folder
(``RUN_OUTPUTS``), so nothing of an old run can pass for the new one's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from asa3d import __version__, provenance
from asa3d.atomic import atomic_write_text, atomic_write_with, remove_stale_tmp
from asa3d.config import ConfigError, save_config, to_dict
from asa3d.config_sections import DataConfig
from asa3d.engine import checkpoint as ckpt_io
from asa3d.engine.checkpoint import CheckpointError, latest_checkpoint
from asa3d.engine.distributed import DistEnv, barrier, broadcast_module_state, cleanup, init_distributed
from asa3d.engine.metrics_log import MetricsLogger
from asa3d.engine.precision import make_scaler, set_deterministic, training_precision
from asa3d.engine.run_dir import resolve_resume
from asa3d.engine.step import (  # noqa: F401  TrainingDiverged re-exported for the CLI
    NonFinitePolicy,
    TrainingDiverged,
    TrainingInterrupted,
    install_stop_handlers,
    optimisation_step,
    restore_handlers,
    signal_name,
)
from asa3d.eval.config_sections import (  # noqa: F401  re-exported: the schemas live in a light module
    FinetuneConfig,
    FinetuneTrainConfig,
    InferenceConfig,
    ProbeConfig,
)
from asa3d.eval.probe import frozen_parts, prepare_model
from asa3d.eval.results import json_text, score_cases, summarise, write_csv, write_per_case_csv
from asa3d.eval.transfer import TransferReport, init_model
from asa3d.models.backbones import BackboneError, BackboneSpec, default_spec, network_spec
from asa3d.progress import BarFactory, console_bar

log = logging.getLogger(__name__)

CKPT_FORMAT = "asa3d-finetune-checkpoint/1"
CKPT_DIR = "checkpoints"  # inside the run dir; removed once metrics.json is written
FINISHED = "metrics.json"  # written last: a run dir holding it is a finished run
# everything a run writes into its folder: deleted before a fresh start (nothing else is touched)
RUN_OUTPUTS = (
    "config.yaml",
    "transfer.json",
    "model.json",
    "model_final.pt",
    "model_best.pt",
    "train_log.csv",
    "per_case.csv",
    "metrics.jsonl",
    "provenance.json",
    "report.html",
    FINISHED,
    "tb",
    "plots",
    "predictions",
    CKPT_DIR,
)


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


AugmentParams = tuple[tuple[bool, bool, bool], int, float | None]  # flips per axis, rot90 k, shift


def draw_augment(n: int, cfg: FinetuneTrainConfig, gen: torch.Generator) -> list[AugmentParams]:
    """The random choices for ``n`` samples, drawn from ``gen`` in sample order. Drawn for the
    whole global batch on every rank (each applies its own slice), so the augmentation of a sample
    does not depend on the number of ranks."""
    out: list[AugmentParams] = []
    for _ in range(n):
        r = torch.rand(6, generator=gen)
        flips = (bool(r[0] < cfg.flip_prob), bool(r[1] < cfg.flip_prob), bool(r[2] < cfg.flip_prob))
        k = int(torch.randint(1, 4, (1,), generator=gen)) if r[3] < cfg.rot90_prob else 0
        shift = (float(r[5]) * 2 - 1) * cfg.shift_offset if r[4] < cfg.shift_prob else None
        out.append((flips, k, shift))
    return out


def apply_augment(
    image: torch.Tensor, label: torch.Tensor, params: Sequence[AugmentParams]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply :func:`draw_augment`'s choices jointly to (B,1,X,Y,Z) image and label."""
    out_i, out_l = [], []
    for b, (flips, k, shift) in enumerate(params):
        im, lb = image[b], label[b]
        for ax in range(3):
            if flips[ax]:
                im, lb = im.flip(ax + 1), lb.flip(ax + 1)
        if k:
            if im.shape[1] != im.shape[2]:
                k = 2  # a non-square axial crop only keeps its shape under 180 degrees
            im, lb = torch.rot90(im, k, (1, 2)), torch.rot90(lb, k, (1, 2))
        if shift is not None:
            im = im + shift
        out_i.append(im)
        out_l.append(lb)
    return torch.stack(out_i), torch.stack(out_l)


def augment(
    image: torch.Tensor, label: torch.Tensor, cfg: FinetuneTrainConfig, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched, seeded augmentations applied jointly to (B,1,X,Y,Z) image and label.

    Our own tensor ops rather than MONAI's RandFlipd/RandRotate90d/RandShiftIntensityd: measured
    2.1x faster on a 2 x 96^3 batch (``benchmarks/augment.py``), they run on the training device on
    the collated batch and draw from one seeded generator (exact resume).
    """
    return apply_augment(image, label, draw_augment(image.shape[0], cfg, gen))


def epoch_order(n: int, gen: torch.Generator) -> list[int]:
    """One epoch's visiting order of the ``n`` training cases, the same on every rank.

    The draws are those ``DataLoader(shuffle=True, generator=gen)`` made per epoch when fine-tuning
    used one (its iterator's base seed, the permutation, and the empty tail permutation at the end
    of the pass), so the order is unchanged (tests/golden/finetune.json)."""
    torch.empty((), dtype=torch.int64).random_(generator=gen)
    order = torch.randperm(n, generator=gen).tolist()
    torch.randperm(n, generator=gen)
    return order


def batch_slots(order: Sequence[int], step: int, batch: int, world: int) -> list[int]:
    """Positions (into the training cases) of iteration ``step`` of an epoch's global batch.

    One process keeps the last, incomplete batch (as the DataLoader did); several ranks need
    equal shards, so there it is filled by wrapping around to the epoch's first cases."""
    n = len(order)
    if world == 1:
        return list(order[step * batch : (step + 1) * batch])
    return [order[(step * batch + j) % n] for j in range(batch)]


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


def _atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write_with(path, lambda f: torch.save(obj, f))


def is_2d(cfg: FinetuneConfig) -> bool:
    """A task on 2D images (radiographs; ``asa3d.eval.tasks2d``): classification always."""
    from asa3d.data.dataset2d import is_2d_source

    return cfg.task == "classification" or is_2d_source(cfg.data)


def load_index(data: DataConfig, split: str | None = None, task: str | None = None) -> Any:
    """The labelled index of ``split`` (default: ``data.split``): the CT cache, or for 2D images
    (``task`` given, or a 2D source) the labelled images of ``asa3d.data.labelled2d``."""
    from asa3d.data.dataset2d import is_2d_source
    from asa3d.data.prepare import ensure_cache

    if task == "classification" or is_2d_source(data):
        from asa3d.data.labelled2d import labelled_2d

        return labelled_2d(data, task or "segmentation", split)

    cfg = data if split is None else dataclasses.replace(data, split=split)
    return ensure_cache(cfg, with_labels=True, progress=True)  # a bar on a terminal only


def finetune_spec(cfg: FinetuneConfig, n_classes: int) -> BackboneSpec:
    """The backbone spec of the downstream network, with one output per class: the network the
    ``model:`` section describes (the default backbone family), or the family ``network.name``
    names, built from ``network.options``."""
    if cfg.network.name == "default":
        if is_2d(cfg):
            raise ConfigError(
                "2D tasks name their network: network.name (e.g. resnet for classification, "
                "resnet_unet for segmentation) and network.options (docs/evaluation.md, '2D tasks')."
            )
        return default_spec(cfg.model, n_classes)
    try:
        return network_spec(cfg.network.name, cfg.network.options, n_classes)
    except BackboneError as exc:
        raise ConfigError(str(exc)) from None


def make_model(
    cfg: FinetuneConfig, n_classes: int, spec: BackboneSpec | None = None
) -> tuple[torch.nn.Module, BackboneSpec]:
    """The downstream network built from its backbone spec (``finetune_spec`` unless given), and
    the spec (recorded in ``model.json`` and the checkpoints so ``predict`` rebuilds it)."""
    spec = spec or finetune_spec(cfg, n_classes)
    return spec.build(), spec


def check_input_sizes(cfg: FinetuneConfig, spec: BackboneSpec | None = None) -> None:
    """Refuse crop / sliding-window sizes the network cannot take, before any data is read."""
    spec = spec or finetune_spec(cfg, 2)
    try:
        if is_2d(cfg):  # whole images: their size is known once read (image2d.size when set)
            if cfg.image2d.size is not None:
                spec.check_input_size([cfg.image2d.size] * 2, "image2d.size")
            return
        spec.check_input_size(cfg.train.crop_size, "train.crop_size")
        if cfg.eval.roi_size is not None:
            spec.check_input_size(cfg.eval.roi_size, "eval.roi_size")
    except BackboneError as exc:
        raise ConfigError(str(exc)) from None


def check_untrained_frozen(cfg: FinetuneConfig, spec: BackboneSpec, report: TransferReport) -> None:
    """A probe freezes parts as loaded; a part the init's method never trained holds random
    weights, so the probe would measure random features there: refused unless
    ``probe.allow_untrained``."""
    frozen = set(frozen_parts(spec, cfg.mode, cfg.probe.freeze_encoders))
    bad = [p for p in report.untrained_parts if p in frozen]
    if not bad:
        return
    msg = (
        f"{cfg.mode} would freeze {bad}, which the pretraining of {report.source} never trained (its "
        "record says so): those weights are random and the probe would measure random features. "
        "Fine-tune instead, pretrain with the task that trains them, or set probe.allow_untrained=true "
        "to probe anyway."
    )
    if not cfg.probe.allow_untrained:
        raise ConfigError(msg)
    log.warning("probe.allow_untrained: %s", msg)
    report.warnings.append(msg)


def clear_run_outputs(out: Path) -> list[str]:
    """Delete what an earlier run left in ``out`` (``RUN_OUTPUTS`` and stale temp files) before a
    fresh start; returns the names removed. Files that are not a run's outputs are kept."""
    if (out / "last.pt").exists() or any(out.glob("ckpt_r*_i*.pt")):
        raise ConfigError(
            f"{out} holds a pretraining run (last.pt / ckpt_r*.pt); a fine-tuning run there would "
            "replace its config.yaml, logs and provenance. Choose another --out."
        )
    removed = []
    for name in RUN_OUTPUTS:
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
        else:
            continue
        removed.append(name)
    remove_stale_tmp(out)
    if removed:
        log.info("%s: removed the outputs of an earlier run before starting fresh: %s", out, removed)
    return removed


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Progress:
    """Where fine-tuning is: iterations done, the epoch and the step within it (the next batch)."""

    it: int = 0
    epoch: int = 0
    step: int = 0
    order: list[int] | None = None  # the current epoch's case order (None: not drawn yet)


def _checkpoint_error(path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: {what}; cannot resume this fine-tuning run exactly. Start fresh with --no-resume "
        "--overwrite (or a new --out)."
    )


def run_finetune(
    cfg: FinetuneConfig,
    out_dir: str | Path,
    train_ids: Sequence[str] | None = None,
    train_index: Any = None,
    test_index: Any = None,
    val_index: Any = None,
    *,
    resume: bool | str | Path | None = None,
    overwrite: bool = False,
    progress: BarFactory | None = None,
) -> dict[str, Any]:
    """Train and score one model; returns the metrics document (also written to ``metrics.json``).

    ``train_ids`` restricts training to those case ids (label fractions); indices may be passed
    in by the evaluation grid so the cache is opened once. ``resume`` as pretraining's: None =
    continue from ``out_dir/checkpoints`` when it holds a checkpoint, True = must, a path = that
    file, False = fresh (refuses a dir with checkpoints). ``overwrite``: start fresh whatever the
    folder holds (its checkpoints included). A fresh start first deletes every output of an earlier
    run in ``out_dir`` (``RUN_OUTPUTS``). ``progress(total, initial, desc)`` makes the progress bar
    (default: a tqdm line when ``train.progress``). Works under ``torchrun`` (one process per
    device, the global batch ``train.batch_size`` split between them; rank 0 writes everything).
    """
    was_initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    env = init_distributed(cfg.train.device)
    ok = False
    try:
        doc = _run(
            cfg,
            Path(out_dir),
            env,
            train_ids,
            train_index,
            test_index,
            val_index,
            resume,
            overwrite,
            progress,
        )
        ok = True
        return doc
    finally:
        if env.distributed and not was_initialised:
            if ok:
                cleanup(env)
            elif torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()  # no barrier: a peer may be gone


def _run(
    cfg: FinetuneConfig,
    out: Path,
    env: DistEnv,
    train_ids: Sequence[str] | None,
    train_index: Any,
    test_index: Any,
    val_index: Any,
    resume: bool | str | Path | None,
    overwrite: bool = False,
    progress: BarFactory | None = None,
) -> dict[str, Any]:
    main = env.is_main
    check_input_sizes(cfg)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tc = cfg.train
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    set_deterministic(tc.deterministic)
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed % (2**32))
    device = env.device
    if tc.batch_size % env.world_size:
        raise ConfigError(
            f"train.batch_size={tc.batch_size} is the GLOBAL batch; it must be divisible by the "
            f"number of processes ({env.world_size})."
        )
    ckpt_dir = out / CKPT_DIR
    ckpt_path = None if overwrite else resolve_resume(ckpt_dir, resume)
    if main:
        if ckpt_path is None:  # a fresh start: nothing an earlier run wrote may survive into this one
            clear_run_outputs(out)
        save_config(cfg, out / "config.yaml")

    if not main:
        barrier(env)  # rank 0 builds the on-disk caches first; the others then reuse them
    two_d = is_2d(cfg)
    task = cfg.task if two_d else None
    train_index = train_index if train_index is not None else load_index(cfg.data, task=task)
    if val_index is None and cfg.eval.val_split and (tc.val_every or tc.select == "best"):
        val_index = load_index(cfg.data, cfg.eval.val_split, task)
    if main:
        barrier(env)
    if tc.select == "best" and val_index is None:
        raise ConfigError("train.select=best needs eval.val_split (a validation section, not the test split)")
    n_classes = n_classes_of(train_index.label_names)
    model, spec = make_model(cfg, n_classes)
    contract = {"image2d": to_dict(cfg.image2d)} if two_d else cfg.data.preprocess.contract()
    report = init_model(model, cfg.init, run_dir=out if main else None, contract=contract, spec=spec)
    check_untrained_frozen(cfg, spec, report)
    net = prepare_model(model, spec, cfg.mode, cfg.probe.freeze_encoders, cfg.probe.stages).to(device)
    broadcast_module_state(net, env)

    from asa3d.data.dataset import CachedVolumeDataset, collate_volumes
    from asa3d.data.sampling import SampleSpec
    from asa3d.eval import tasks2d

    positions = _positions(train_index, train_ids)
    case_ids = [list(train_index.cases)[p].id for p in positions]
    if two_d:
        ds: Any = tasks2d.Images2D(train_index, cfg.image2d.size)
        collate: Any = None  # the default collate: images of one size stack
    else:
        ds = CachedVolumeDataset(
            train_index,
            SampleSpec("crop", tuple(tc.crop_size)),
            seed=tc.seed,
            with_labels=True,
            balanced=tc.balanced_crops,
        )
        collate = collate_volumes
    n_train = len(positions)
    batches_per_epoch = math.ceil(n_train / tc.batch_size)
    order_gen = torch.Generator().manual_seed(tc.seed)
    total = total_iterations(tc, n_train)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, eps=tc.adam_eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(tc, total))
    loss_fn = tasks2d.loss_function(cfg)  # Dice (+ CE) on label maps, BCE per finding
    val_key = "val/auc" if cfg.task == "classification" else "val/dice"
    aug_gen = torch.Generator().manual_seed(tc.seed + 1)
    precision = training_precision(tc.precision, device, tc.cpu_bf16)
    scaler = make_scaler(precision, device)

    log_rows: list[tuple[int, float, float]] = []
    val_hist: list[dict[str, float]] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    pos = _Progress()
    nonfinite = NonFinitePolicy(tc.max_bad_steps, lambda: latest_checkpoint(ckpt_dir), is_main=main)

    def checkpoint_dict() -> dict[str, Any]:
        return {
            "format": CKPT_FORMAT,
            "mode": cfg.mode,
            "config": to_dict(cfg),
            "backbone": spec.to_dict(),
            "version": __version__,
            "world_size": env.world_size,
            "train_ids": case_ids,
            "state": {
                "model": net.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict(),
            },
            "progress": {
                "iteration": pos.it,
                "total": total,
                "epoch": pos.epoch,
                "step_in_epoch": pos.step,
                "order": pos.order,
                "batch_size": tc.batch_size,
            },
            "generators": {"order": order_gen.get_state(), "augment": aug_gen.get_state()},
            "log": {"rows": [list(r) for r in log_rows], "validation": val_hist},
            "best": None if best is None else {"dice": best[0], "iteration": best[1], "state": best[2]},
            "rng": ckpt_io.rng_state(),
        }

    def save_checkpoint() -> None:
        if main:
            ckpt_io.save_rotating(checkpoint_dict(), ckpt_dir, pos.epoch, pos.it, keep_last=1)

    if ckpt_path is not None:
        ck = ckpt_io.load_checkpoint(ckpt_path, map_location=device)
        if ck.get("format") != CKPT_FORMAT:
            raise _checkpoint_error(ckpt_path, f"format {ck.get('format')!r} is not {CKPT_FORMAT!r}")
        prog = ck["progress"]
        if ck.get("train_ids") != case_ids:
            raise _checkpoint_error(ckpt_path, "it was written for other training cases")
        if (prog["total"], prog["batch_size"], ck.get("mode")) != (total, tc.batch_size, cfg.mode):
            raise _checkpoint_error(
                ckpt_path,
                f"it was written for {prog['total']} iterations at batch {prog['batch_size']} "
                f"({ck.get('mode')}), this run is {total} at {tc.batch_size} ({cfg.mode})",
            )
        if ck.get("backbone"):
            differs = spec.differences(BackboneSpec.from_dict(ck["backbone"], where=str(ckpt_path)))
            if differs:
                raise _checkpoint_error(
                    ckpt_path, f"it was written for another network ({'; '.join(differs)})"
                )
        changed = sorted(k for k, v in to_dict(cfg).items() if ck.get("config", {}).get(k) != v)
        if changed and main:
            log.warning("resuming with a config that differs from the checkpoint's in section(s) %s", changed)
        st = ck["state"]
        net.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        if st.get("scaler"):
            scaler.load_state_dict(st["scaler"])
        order_gen.set_state(ck["generators"]["order"].cpu())
        aug_gen.set_state(ck["generators"]["augment"].cpu())
        log_rows = [(int(r[0]), float(r[1]), float(r[2])) for r in ck["log"]["rows"]]
        val_hist = list(ck["log"]["validation"])
        if ck.get("best"):
            best = (ck["best"]["dice"], ck["best"]["iteration"], ck["best"]["state"])
        pos = _Progress(prog["iteration"], prog["epoch"], prog["step_in_epoch"], prog["order"])
        ckpt_io.set_rng_state(ck["rng"])  # last: everything above may draw random numbers
        if main:
            msg = f"resuming from {ckpt_path} (iteration {pos.it}/{total}, epoch {pos.epoch + 1})"
            log.info(msg)
            print(msg, flush=True)

    net.train()
    # The engine's logger and the same bar as pretraining: TensorBoard scalars under run/tb and
    # metrics.jsonl beside them.
    metrics_log = MetricsLogger(out, enabled=main)
    nonfinite.logger = metrics_log
    if ckpt_path is not None:
        metrics_log.event(pos.it, "resume", checkpoint=str(ckpt_path))
    bar = None
    if main and (progress is not None or tc.progress):
        bar = (progress or console_bar)(total, pos.it, cfg.mode)
    if main:
        log.info(
            "%s: %d iterations on %d cases, %d trainable params (%s, %d process(es))",
            cfg.mode,
            total,
            n_train,
            sum(p.numel() for p in params),
            device,
            env.world_size,
        )
    stop_signal: list[int] = []
    previous = install_stop_handlers(stop_signal.append)
    per_rank = tc.batch_size // env.world_size
    try:
        while pos.it < total:
            if pos.order is None:
                pos.order = epoch_order(n_train, order_gen)
            if hasattr(ds, "set_epoch"):
                ds.set_epoch(pos.epoch)
            slots = [
                batch_slots(pos.order, s, tc.batch_size, env.world_size)
                for s in range(pos.step, batches_per_epoch)
            ]
            # this rank's shard of each global batch (one process: all of it; the last may be smaller)
            lo, hi = (0, None) if env.world_size == 1 else (env.rank * per_rank, (env.rank + 1) * per_rank)
            mine = [[positions[j] for j in sl[lo:hi]] for sl in slots]
            loader = torch.utils.data.DataLoader(
                ds,
                batch_sampler=mine,
                collate_fn=collate,
                num_workers=cfg.data.num_workers,
                persistent_workers=False,
                generator=torch.Generator().manual_seed(tc.seed),  # worker seeds only; keeps the global RNG
            )
            for sl, batch in zip(slots, loader, strict=False):
                draw = tasks2d.draw_augment if two_d else draw_augment
                choices = draw(len(sl), tc, aug_gen)[lo:hi]  # drawn for the global batch

                def prepare(m: int, b: Any, choices: list[Any] = choices) -> Any:
                    img = b["image"].to(device)
                    if not two_d:
                        return apply_augment(img, b["label"].to(device).long(), choices)
                    img, lbl = tasks2d.apply_augment(img, b["label"].to(device), choices)
                    return tasks2d.normalise(img, cfg.image2d), lbl

                def forward(b: Any) -> dict[str, torch.Tensor]:
                    img, lbl = b
                    return {"loss": loss_fn(net(img).float(), lbl)}

                res = optimisation_step(
                    [batch],
                    forward,
                    optimizer=opt,
                    scaler=scaler,
                    params=params,
                    precision=precision,
                    env=env,
                    grad_clip=tc.grad_clip,
                    prepare=prepare,
                    stop_requested=lambda: bool(stop_signal),
                )
                sched.step()  # a skipped step still counts: the schedule follows the iteration
                pos.it += 1
                pos.step += 1
                if pos.step >= batches_per_epoch:
                    pos.epoch, pos.step, pos.order = pos.epoch + 1, 0, None
                if res.bad:
                    nonfinite.bad(pos.it, res.bad_terms, cfg.mode, "no optimiser step")
                else:
                    nonfinite.good()
                    log_rows.append((pos.it, res.terms["loss"], float(sched.get_last_lr()[0])))
                    metrics_log.log(pos.it, {"loss/train": log_rows[-1][1], "lr": log_rows[-1][2]})
                    if bar is not None:
                        bar.set_postfix(loss=f"{log_rows[-1][1]:.4f}", refresh=False)
                if bar is not None:
                    bar.update(1)
                if tc.log_every and pos.it % tc.log_every == 0 and log_rows and main:
                    log.debug("iter %d/%d loss %.4f", pos.it, total, log_rows[-1][1])
                validate = bool(tc.val_every) and (pos.it % tc.val_every == 0 or pos.it == total)
                if main and val_index is not None and validate:
                    if two_d:
                        vd = tasks2d.validation_score(net, val_index, _dice_only(cfg), n_classes, device)
                    else:
                        rows = score_cases(net, val_index, _dice_only(cfg), n_classes, device)
                        vd = summarise(rows, ["dice"])["dice"]["mean"]
                    val_hist.append({"iteration": pos.it, val_key.replace("/", "_"): vd})
                    metrics_log.log(pos.it, {val_key: vd})
                    if best is None or (not math.isnan(vd) and vd > best[0]):
                        best = (vd, pos.it, {k: v.detach().clone() for k, v in net.state_dict().items()})
                periodic = bool(tc.ckpt_every) and pos.it % tc.ckpt_every == 0
                if nonfinite.streak == 0 and (periodic or res.stop or pos.it == total):
                    save_checkpoint()
                if res.stop:
                    raise TrainingInterrupted(
                        f"stopped by {signal_name(stop_signal[0] if stop_signal else None)} after "
                        f"iteration {pos.it}/{total}; checkpoint: {latest_checkpoint(ckpt_dir)}. "
                        "Run the same command again to resume."
                    )
                if pos.it >= total or pos.order is None:
                    break
    finally:
        restore_handlers(previous)
        if bar is not None:
            bar.close()
        metrics_log.close()

    losses = [r[1] for r in log_rows]
    k = max(1, min(10, len(losses) // 4))
    doc: dict[str, Any] = {
        "mode": cfg.mode,
        "init": cfg.init.source,
        "iterations": total,
        "train_cases": n_train,
        "train_ids": case_ids,
        "seed": tc.seed,
        "selected": "final",
        "transfer": report.summary(),
        "loss_first": float(np.mean(losses[:k])),
        "loss_last": float(np.mean(losses[-k:])),
        "validation": val_hist,
        "grid": cfg.eval.grid,
    }
    if not main:
        return doc  # rank 0 writes the results and scores the test split

    write_csv(out / "train_log.csv", ["iteration", "loss", "lr"], log_rows)
    final_state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    _atomic_torch_save(final_state, out / "model_final.pt")
    selected = "final"
    if tc.select == "best" and best is not None:
        _atomic_torch_save({k: v.cpu() for k, v in best[2].items()}, out / "model_best.pt")
        net.load_state_dict(best[2])
        selected = f"best (iteration {best[1]}, validation Dice {best[0]:.4f})"
    doc["selected"] = selected
    model_info = {
        "format": "asa3d-finetune/1",
        "model_class": spec.network,
        "model_kwargs": to_dict(dict(spec.kwargs)),  # the library's own names: Class(**model_kwargs)
        "backbone": spec.to_dict(),  # what predict rebuilds the network from
        "mode": cfg.mode,
        "task": cfg.task,
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
    if two_d:  # whole images, fed as the pretraining fed them
        model_info["inference"] = {"image2d": to_dict(cfg.image2d)}
    atomic_write_text(out / "model.json", json.dumps(model_info, indent=1))

    if cfg.eval.split is not None:
        test_index = test_index if test_index is not None else load_index(cfg.data, cfg.eval.split, task)
        pred_dir = out / "predictions" if cfg.eval.save_predictions and not two_d else None
        if two_d:
            rows = tasks2d.score_images(net, test_index, cfg, n_classes, device)
        else:
            rows = score_cases(net, test_index, cfg, n_classes, device, pred_dir)
        doc["test_split"] = cfg.eval.split
        doc["per_case"] = rows
        if cfg.task == "classification":
            doc["summary"] = tasks2d.summarise_auc(rows)
        else:
            doc["summary"] = summarise(rows, cfg.eval.metrics, exclude=cfg.eval.merged_classes)
        write_per_case_csv(out / "per_case.csv", rows)
    doc["seconds"] = round(time.time() - t0, 2)
    provenance.record(out, device)
    atomic_write_text(out / FINISHED, json_text(doc))  # last: marks the run finished
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # the run is complete: its resume state is not needed
    return doc


def _dice_only(cfg: FinetuneConfig) -> FinetuneConfig:
    return dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, metrics=["dice"], max_cases=None))
