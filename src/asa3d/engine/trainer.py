"""One training loop for every pretraining method (docs/engine.md).

A round (``train.epochs`` of them) runs every phase of ``method.phases()`` as one pass over the
data, each with its own random order (``phase_alternation: epoch``), or interleaves the phases
step by step (``iteration``). Both are a fixed list of (phase, iteration) steps per round, so
a checkpoint records "round r, step s" and resume continues at exactly that step.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from asa3d import __version__
from asa3d.config import ConfigError, to_dict
from asa3d.config_sections import PretrainConfig
from asa3d.engine import checkpoint as ckpt_io
from asa3d.engine.checkpoint import CheckpointError
from asa3d.engine.distributed import (
    DistEnv,
    average_gradients,
    barrier,
    broadcast_module_state,
    cleanup,
    init_distributed,
    phase_order,
    rank_indices,
    step_seed,
)
from asa3d.engine.metrics_log import MetricsLogger
from asa3d.engine.monitors import collapse_warning, embedding_health
from asa3d.engine.precision import autocast, make_scaler, seed_all, set_deterministic
from asa3d.engine.run_dir import resolve_resume, save_resolved_config
from asa3d.engine.schedules import LRSchedule
from asa3d.methods.base import PretrainMethod, SampleSpec, build_method

log = logging.getLogger(__name__)

DatasetFactory = Callable[[str, SampleSpec], Dataset]


class TrainingDiverged(RuntimeError):
    """``train.max_bad_steps`` consecutive non-finite steps; the last good checkpoint is intact."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM/SIGINT (e.g. SLURM pre-emption): a checkpoint was written at the step boundary."""


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------
def micro_batch_size(global_batch: int, world: int, accum: int) -> int:
    """Per-rank micro-batch: global batch / (world size x accumulation steps), exactly."""
    if global_batch % (world * accum):
        raise ConfigError(
            f"train.batch_size={global_batch} is the GLOBAL batch; it must be divisible by "
            f"world_size ({world}) x train.grad_accum ({accum}) = {world * accum}. "
            f"Pick e.g. batch_size={max(1, global_batch // (world * accum)) * world * accum}."
        )
    return global_batch // (world * accum)


def round_plan(n_phases: int, iters: Sequence[int], alternation: str) -> list[tuple[int, int]]:
    """The (phase index, iteration within the phase pass) steps of one round, in order."""
    if alternation == "epoch":
        return [(p, i) for p in range(n_phases) for i in range(iters[p])]
    return [(p, i) for i in range(max(iters)) for p in range(n_phases) if i < iters[p]]


def to_device(obj: Any, device: torch.device) -> Any:
    if torch.is_tensor(obj):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def _fallback_collate(items: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack same-shaped tensors, keep anything else as a list (used when the data layer's
    ``collate_volumes`` is unavailable, e.g. for injected test datasets)."""
    out: dict[str, Any] = {}
    for key in items[0]:
        vals = [it[key] for it in items]
        if all(torch.is_tensor(v) for v in vals) and len({tuple(v.shape) for v in vals}) == 1:
            out[key] = torch.stack(vals)
        else:
            out[key] = vals
    return out


def _collate_fn() -> Callable[[list[Any]], Any]:
    try:
        from asa3d.data.dataset import collate_volumes
    except ImportError:
        return _fallback_collate
    return collate_volumes


def default_dataset_factory(cfg: PretrainConfig) -> DatasetFactory:
    """Datasets from the on-disk cache (built on first use by the data layer)."""
    from asa3d.data.dataset import CachedVolumeDataset
    from asa3d.data.prepare import ensure_cache

    index = ensure_cache(cfg.data, with_labels=False)

    def factory(phase: str, spec: SampleSpec) -> Dataset:
        return CachedVolumeDataset(index, spec, cfg.train.seed)

    return factory


@dataclass
class Position:
    """Where training is: the NEXT step to run."""

    round: int = 0
    step: int = 0  # index into round_plan
    global_iter: int = 0  # optimiser steps taken (including skipped bad steps)


# --------------------------------------------------------------------------------------------
# the trainer
# --------------------------------------------------------------------------------------------
class Trainer:
    def __init__(
        self, cfg: PretrainConfig, run_dir: Path, env: DistEnv, dataset_factory: DatasetFactory | None = None
    ) -> None:
        self.cfg, self.tc, self.env, self.run_dir = cfg, cfg.train, env, Path(run_dir)
        tc = self.tc
        self.micro = micro_batch_size(tc.batch_size, env.world_size, tc.grad_accum)
        set_deterministic(tc.deterministic)
        seed_all(tc.seed)  # identical initial weights on every rank (and broadcast below anyway)

        self.method: PretrainMethod = build_method(cfg.method, cfg.model).to(env.device)
        self.backbone_kwargs = ckpt_io.monai_kwargs(self.method.backbone_kwargs())
        # fail fast: a run must not produce weights a plain SwinUNETR cannot load
        ckpt_io.check_swinunetr_transfer(
            {k: v.detach().cpu() for k, v in self.method.transfer_state_dict().items()},
            self.backbone_kwargs,
            source=f"method {cfg.method.get('name')!r} transfer_state_dict()",
        )
        broadcast_module_state(self.method, env)

        self.phases = list(self.method.phases())
        if not self.phases:
            raise ConfigError(f"method {cfg.method.get('name')!r} declares no phases")
        if dataset_factory is None:
            # rank 0 builds the on-disk cache first; the others then reuse it (no write races)
            if not env.is_main:
                barrier(env)
            dataset_factory = default_dataset_factory(cfg)
            if env.is_main:
                barrier(env)
        factory = dataset_factory
        by_spec: dict[SampleSpec, Dataset] = {}
        self.datasets: list[Dataset] = []
        for ph in self.phases:
            spec = self.method.sample_spec(ph)
            if spec not in by_spec:
                by_spec[spec] = factory(ph, spec)
            self.datasets.append(by_spec[spec])
        self.iters: list[int] = []
        for ph, ds in zip(self.phases, self.datasets, strict=False):
            n = len(ds)  # type: ignore[arg-type]
            if n == 0:
                raise ConfigError(f"phase {ph!r}: the dataset is empty")
            it = math.ceil(n / tc.batch_size)  # the last batch wraps around to the start
            self.iters.append(min(it, tc.max_iters_per_phase) if tc.max_iters_per_phase else it)
        self.plan = round_plan(len(self.phases), self.iters, tc.phase_alternation)
        self.iters_per_round = len(self.plan)
        self.total_iters = tc.epochs * self.iters_per_round

        self.params = [p for p in self.method.trainable_parameters()]
        if tc.optimizer == "sgd":
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(
                self.params, lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay
            )
        else:
            self.optimizer = torch.optim.AdamW(self.params, lr=tc.lr, weight_decay=tc.weight_decay)
        self.schedule = LRSchedule(
            self.optimizer, tc.lr_schedule, tc.lr, tc.warmup_epochs, tc.epochs, self.iters_per_round
        )
        self.scaler = make_scaler(tc.precision, env.device)
        self.collate = _collate_fn()
        self.pos = Position()
        self.bad_streak = 0
        self.stop_signal: int | None = None  # set by the SIGTERM/SIGINT handler
        self.stop_all = False  # any rank asked to stop (learned through the step's all-reduce)
        self.logger: MetricsLogger | None = None

    # ---- checkpoints --------------------------------------------------------------------------
    def checkpoint_dict(self) -> dict[str, Any]:
        plan_step = self.plan[self.pos.step] if self.pos.step < len(self.plan) else (0, 0)
        consumed = [0] * len(self.phases)
        for p, _ in self.plan[: self.pos.step]:
            consumed[p] += 1
        return {
            "format": ckpt_io.FORMAT,
            "method": self.cfg.method.get("name"),
            "config": to_dict(self.cfg),
            "backbone": {"class": ckpt_io.SWINUNETR_CLASS, "kwargs": dict(self.backbone_kwargs)},
            "preprocessing": self.cfg.data.preprocess.contract(),
            "version": __version__,
            "transfer_parts": dict(self.method.transfer_parts()),
            "world_size": self.env.world_size,
            "state": {
                "method": self.method.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.schedule.state_dict(),
                "scaler": self.scaler.state_dict(),
            },
            "progress": {
                "round": self.pos.round,
                "step_in_round": self.pos.step,
                "phase_index": plan_step[0],
                "iter_in_phase": plan_step[1],
                "global_iter": self.pos.global_iter,
                "total_iters": self.total_iters,
                "iters_per_round": self.iters_per_round,
                "consumed_iters_per_phase": consumed,  # data position: batches already used
            },
            "rng": ckpt_io.rng_state(),
        }

    def save_checkpoint(self) -> Path | None:
        if not self.env.is_main:
            return None
        path = ckpt_io.save_rotating(
            self.checkpoint_dict(), self.run_dir, self.pos.round, self.pos.global_iter, self.tc.keep_last
        )
        log.debug("checkpoint %s", path)
        return path

    def restore(self, path: Path) -> None:
        ck = ckpt_io.load_checkpoint(path, map_location=self.env.device)
        ckpt_io.check_format(ck, path)
        if ck.get("method") != self.cfg.method.get("name"):
            raise CheckpointError(
                f"{path}: written by method {ck.get('method')!r}, this run is "
                f"{self.cfg.method.get('name')!r}."
            )
        prog = ck["progress"]
        if prog.get("iters_per_round") != self.iters_per_round:
            raise CheckpointError(
                f"{path}: a round had {prog.get('iters_per_round')} steps, now {self.iters_per_round} "
                "(batch size, data, phases or max_iters_per_phase changed); cannot resume exactly."
            )
        old_cfg, new_cfg = ck.get("config", {}), to_dict(self.cfg)
        changed = sorted(k for k in set(old_cfg) | set(new_cfg) if old_cfg.get(k) != new_cfg.get(k))
        if changed and self.env.is_main:
            log.warning("resuming with a config that differs from the checkpoint's in section(s) %s", changed)
        st = ck["state"]
        self.method.load_state_dict(st["method"])
        self.optimizer.load_state_dict(st["optimizer"])
        self.schedule.load_state_dict(st["scheduler"])
        if st.get("scaler"):
            self.scaler.load_state_dict(st["scaler"])
        ckpt_io.set_rng_state(ck["rng"])
        self.pos = Position(round=prog["round"], step=prog["step_in_round"], global_iter=prog["global_iter"])

    # ---- data ---------------------------------------------------------------------------------
    def _loader(self, phase_index: int, round_: int, start_iter: int) -> Any:
        ds = self.datasets[phase_index]
        if hasattr(ds, "set_epoch"):  # data randomness is a function of (seed, epoch, idx)
            ds.set_epoch(round_ * len(self.phases) + phase_index)
        order = phase_order(len(ds), self.tc.seed, round_, phase_index)  # type: ignore[arg-type]
        idx = rank_indices(
            order, self.tc.batch_size, self.iters[phase_index], self.env.rank, self.env.world_size, start_iter
        )
        workers = self.cfg.data.num_workers
        collate = getattr(ds, "collate_fn", None) or self.collate  # CachedVolumeDataset knows its mode
        loader = DataLoader(
            ds,
            batch_size=self.micro,
            sampler=idx,
            collate_fn=collate,
            num_workers=workers,
            pin_memory=self.env.device.type == "cuda",
            persistent_workers=False,
            drop_last=False,
        )
        return iter(loader)

    # ---- one optimiser step -------------------------------------------------------------------
    def train_step(self, phase_index: int, micro_batches: list[Any]) -> dict[str, float] | None:
        """Forward/backward every micro-batch, average gradients across ranks, step, EMA.
        Returns the logged scalars, or None when the step was skipped as non-finite."""
        tc, env, method = self.tc, self.env, self.method
        phase = self.phases[phase_index]
        gi = self.pos.global_iter
        self.optimizer.zero_grad(set_to_none=True)  # so a phase's unused parameters have no grad
        names: list[str] = []
        sums: torch.Tensor | None = None
        bad_local: list[str] = []
        last_batch = None
        for m, batch in enumerate(micro_batches):
            seed_all(step_seed(tc.seed, env.rank, gi, m))
            batch = to_device(batch, env.device)
            last_batch = batch
            with autocast(tc.precision, env.device):
                out = method.training_step(batch, phase)
            terms = {"loss": out.loss, **{k: v for k, v in out.terms.items() if k != "loss"}}
            vals = torch.stack([v.detach().float().reshape(()) for v in terms.values()])
            finite = torch.isfinite(vals)
            if not bool(finite.all()):
                flags = zip(terms, finite.tolist(), strict=True)
                bad_local += [k for k, ok in flags if not ok and k not in bad_local]
            names = list(terms)
            sums = vals if sums is None else sums + vals
            self.scaler.scale(out.loss / len(micro_batches)).backward()
        assert sums is not None
        means = (sums / len(micro_batches)).tolist()
        stop = float(self.stop_signal is not None)
        reduced = average_gradients(self.params, env, extra=[*means, float(bool(bad_local)), stop])
        term_vals, bad_any, self.stop_all = reduced[:-2], reduced[-2] > 0, reduced[-1] > 0
        scalars = {f"loss/{k}": v for k, v in zip(names, term_vals, strict=False)}

        grads = [p for p in self.params if p.grad is not None]
        if not bad_any and grads:
            if self.scaler.is_enabled():
                self.scaler.unscale_(self.optimizer)
            gnorm = torch.nn.utils.get_total_norm([p.grad for p in grads])
            scalars["grad_norm"] = float(gnorm)
            if not math.isfinite(scalars["grad_norm"]) and not self.scaler.is_enabled():
                bad_local, bad_any = ["grad_norm"], True  # identical on all ranks (grads are averaged)
            elif tc.grad_clip:
                torch.nn.utils.clip_grads_with_norm_([p.grad for p in grads], tc.grad_clip, gnorm)
        if bad_any:
            self._bad_step(phase, bad_local or ["<on another rank>"])
            return None
        self.bad_streak = 0
        scalars["lr"] = self.schedule.step(self.pos.round, gi)
        if self.scaler.is_enabled():
            before = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            stepped = self.scaler.get_scale() >= before  # a drop in scale means inf grads: skipped
        else:
            self.optimizer.step()
            stepped = True
        if stepped:
            for k, v in method.on_step_end(phase, gi, self.total_iters).items():
                scalars[k if "/" in k else f"method/{k}"] = float(v)
        if tc.monitor_every and env.is_main and (gi + 1) % tc.monitor_every == 0 and last_batch is not None:
            self._monitor(last_batch, gi)
        return scalars

    def _bad_step(self, phase: str, bad: list[str]) -> None:
        self.bad_streak += 1
        gi = self.pos.global_iter
        msg = (
            f"non-finite {', '.join(bad)} at iteration {gi} (phase {phase}): step skipped "
            f"(no optimiser step, no EMA update); {self.bad_streak}/{self.tc.max_bad_steps} in a row"
        )
        if self.env.is_main:
            log.warning(msg)
            if self.logger:
                self.logger.event(gi, "bad_step", phase=phase, terms=bad, streak=self.bad_streak)
        if self.bad_streak >= self.tc.max_bad_steps:
            last = ckpt_io.latest_checkpoint(self.run_dir)
            raise TrainingDiverged(
                f"{self.bad_streak} consecutive non-finite steps (last: {', '.join(bad)} in phase {phase} at "
                f"iteration {gi}); stopping. Last good checkpoint: {last or 'none written yet'}. "
                "Lower train.lr, use train.grad_clip, or try precision fp32."
            )

    def _monitor(self, batch: Any, gi: int) -> None:
        with torch.no_grad():
            emb = self.method.monitor_embeddings(batch)
        if not emb:
            return
        health = embedding_health(emb)
        if self.logger:
            self.logger.log(gi, {f"monitor/{k}": v for k, v in health.items()})
        warn = collapse_warning(health)
        if warn:
            log.warning("iteration %d: %s", gi, warn)
            if self.logger:
                self.logger.event(gi, "collapse_warning", message=warn)

    # ---- the loop -----------------------------------------------------------------------------
    def fit(self, resume: bool | str | Path | None = None) -> Path:
        env, tc = self.env, self.tc
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ckpt_path = resolve_resume(self.run_dir, resume)
        if ckpt_path is not None:
            self.restore(ckpt_path)
            if env.is_main:
                msg = (
                    f"resuming from {ckpt_path} (round {self.pos.round + 1}, step {self.pos.step}, "
                    f"iteration {self.pos.global_iter}/{self.total_iters})"
                )
                log.info(msg)
                print(msg, flush=True)
        if env.is_main:
            save_resolved_config(self.cfg, self.run_dir)
        self.logger = MetricsLogger(self.run_dir, enabled=env.is_main)
        if env.is_main and ckpt_path is not None:
            self.logger.event(self.pos.global_iter, "resume", checkpoint=str(ckpt_path))
        self.method.train()
        if env.is_main:
            log.info(
                "method %s, phases %s (%s iterations per pass), %d rounds = %d iterations; world %d, "
                "micro-batch %d x accum %d = global batch %d; %s on %s",
                self.cfg.method.get("name"),
                self.phases,
                self.iters,
                tc.epochs,
                self.total_iters,
                env.world_size,
                self.micro,
                tc.grad_accum,
                tc.batch_size,
                tc.precision,
                env.device,
            )
        bar = None
        if env.is_main and tc.progress:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=self.total_iters,
                initial=self.pos.global_iter,
                unit="it",
                dynamic_ncols=True,
                desc="pretrain",
            )
        previous = self._install_signal_handlers()
        try:
            self._loop(bar)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if bar is not None:
                bar.close()
            self.logger.close()
        return self.run_dir / ckpt_io.LAST

    def _install_signal_handlers(self) -> dict[int, Any]:
        """SIGTERM/SIGINT ask for a stop at the next step boundary (checkpoint, then exit), which is
        what SLURM pre-emption and Ctrl-C need. Every rank sees the request through the step's
        all-reduce, so all stop after the same step."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def request_stop(signum: int, frame: Any) -> None:
            self.stop_signal = signum

        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, request_stop)
        return previous

    def check_replicas(self) -> None:
        """Cheap guard that every rank holds the same weights (student, teacher, heads): one
        all-reduce of a checksum, MAX vs MIN."""
        if not self.env.distributed:
            return
        with torch.no_grad():
            total = sum(
                (t.double().sum() for t in self.method.state_dict().values() if t.is_floating_point()),
                torch.zeros((), dtype=torch.float64, device=self.env.device),
            )
        pair = torch.stack([total, -total]).to(self.env.device)
        torch.distributed.all_reduce(pair, op=torch.distributed.ReduceOp.MAX)
        if pair[0].item() != -pair[1].item():
            raise RuntimeError(
                f"ranks hold different weights after round {self.pos.round} (checksum max "
                f"{pair[0].item()!r} vs min {-pair[1].item()!r}); this is a bug, please report it."
            )

    def _loop(self, bar: Any) -> None:
        tc, env = self.tc, self.env
        while self.pos.round < tc.epochs:
            r = self.pos.round
            self.method.on_round_start(r, tc.epochs)
            loaders: dict[int, Any] = {}
            start_consumed = [0] * len(self.phases)
            for p, _ in self.plan[: self.pos.step]:
                start_consumed[p] += 1
            while self.pos.step < len(self.plan):
                p, _ = self.plan[self.pos.step]
                if p not in loaders:
                    loaders[p] = self._loader(p, r, start_consumed[p])
                t0 = time.perf_counter()
                micro = [next(loaders[p]) for _ in range(tc.grad_accum)]
                scalars = self.train_step(p, micro)
                dt = time.perf_counter() - t0
                gi = self.pos.global_iter
                self.pos.global_iter += 1
                self.pos.step += 1
                if scalars is not None and env.is_main:
                    scalars["throughput/volumes_per_s"] = tc.batch_size / max(dt, 1e-9)
                    if tc.log_every and (gi % tc.log_every == 0 or self.pos.global_iter == self.total_iters):
                        assert self.logger is not None
                        self.logger.log(gi, scalars, round=r + 1, phase=self.phases[p])
                    if bar is not None:
                        post = {
                            k.split("/", 1)[1]: f"{v:.4g}"
                            for k, v in scalars.items()
                            if k.startswith("loss/")
                        }
                        post["vol/s"] = f"{scalars['throughput/volumes_per_s']:.2f}"
                        bar.set_postfix(post, refresh=False)
                        bar.set_description(f"round {r + 1}/{tc.epochs} {self.phases[p]}", refresh=False)
                if bar is not None:
                    bar.update(1)
                mid_round = self.pos.step < len(self.plan)
                periodic = bool(tc.ckpt_every_iters) and self.pos.global_iter % tc.ckpt_every_iters == 0
                if mid_round and self.bad_streak == 0 and (periodic or self.stop_all):
                    self.save_checkpoint()
                if mid_round and self.stop_all:
                    raise self._interrupted()
            self.pos.round += 1
            self.pos.step = 0
            if self.bad_streak == 0:
                self.save_checkpoint()
                self.check_replicas()
            if self.stop_all:
                raise self._interrupted()

    def _interrupted(self) -> TrainingInterrupted:
        name = signal.Signals(self.stop_signal).name if self.stop_signal else "a signal on another rank"
        last = ckpt_io.latest_checkpoint(self.run_dir)
        return TrainingInterrupted(
            f"stopped by {name} after iteration {self.pos.global_iter}/{self.total_iters}; "
            f"checkpoint: {last}. Run the same command again to resume."
        )


def run_pretrain(
    cfg: PretrainConfig,
    out_dir: str | Path,
    resume: bool | str | Path | None = None,
    *,
    dataset_factory: DatasetFactory | None = None,
) -> Path:
    """Pretrain ``cfg.method`` and return the path of the final checkpoint (``last.pt``).

    ``resume``: None = auto-resume from ``out_dir`` when it holds a checkpoint; True = must
    resume; a path = resume from that file; False = fresh (refuses a dir with checkpoints).
    ``dataset_factory(phase, spec)`` replaces the on-disk cache (tests, custom data).
    Works under ``torchrun`` unchanged (one process per device).
    """
    env = init_distributed(cfg.train.device)
    ok = False
    try:
        trainer = Trainer(cfg, Path(out_dir), env, dataset_factory=dataset_factory)
        path = trainer.fit(resume)
        ok = True
        return path
    finally:
        if ok:
            cleanup(env)
        elif env.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # no barrier: a peer may be gone
