"""``asa3d pretrain`` and ``asa3d plan``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from asa3d.cli_help import add_config_help
from asa3d.config import load_config
from asa3d.config_sections import PretrainConfig
from asa3d.paths import ensure_writable_dir

EXAMPLES = """examples:
  asa3d pretrain --config pretrain/asa_tiny.yaml --out runs/asa data.root=data/phantom/dataset.json
  asa3d pretrain --config pretrain/asa.yaml --out runs/asa_btcv data.root=/data/BTCV data.preset=btcv
  asa3d plan --config pretrain/asa.yaml --gpu-mem-gb 40
"""

EPILOG_HEAD = """overrides: any config key as section.key=value, e.g. data.root=/data/ct train.epochs=2
resume: a run dir holding last.pt resumes automatically; --no-resume refuses to touch it.
multi-GPU: torchrun --nproc_per_node=4 -m asa3d.cli pretrain ... (see docs/scaling.md)

config keys (defaults):
"""


def _help_head() -> str:
    return EXAMPLES + "\n" + EPILOG_HEAD.rsplit("\n\nconfig keys", 1)[0]


def _load_for_help(path: str | None) -> PretrainConfig:
    return load_config(PretrainConfig, path)


def _default_out(config: str | None) -> Path:
    return Path("runs") / "pretrain" / (Path(config).stem if config else "default")


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from asa3d.early_checks import check_pretrain_inputs
    from asa3d.engine.trainer import TrainingDiverged, TrainingInterrupted, run_pretrain

    if int(os.environ.get("RANK", "0")) != 0:
        logging.getLogger().setLevel(logging.WARNING)  # one voice per job
    if isinstance(args.resume, str) and "=" in args.resume and not Path(args.resume).exists():
        # `--resume train.epochs=3`: argparse took the override as CKPT; give it back
        args.overrides, args.resume = [args.resume, *args.overrides], True
    cfg = load_config(PretrainConfig, args.config, args.overrides)
    out = Path(args.out) if args.out else _default_out(args.config)
    ensure_writable_dir(out)  # before any data is read: a bad --out fails at once, naming itself
    resume: bool | str | None = False if args.no_resume else args.resume
    check_pretrain_inputs(out, resume)  # the checkpoint to resume from, read before the cache is built
    try:
        path = run_pretrain(cfg, out, resume)
    except TrainingDiverged as exc:
        print(f"asa3d pretrain: error: {exc}", file=sys.stderr)
        return 3
    except TrainingInterrupted as exc:
        print(f"asa3d pretrain: {exc}", file=sys.stderr)
        return 4
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"done: {path}")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from asa3d.engine.distributed import resolve_device
    from asa3d.engine.memory_plan import format_plan, plan
    from asa3d.engine.precision import seed_all
    from asa3d.methods.base import build_method

    cfg = load_config(PretrainConfig, args.config, args.overrides)
    seed_all(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    method = build_method(cfg.method, cfg.model)
    rows = plan(
        method, cfg.train.precision, device, args.gpu_mem_gb, cfg.train.optimizer, tuple(args.volume_shape)
    )
    per_rank = cfg.train.batch_scope == "per_rank"
    print(format_plan(rows, device, args.gpu_mem_gb, cfg.train.batch_size, per_rank=per_rank))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="self-supervised pretraining of a method on the backbone it declares",
        description="Pretrain a method (one engine for all; torchrun for several devices).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    p.add_argument("--config", help="YAML config (a path, or a name under configs/, e.g. pretrain/asa_tiny)")
    add_config_help(p, _load_for_help, _help_head())
    p.add_argument("--out", help="run directory (default: runs/pretrain/<config name>)")
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CKPT",
        help="resume from CKPT, or from the run dir's last.pt when no path is given "
        "(default: automatic when the run dir holds a checkpoint)",
    )
    g.add_argument(
        "--no-resume",
        action="store_true",
        help="start fresh; refuse if the run dir already holds checkpoints",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.set_defaults(func=_cmd_pretrain)

    q = sub.add_parser(
        "plan",
        help="largest micro-batch per device that fits a memory budget",
        description="Measure one training step of each phase at micro-batch 1 and 2 and extrapolate.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    q.add_argument("--config", help="YAML config")
    add_config_help(q, _load_for_help, _help_head())
    q.add_argument("--gpu-mem-gb", type=float, default=24.0, help="memory budget per device (GB)")
    q.add_argument(
        "--volume-shape",
        type=int,
        nargs=3,
        default=(128, 128, 128),
        metavar=("X", "Y", "Z"),
        help="shape of a whole volume for methods that take whole volumes",
    )
    q.add_argument("overrides", nargs="*", metavar="key=value")
    q.set_defaults(func=_cmd_plan)
