"""Command-line verbs of the evaluation package: finetune, probe, evaluate, predict, report."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from asa3d.cli_help import add_config_help
from asa3d.config import load_config
from asa3d.eval.config_sections import EvaluateConfig, FinetuneConfig  # light: no torch
from asa3d.paths import ensure_writable_dir

log = logging.getLogger(__name__)


def _default_out(kind: str) -> Path:
    return Path("runs") / kind / time.strftime("%Y%m%d-%H%M%S")


def _verb(args: argparse.Namespace, fallback: str) -> str:
    """The full verb the user typed (``asa3d probe``), for messages; never the config's mode."""
    return getattr(args, "_verb", None) or f"asa3d {fallback}"


def _probe_mode(strict: bool) -> str:
    return "strict_linear" if strict else "probe"


def _train_overrides(ns: argparse.Namespace, mode: str | None) -> list[str]:
    """The ``key=value`` overrides a finetune/probe command line implies, in the order they apply:
    the verb's mode, the overrides given, then ``--init``."""
    out = [f"mode={mode}"] if mode is not None else []
    out += list(getattr(ns, "overrides", None) or [])
    if getattr(ns, "init", None):
        out.append(f"init.source={ns.init}")
    return out


def _finetune(args: argparse.Namespace, mode: str | None) -> int:
    import os
    import sys

    from asa3d.early_checks import check_finetune_inputs
    from asa3d.eval.finetune import (
        CKPT_DIR,
        FINISHED,
        TrainingDiverged,
        TrainingInterrupted,
        run_finetune,
    )

    verb = _verb(args, "finetune")

    main = int(os.environ.get("RANK", "0")) == 0
    if not main:
        logging.getLogger().setLevel(logging.WARNING)  # one voice per job
    if isinstance(args.resume, str) and "=" in args.resume and not Path(args.resume).exists():
        # `--resume train.iterations=50`: argparse took the override as CKPT; give it back
        args.overrides, args.resume = [args.resume, *args.overrides], True
    cfg = load_config(FinetuneConfig, args.config, _train_overrides(args, mode))
    out = ensure_writable_dir(Path(args.out) if args.out else _default_out(verb.split()[-1]))
    resume: bool | str | None = False if args.no_resume else args.resume
    finished = (out / FINISHED).exists()  # metrics.json is written last: a finished run
    if finished and not args.overwrite:
        raise FileExistsError(
            f"{out} holds a finished run ({FINISHED}); pass --overwrite to replace it, "
            "or choose another --out."
        )
    # replacing a finished run, or --overwrite --no-resume: rank 0 deletes every output of the old
    # run (its checkpoints included) before training starts, so a replacement that dies leaves a
    # folder that cannot pass for a finished run, nor for the old one
    fresh = args.overwrite and (finished or resume is False)
    # --init and the checkpoint to resume from are read now, before the cache is built or a
    # model is made: a bad file fails at once (exit 2), naming itself (a replaced run's old
    # checkpoint is deleted, not read)
    check_finetune_inputs(cfg.init.source, out / CKPT_DIR, False if fresh else resume)
    try:
        doc = run_finetune(cfg, out, resume=resume, overwrite=fresh)
    except TrainingDiverged as exc:
        print(f"{verb}: error: {exc}", file=sys.stderr)
        return 3
    except TrainingInterrupted as exc:
        print(f"{verb}: {exc}", file=sys.stderr)
        return 4
    if not main:
        return 0
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
    return _finetune(args, _probe_mode(args.strict))


def cmd_evaluate(args: argparse.Namespace) -> int:
    import sys

    from asa3d.early_checks import check_init_source
    from asa3d.engine.step import TrainingDiverged, TrainingInterrupted
    from asa3d.eval.evaluate import run_grid

    cfg = load_config(EvaluateConfig, args.config, args.overrides)
    out = ensure_writable_dir(Path(args.out) if args.out else _default_out("evaluate"))
    for spec in cfg.grid.inits:  # every given weights file, read before the cache and the first cell
        if not spec.pretrain_config:
            check_init_source(spec.source, f"grid.inits[{spec.name}].source")
    t0 = time.time()
    try:
        run_grid(cfg, out, overwrite=args.overwrite)
    except TrainingDiverged as exc:
        print(f"asa3d evaluate: error: {exc}", file=sys.stderr)
        return 3
    except TrainingInterrupted as exc:  # the cell (or pretraining) checkpointed: a rerun resumes it
        print(f"asa3d evaluate: {exc}", file=sys.stderr)
        return 4
    print((out / "table.md").read_text())
    print(f"evaluation written to {out} in {time.time() - t0:.0f} s (report: {out / 'report.html'})")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from asa3d.early_checks import check_predict_model
    from asa3d.eval.predict import predict_files

    check_predict_model(args.model)  # model.json and the weights, read before any scan
    ensure_writable_dir(args.out)
    report: dict = {}
    written = predict_files(
        args.model,
        args.input,
        args.out,
        device=args.device,
        overlap=args.overlap,
        overwrite=args.overwrite,
        skip_bad=args.skip_bad,
        split=args.split,
        progress=True,
        report=report,
    )
    print(f"wrote {len(written)} label map(s) to {args.out} (list: {report['manifest']})")
    if report["skipped"]:
        print(f"skipped {len(report['skipped'])} bad scan(s):")
        for s in report["skipped"]:
            print(f"  {s['id']}: {s['reason']}")
    return 0


PREDICT_EPILOG = """examples:
  asa3d predict --model runs/ft --input scans/ --out preds/
  asa3d predict --model runs/ft --input A/CT_image.nii.gz B/CT_image.nii.gz --out preds/
      # -> preds/A_CT_image_seg.nii.gz, preds/B_CT_image_seg.nii.gz
  asa3d predict --model runs/ft/model_final.pt --input sts.json --split test --out preds/ --skip-bad

--input takes scan files, DICOM series folders, folders of scans (any layout `asa3d data summary`
reads) and dataset.json files; outputs are <case id>_seg.nii.gz in each scan's original geometry,
and predictions.json (written last) lists them. Scans are validated as `asa3d data prepare` does:
a bad scan stops the run with its name (exit 2), or with --skip-bad is listed and skipped."""


def cmd_report(args: argparse.Namespace) -> int:
    from asa3d.eval.report import build_report

    if args.out and Path(args.out).exists() and not args.overwrite:
        raise FileExistsError(
            f"--out {args.out} exists; pass --overwrite to replace it, or choose another file name."
        )
    print(build_report(args.run_dir, args.out))
    return 0


def _add_train_args(
    p: argparse.ArgumentParser, default_config: str, head: str = "", probe: bool = False
) -> None:
    p.add_argument("--config", default=default_config, help=f"YAML config (default {default_config})")

    def implied(ns: argparse.Namespace) -> list[str]:  # probe's mode, and flags given before --help
        return _train_overrides(ns, _probe_mode(bool(getattr(ns, "strict", False))) if probe else None)

    add_config_help(
        p,
        lambda path, ov=(): load_config(FinetuneConfig, path or default_config, list(ov)),
        head,
        overrides=implied,
    )
    p.add_argument("--out", help="run directory (default runs/<verb>/<timestamp>)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a finished run in --out (with --no-resume: also an unfinished one's checkpoint)",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CKPT",
        help="resume from CKPT, or from OUT/checkpoints when no path is given "
        "(default: automatic when OUT/checkpoints holds one)",
    )
    g.add_argument(
        "--no-resume",
        action="store_true",
        help="start fresh; refuse if OUT/checkpoints holds a checkpoint (unless --overwrite)",
    )
    p.add_argument(
        "--init",
        help="scratch, or a checkpoint (.pt), export (.safetensors), MONAI model_swinvit.pt "
        "or state dict; same as init.source=...",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.root=PATH")


FINETUNE_EPILOG = """examples:
  asa3d finetune --config finetune/phantom_tiny.yaml --init asa.safetensors --out runs/ft \\
      data.root=data/phantom/dataset.json
  asa3d finetune --config finetune/btcv.yaml --init runs/asa/last.pt data.root=/data/BTCV
  asa3d finetune --config finetune/phantom_tiny.yaml train.iterations=50 model.feature_size=12 ...
  torchrun --nproc_per_node=2 -m asa3d.cli finetune --config finetune/btcv.yaml train.batch_size=2 ...

--init takes what `asa3d pretrain --out runs/asa` writes (runs/asa/last.pt), its export (`asa3d
export runs/asa/last.pt --out asa.safetensors`), a fine-tuned run folder, or MONAI's released
model_swinvit.pt.

resume: OUT/checkpoints (every train.ckpt_every iterations, and on SIGTERM) resumes automatically;
--no-resume refuses it. docs/evaluation.md, "Long runs".
"""

PROBE_EPILOG = """examples:
  asa3d probe --config finetune/phantom_tiny.yaml --init asa.safetensors data.root=data/phantom/dataset.json
  asa3d probe --strict --config finetune/btcv.yaml --init asa.safetensors data.root=/data/BTCV

probe runs with mode=probe (the backbone's encoder frozen, the decoder and head trained: the
paper's "linear" protocol); --strict runs mode=strict_linear (a 1x1x1 convolution over frozen
multi-scale encoder features). The key listing below shows the mode of the flags given before --help.
"""

EVALUATE_EPILOG = """examples:
  asa3d evaluate --config configs/evaluate/phantom_tiny.yaml --out runs/eval_phantom
  asa3d evaluate --config evaluate/btcv.yaml --out runs/eval_btcv data.root=/data/BTCV grid.seeds=[0,1,2]

A rerun with the same --out keeps finished cells and runs the rest.
"""

REPORT_EPILOG = """examples:
  asa3d report runs/eval_phantom                   # -> runs/eval_phantom/report.html
  asa3d report runs/ft --out ft_report.html        # a single fine-tuning run
"""


def add_commands(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "finetune",
        help="fine-tune the backbone for segmentation (ASA downstream protocol)",
        description="Fine-tune the configured backbone for segmentation from scratch or from pretrained "
        "weights (the ASA downstream protocol), then score the test split (per-organ Dice).",
        formatter_class=fmt,
        add_help=False,
    )
    _add_train_args(p, "finetune/swinunetr.yaml", FINETUNE_EPILOG)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser(
        "probe",
        help="linear probing: frozen encoder (paper) or --strict 1x1x1 conv probe",
        description="Probe a pretrained encoder: freeze the encoder and train the rest (the paper's "
        "'linear' protocol), or with --strict a 1x1x1 convolution over frozen encoder features.",
        formatter_class=fmt,
        add_help=False,
    )
    _add_train_args(p, "finetune/swinunetr.yaml", PROBE_EPILOG, probe=True)
    p.add_argument(
        "--strict",
        action="store_true",
        help="mode=strict_linear: a 1x1x1 conv over frozen multi-scale encoder features "
        "(without it mode=probe: frozen encoder, the paper's protocol)",
    )
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser(
        "evaluate",
        help="grid of inits x {finetune, probe} x label fractions x seeds -> "
        "tables, stats, plots, report.html",
        description="The label-efficiency grid: every initialisation x mode x label fraction x seed "
        "is one fine-tune; then per-organ tables, paired statistics against the reference, plots "
        "and report.html.",
        formatter_class=fmt,
        add_help=False,
    )
    p.add_argument("--config", required=True, help="e.g. configs/evaluate/phantom_tiny.yaml")
    add_config_help(p, lambda path: load_config(EvaluateConfig, path), EVALUATE_EPILOG)
    p.add_argument("--out", help="output dir (resumable: finished cells are kept)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="redo in place what --out holds from other settings (cells, pretrainings, phantom) "
        "instead of refusing it",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "predict",
        help="segment new scans; label maps in each scan's original geometry",
        description="Segment scans with a fine-tuned (or probed) run: the run's preprocessing, "
        "sliding-window inference, labels resampled back onto each scan's own grid.",
        epilog=PREDICT_EPILOG,
        formatter_class=fmt,
    )
    p.add_argument("--model", required=True, help="fine-tune run dir, or its model_final.pt")
    p.add_argument(
        "--input", required=True, nargs="+", help="scan files, DICOM folders, folders of scans, dataset.json"
    )
    p.add_argument("--out", required=True, help="output folder for <case id>_seg.nii.gz")
    p.add_argument("--split", default="all", help="section of a dataset.json input (default: all cases)")
    p.add_argument("--overwrite", action="store_true", help="replace outputs that already exist in --out")
    p.add_argument("--skip-bad", action="store_true", help="skip (and list) scans that fail validation")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    p.add_argument("--overlap", type=float, default=None, help="sliding-window overlap (default: the run's)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "report",
        help="self-contained HTML report of a run or an evaluation grid",
        description="Write one self-contained HTML file (tables, plots, statistics, provenance) "
        "from an evaluation grid's or a fine-tuning run's outputs.",
        epilog=REPORT_EPILOG,
        formatter_class=fmt,
    )
    p.add_argument("run_dir", help="an evaluation grid's --out or a fine-tuning run folder")
    p.add_argument(
        "--out", help="HTML path (default RUN_DIR/report.html, which is rewritten; an existing --out is not)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_report)
