"""Command-line verbs of the evaluation package: finetune, probe, evaluate, predict, report."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from asa3d.config import describe, load_config

log = logging.getLogger(__name__)


def _default_out(kind: str) -> Path:
    return Path("runs") / kind / time.strftime("%Y%m%d-%H%M%S")


def _epilog(cls: type) -> str:
    return "config keys (override with key=value):\n" + "\n".join(describe(cls))


def _finetune(args: argparse.Namespace, mode: str | None) -> int:
    from asa3d.eval.finetune import FinetuneConfig, run_finetune

    overrides = list(args.overrides)
    if mode is not None:
        overrides.insert(0, f"mode={mode}")
    if args.init:
        overrides.append(f"init.source={args.init}")
    cfg = load_config(FinetuneConfig, args.config, overrides)
    out = Path(args.out) if args.out else _default_out(cfg.mode)
    doc = run_finetune(cfg, out)
    summ = doc.get("summary", {}).get("dice")
    msg = (
        f"{cfg.mode}: {doc['iterations']} iterations, loss {doc['loss_first']:.4f} -> {doc['loss_last']:.4f}"
    )
    if summ:
        msg += f"; test mean Dice {summ['mean']:.4f} ({doc['test_split']})"
    print(msg)
    print(f"run dir: {out}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    return _finetune(args, None)


def cmd_probe(args: argparse.Namespace) -> int:
    return _finetune(args, "strict_linear" if args.strict else "probe")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from asa3d.eval.evaluate import EvaluateConfig, run_grid

    cfg = load_config(EvaluateConfig, args.config, args.overrides)
    out = Path(args.out) if args.out else _default_out("evaluate")
    t0 = time.time()
    run_grid(cfg, out)
    print((out / "table.md").read_text())
    print(f"evaluation written to {out} in {time.time() - t0:.0f} s (report: {out / 'report.html'})")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from asa3d.eval.predict import predict_files

    written = predict_files(args.model, args.input, args.out, device=args.device, overlap=args.overlap)
    print(json.dumps([str(p) for p in written], indent=1))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from asa3d.eval.report import build_report

    print(build_report(args.run_dir, args.out))
    return 0


def _add_train_args(p: argparse.ArgumentParser, default_config: str) -> None:
    p.add_argument("--config", default=default_config, help=f"YAML config (default {default_config})")
    p.add_argument("--out", help="run directory (default runs/<verb>/<timestamp>)")
    p.add_argument(
        "--init",
        help="scratch, or a checkpoint (.pt), export (.safetensors), MONAI model_swinvit.pt "
        "or state dict; same as init.source=...",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.root=PATH")


def add_commands(sub: argparse._SubParsersAction) -> None:
    from asa3d.eval.evaluate import EvaluateConfig
    from asa3d.eval.finetune import FinetuneConfig

    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "finetune",
        help="fine-tune SwinUNETR for segmentation (ASA downstream protocol)",
        epilog=_epilog(FinetuneConfig),
        formatter_class=fmt,
    )
    _add_train_args(p, "finetune/swinunetr.yaml")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser(
        "probe",
        help="linear probing: frozen swinViT (paper) or --strict 1x1x1 conv probe",
        epilog=_epilog(FinetuneConfig),
        formatter_class=fmt,
    )
    _add_train_args(p, "finetune/swinunetr.yaml")
    p.add_argument(
        "--strict",
        action="store_true",
        help="truly linear: a 1x1x1 conv over frozen multi-scale encoder features",
    )
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser(
        "evaluate",
        help="grid of inits x {finetune, probe} x label fractions x seeds -> "
        "tables, stats, plots, report.html",
        epilog=_epilog(EvaluateConfig),
        formatter_class=fmt,
    )
    p.add_argument("--config", required=True, help="e.g. configs/evaluate/phantom_tiny.yaml")
    p.add_argument("--out", help="output dir (resumable: finished cells are kept)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="segment new scans; label maps in each scan's original geometry")
    p.add_argument("--model", required=True, help="fine-tune run dir, or its model_final.pt")
    p.add_argument("--input", required=True, nargs="+", help="scan files and/or folders")
    p.add_argument("--out", required=True, help="output folder for <id>_seg.nii.gz")
    p.add_argument("--device", default="auto")
    p.add_argument("--overlap", type=float, default=None, help="sliding-window overlap (default: the run's)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("report", help="self-contained HTML report of a run or an evaluation grid")
    p.add_argument("run_dir")
    p.add_argument("--out", help="HTML path (default RUN_DIR/report.html)")
    p.set_defaults(func=cmd_report)
