"""One training loop for every pretraining method (docs/engine.md).

A round (``train.epochs`` of them, or as many as ``train.total_steps`` optimiser steps need, the
last one stopping part-way) runs every phase of ``method.phases()`` as one pass over the
data, each with its own random order (``phase_alternation: epoch``), or interleaves the phases
step by step (``iteration``). Both are a fixed list of (phase, iteration) steps per round, so
a checkpoint records "round r, step s" and resume continues at exactly that step.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from asa3d import __version__, provenance
from asa3d.config import ConfigError, to_dict
from asa3d.config_sections import PretrainConfig
from asa3d.data.sampling import SampleSpec
from asa3d.engine import checkpoint as ckpt_io
from asa3d.engine.checkpoint import CheckpointError
from asa3d.engine.distributed import (
    DistEnv,
    barrier,
    broadcast_module_state,
    broadcast_tensors_,
    cleanup,
    first_mismatch,
    init_distributed,
    phase_order,
    rank_indices,
    step_seed,
)
from asa3d.engine.metrics_log import MetricsLogger
from asa3d.engine.monitors import collapse_warning, embedding_health
from asa3d.engine.param_groups import build_optimizer
from asa3d.engine.precision import make_scaler, seed_all, set_deterministic, training_precision
from asa3d.engine.run_dir import resolve_resume, save_resolved_config
from asa3d.engine.schedules import LRSchedule
from asa3d.engine.step import (  # noqa: F401  TrainingDiverged/TrainingInterrupted re-exported
    NonFinitePolicy,
    TrainingDiverged,
    TrainingInterrupted,
    install_stop_handlers,
    optimisation_step,
    restore_handlers,
    signal_name,
)
from asa3d.methods.base import PretrainMethod, build_method
from asa3d.methods.dist_context import DistContext, resolve_buffer_policies
from asa3d.models.backbones.spec import BackboneError
from asa3d.progress import BarFactory

log = logging.getLogger(__name__)

DatasetFactory = Callable[[str, SampleSpec], Dataset]


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
    """Datasets from the on-disk cache (built on first use by the data layer); 2D images
    (``asa3d.data.dataset2d``) when ``data:`` names a 2D source, read once and sampled as each
    phase's ``SampleSpec`` asks."""
    from asa3d.data.dataset2d import SampledImages2D, dataset_2d, is_2d_source

    if is_2d_source(cfg.data):
        images = dataset_2d(cfg.data)
        where = f"2D images ({cfg.data.preset or cfg.data.root})"
        return lambda phase, spec: SampledImages2D(images, spec, cfg.train.seed, source=where)
    from asa3d.data.dataset import CachedVolumeDataset
    from asa3d.data.prepare import ensure_cache

    index = ensure_cache(cfg.data, with_labels=False, progress=True)  # a bar on a terminal only

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
        self.batch_size = tc.global_batch(env.world_size)  # volumes per optimiser step, all ranks
        self.micro = micro_batch_size(self.batch_size, env.world_size, tc.grad_accum)
        set_deterministic(tc.deterministic)
        seed_all(tc.seed)  # identical initial weights on every rank (and broadcast below anyway)

        self.method: PretrainMethod = build_method(cfg.method, cfg.model).to(env.device)
        self.backbone = self.method.backbone_spec()
        source = f"method {cfg.method.get('name')!r}"
        # fail fast: a run must not produce weights the declared plain network cannot load
        ckpt_io.check_transfer(
            {k: v.detach().cpu() for k, v in self.method.transfer_state_dict().items()},
            self.backbone,
            source=f"{source} transfer_state_dict()",
        )
        try:
            self.transfer_parts = self.backbone.check_parts(self.method.transfer_parts(), source)
        except BackboneError as exc:
            raise ConfigError(str(exc)) from None
        self.method.dist = DistContext(env.rank, env.world_size)
        self._setup_buffer_policies()
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
            if tc.drop_last and n < self.batch_size:
                raise ConfigError(
                    f"phase {ph!r}: {n} volumes < the global batch {self.batch_size} with "
                    "train.drop_last=true leaves no batch; lower the batch size or set drop_last=false"
                )
            # drop_last: the incomplete batch is dropped; else it wraps around to the pass's start
            it = n // self.batch_size if tc.drop_last else math.ceil(n / self.batch_size)
            self.iters.append(min(it, tc.max_iters_per_phase) if tc.max_iters_per_phase else it)
        self.plan = round_plan(len(self.phases), self.iters, tc.phase_alternation)
        self.iters_per_round = len(self.plan)
        if tc.total_steps is not None:  # step-based: the last round may stop part-way
            self.rounds = math.ceil(tc.total_steps / self.iters_per_round)
            self.total_iters = tc.total_steps
        else:
            assert tc.epochs is not None  # resolved by TrainConfig.validate
            self.rounds = tc.epochs
            self.total_iters = tc.epochs * self.iters_per_round

        groups = self.method.param_groups(tc.weight_decay)
        self.params = [p for g in groups for p in g.params]
        self.optimizer = build_optimizer(tc.optimizer, groups, tc.lr, tc.momentum, amsgrad=tc.amsgrad)
        k = self.batch_size / tc.lr_reference_batch if tc.lr_reference_batch > 0 else 1.0
        step_based = tc.total_steps is not None
        try:
            self.stage_starts = tuple(int(s) for s in self.method.stage_starts(self.rounds))
            self.schedule = LRSchedule(
                self.optimizer,
                tc.lr_schedule,
                tc.lr * k,
                int(tc.warmup_steps or 0) if step_based else int(tc.warmup_epochs or 0),
                self.total_iters if step_based else self.rounds,
                self.iters_per_round,
                start=tc.warmup_start_lr * k,
                floor=tc.min_lr * k,
                stage_starts=self.stage_starts,
                unit="step" if step_based else "round",
            )
        except ValueError as exc:
            raise ConfigError(f"method {cfg.method.get('name')!r}: {exc}") from None
        self.precision = training_precision(tc.precision, env.device, tc.cpu_bf16)
        self.scaler = make_scaler(self.precision, env.device)
        self.collate = _collate_fn()
        self.pos = Position()
        self.nonfinite = NonFinitePolicy(
            tc.max_bad_steps, lambda: ckpt_io.latest_checkpoint(self.run_dir), is_main=env.is_main
        )
        self.stop_signal: int | None = None  # set by the SIGTERM/SIGINT handler
        self.stop_all = False  # any rank asked to stop (learned through the step's all-reduce)
        self.logger: MetricsLogger | None = None

    # ---- buffers across ranks ------------------------------------------------------------------
    def _setup_buffer_policies(self) -> None:
        """Resolve ``buffer_policy()`` for every buffer; convert ``sync_bn`` parts to SyncBatchNorm."""
        method, env = self.method, self.env
        where = f"method {self.cfg.method.get('name')!r} buffer_policy()"
        declared = dict(method.buffer_policy())
        try:
            self.buffer_policies = resolve_buffer_policies(
                [n for n, _ in method.named_buffers()], declared, where
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        sync = [p for p, pol in declared.items() if pol == "sync_bn"]
        if sync and env.distributed:
            if env.device.type != "cuda":
                raise ConfigError(
                    f"{where}: sync_bn for {sync} needs CUDA (NCCL); "
                    f"on {env.device.type} declare them 'broadcast'."
                )
            for prefix in sync:
                path = prefix.rstrip(".")
                parent_name, _, child = path.rpartition(".")
                parent = method.get_submodule(parent_name) if parent_name else method
                setattr(parent, child, torch.nn.SyncBatchNorm.convert_sync_batchnorm(getattr(parent, child)))
        self._broadcast_buffers = [
            b for n, b in method.named_buffers() if self.buffer_policies[n] == "broadcast"
        ]

    def _replica_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Parameters and every buffer not declared ``local``, by state-dict name."""
        local = {n for n, pol in self.buffer_policies.items() if pol == "local"}
        return [(k, v) for k, v in self.method.state_dict().items() if torch.is_tensor(v) and k not in local]

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
            "backbone": self.backbone.to_dict(),
            "preprocessing": self.cfg.data.preprocess.contract(),
            "version": __version__,
            "transfer_parts": dict(self.transfer_parts),
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
            order, self.batch_size, self.iters[phase_index], self.env.rank, self.env.world_size, start_iter
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
        """The shared optimisation step (``engine.step``) on every micro-batch, the method's
        ``on_step_end`` (EMA, queues) as its post-step hook, then the buffers. Returns the logged
        scalars, or None when the step was skipped as non-finite."""
        tc, env, method = self.tc, self.env, self.method
        phase = self.phases[phase_index]
        gi = self.pos.global_iter
        last: list[Any] = [None]

        def prepare(m: int, batch: Any) -> Any:
            seed_all(step_seed(tc.seed, env.rank, gi, m))
            last[0] = to_device(batch, env.device)
            return last[0]

        def forward(batch: Any) -> dict[str, torch.Tensor]:
            out = method.training_step(batch, phase)
            return {"loss": out.loss, **out.terms}

        res = optimisation_step(
            micro_batches,
            forward,
            optimizer=self.optimizer,
            scaler=self.scaler,
            params=self.params,
            precision=self.precision,
            env=env,
            grad_clip=tc.grad_clip,
            prepare=prepare,
            before_step=lambda: self.schedule.step(self.pos.round, gi),
            stop_requested=lambda: self.stop_signal is not None,
            after_step=lambda: method.on_step_end(phase, gi, self.total_iters),  # only a taken step
        )
        self.stop_all = res.stop
        scalars = {f"loss/{k}": v for k, v in res.terms.items()}
        if res.grad_norm is not None:
            scalars["grad_norm"] = res.grad_norm
        if res.bad:
            self.nonfinite.bad(
                gi, res.bad_terms, f"phase {phase}", "no optimiser step, no EMA update", phase=phase
            )
            return None
        self.nonfinite.good()
        assert res.lr is not None
        scalars["lr"] = res.lr
        last_batch = last[0]
        # e.g. BatchNorm statistics: rank 0's (also after an fp16-overflow skip: the forward ran);
        # after the post-step hook (EMA, queues), which must not read broadcast buffers
        broadcast_tensors_(self._broadcast_buffers, env)
        for k, v in res.after.items():
            scalars[k if "/" in k else f"method/{k}"] = v
        if tc.image_every and env.is_main and (gi + 1) % tc.image_every == 0 and last_batch is not None:
            self._images(last_batch, phase, gi)
        if tc.monitor_every and env.is_main and (gi + 1) % tc.monitor_every == 0 and last_batch is not None:
            self._monitor(last_batch, gi)
        return scalars

    @property
    def bad_streak(self) -> int:
        return self.nonfinite.streak

    def _images(self, batch: Any, phase: str, gi: int) -> None:
        # fork_rng: views drawn for the pictures must not shift the training RNG (exact resume)
        devices = [self.env.device] if self.env.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            pictures = self.method.image_summaries(batch, phase)
        if self.logger:
            for name, pic in pictures.items():
                self.logger.image(gi, f"images/{phase}/{name}", pic)

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
    def fit(self, resume: bool | str | Path | None = None, progress: BarFactory | None = None) -> Path:
        """Train to the end (resuming as ``resume`` says) and return ``last.pt``. ``progress``
        makes the progress bar (default: a tqdm line when ``train.progress``)."""
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
        self.nonfinite.logger = self.logger
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
                self.rounds,
                self.total_iters,
                env.world_size,
                self.micro,
                tc.grad_accum,
                self.batch_size,
                self.precision,
                env.device,
            )
        bar = None
        if env.is_main and (progress is not None or tc.progress):
            bar = (progress or _pretrain_bar)(self.total_iters, self.pos.global_iter, "pretrain")
        previous = self._install_signal_handlers()
        try:
            self._loop(bar)
        finally:
            restore_handlers(previous)
            if bar is not None:
                bar.close()
            self.logger.close()
        if env.is_main:
            provenance.record(self.run_dir, env.device)  # the run's facts, for `asa3d report`
        return self.run_dir / ckpt_io.LAST

    def _install_signal_handlers(self) -> dict[int, Any]:
        """SIGTERM/SIGINT ask for a stop at the next step boundary (checkpoint, then exit). Every
        rank sees the request through the step's all-reduce, so all stop after the same step."""

        def request_stop(signum: int) -> None:
            self.stop_signal = signum

        return install_stop_handlers(request_stop)

    def check_replicas(self) -> None:
        """Guard that every rank holds the same parameters (student, teacher, heads) and the same
        buffers (except those declared ``local``): per-tensor checksums in one all-reduce, MAX vs
        MIN; the error names the first tensor that differs and its declared policy."""
        bad = first_mismatch(self._replica_tensors(), self.env)
        if bad is None:
            return
        name, hi, lo = bad
        kind = (
            f"buffer (policy {self.buffer_policies[name]!r})" if name in self.buffer_policies else "parameter"
        )
        raise RuntimeError(
            f"ranks hold different values of {name} ({kind}) after round {self.pos.round} (checksum max "
            f"{hi!r} vs min {lo!r}). A buffer that differs by rank must be declared in the method's "
            "buffer_policy(): 'broadcast', 'sync_bn', 'gathered' (filled with self.dist.all_gather) "
            "or 'local'."
        )

    def _loop(self, bar: Any) -> None:
        tc, env = self.tc, self.env
        while self.pos.round < self.rounds:
            r = self.pos.round
            if self.pos.step == 0 and r in self.stage_starts[1:]:
                self.optimizer.state.clear()  # a new stage: a new optimiser (no momenta, no Adam moments)
            self.method.on_round_start(r, self.rounds)
            loaders: dict[int, Any] = {}
            start_consumed = [0] * len(self.phases)
            for p, _ in self.plan[: self.pos.step]:
                start_consumed[p] += 1
            while self.pos.step < len(self.plan) and self.pos.global_iter < self.total_iters:
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
                    scalars["throughput/volumes_per_s"] = self.batch_size / max(dt, 1e-9)
                    if tc.log_every and (gi % tc.log_every == 0 or self.pos.global_iter == self.total_iters):
                        assert self.logger is not None
                        # each phase's losses also on a curve of its own (phases alternate per epoch)
                        per_phase = {
                            f"{self.phases[p]}/{k}": v for k, v in scalars.items() if k.startswith("loss/")
                        }
                        self.logger.log(gi, {**scalars, **per_phase}, round=r + 1, phase=self.phases[p])
                    if bar is not None:
                        post = {
                            k.split("/", 1)[1]: f"{v:.4g}"
                            for k, v in scalars.items()
                            if k.startswith("loss/")
                        }
                        post["vol/s"] = f"{scalars['throughput/volumes_per_s']:.2f}"
                        bar.set_postfix(post, refresh=False)
                        bar.set_description(f"round {r + 1}/{self.rounds} {self.phases[p]}", refresh=False)
                if bar is not None:
                    bar.update(1)
                mid_round = self.pos.step < len(self.plan) and self.pos.global_iter < self.total_iters
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
        name = signal_name(self.stop_signal)
        last = ckpt_io.latest_checkpoint(self.run_dir)
        return TrainingInterrupted(
            f"stopped by {name} after iteration {self.pos.global_iter}/{self.total_iters}; "
            f"checkpoint: {last}. Run the same command again to resume."
        )


def _pretrain_bar(total: int, initial: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    from asa3d.console import progress_kwargs

    # drawn on a terminal only: no carriage returns in a log file
    return tqdm(total=total, initial=initial, unit="it", desc=desc, **progress_kwargs())


def run_pretrain(
    cfg: PretrainConfig,
    out_dir: str | Path,
    resume: bool | str | Path | None = None,
    *,
    dataset_factory: DatasetFactory | None = None,
    progress: BarFactory | None = None,
) -> Path:
    """Pretrain ``cfg.method`` and return the path of the final checkpoint (``last.pt``).

    The entry point of ``asa3d pretrain``, and of ``asa3d evaluate`` for the inits it pretrains.
    ``resume``: None = auto-resume from ``out_dir`` when it holds a checkpoint; True = must
    resume; a path = resume from that file; False = fresh (refuses a dir with checkpoints).
    ``dataset_factory(phase, spec)`` replaces the on-disk cache (tests, custom data).
    ``progress(total, initial, desc)`` makes the progress bar (``asa3d.progress``).
    Works under ``torchrun`` unchanged (one process per device).
    """
    env = init_distributed(cfg.train.device)
    ok = False
    try:
        trainer = Trainer(cfg, Path(out_dir), env, dataset_factory=dataset_factory)
        path = trainer.fit(resume, progress)
        ok = True
        return path
    finally:
        if ok:
            cleanup(env)
        elif env.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # no barrier: a peer may be gone
