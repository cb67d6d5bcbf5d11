"""``asa3d demo``: the whole pipeline on the embedded phantom, in one command.

phantom CTs -> data summary -> preprocessed cache -> ASA pretraining (tiny) -> export of the
teacher -> fine-tune from the ASA export and from scratch -> per-organ Dice table of both.

Each step writes into OUT and is skipped when its output is already there, so an interrupted
demo resumes (pretraining resumes mid-run from its own checkpoints). Everything runs through
the same functions as the separate verbs (``asa3d data``, ``pretrain``, ``export``,
``finetune``); the demo only chains them with the tiny configs.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from asa3d.atomic import atomic_write_text
from asa3d.config import load_config

log = logging.getLogger(__name__)

PRETRAIN_CONFIG = "pretrain/asa_tiny.yaml"
FINETUNE_CONFIG = "finetune/phantom_tiny.yaml"


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.time()


def _done(t0: float, what: str) -> None:
    print(f"   {what} ({time.time() - t0:.0f} s)", flush=True)


def dice_table(results: Mapping[str, Mapping[str, Any]], label_names: Mapping[int, str]) -> str:
    """Markdown table: one row per organ (foreground classes), one column per initialisation,
    plus the difference of the last column against the first."""
    inits = list(results)
    per = {k: results[k]["summary"]["dice"]["per_class"] for k in inits}
    head = ["organ", *inits]
    if len(inits) > 1:
        head.append(f"{inits[-1]} - {inits[0]}")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    organs = [label_names[c] for c in sorted(label_names) if c != 0]
    for name in [*organs, "mean"]:
        vals = [per[k].get(name) if name != "mean" else results[k]["summary"]["dice"]["mean"] for k in inits]
        cells = ["n/a" if v is None or v != v else f"{v:.3f}" for v in vals]
        if len(inits) > 1:
            a, b = vals[0], vals[-1]
            ok = a is not None and b is not None and a == a and b == b
            cells.append(f"{b - a:+.3f}" if ok else "n/a")
        label = f"**{name}**" if name == "mean" else name
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return "\n".join(lines) + "\n"


def run_demo(
    out_dir: str | Path,
    n_cases: int = 10,
    n_validation: int = 2,
    finetune_iterations: int = 100,
    pretrain_overrides: Sequence[str] = (),
    finetune_overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Run (or resume) the demo in ``out_dir``; returns ``{init: metrics}`` of the fine-tunes."""
    from asa3d.config_sections import PretrainConfig
    from asa3d.data.datalist import load_datalist
    from asa3d.data.phantom import write_phantom_dataset
    from asa3d.data.prepare import ensure_cache
    from asa3d.data.summary import format_summary, summarize
    from asa3d.engine.trainer import run_pretrain
    from asa3d.eval.finetune import FinetuneConfig, run_finetune
    from asa3d.export import export_checkpoint

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.time()

    t = _step(f"1/6 phantom: {n_cases} labelled abdominal CT phantoms ({n_validation} held out)")
    ds_json = out / "phantom" / "dataset.json"
    if not ds_json.exists():
        write_phantom_dataset(out / "phantom", n=n_cases, n_validation=n_validation)
    _done(t, str(ds_json))

    t = _step("2/6 data summary")
    rep = summarize(load_datalist(ds_json, split="all"))
    print(format_summary(rep))
    atomic_write_text(out / "data_summary.json", json.dumps(rep, indent=1, default=str))
    _done(t, "summary written to data_summary.json")

    root = [f"data.root={ds_json}"]
    ft_base = [*root, f"train.iterations={finetune_iterations}", "eval.split=validation"]
    ft_cfg = load_config(FinetuneConfig, FINETUNE_CONFIG, [*ft_base, *finetune_overrides])
    # Pretrain on the fine-tuning grid so the export's preprocessing contract matches downstream.
    spacing = "data.preprocess.spacing=[" + ",".join(str(s) for s in ft_cfg.data.preprocess.spacing) + "]"
    pre_cfg = load_config(PretrainConfig, PRETRAIN_CONFIG, [*root, spacing, *pretrain_overrides])

    t = _step("3/6 prepare: preprocessed caches (pretraining and fine-tuning grids)")
    for cfg, labels in ((pre_cfg.data, False), (ft_cfg.data, True)):
        index = ensure_cache(cfg, with_labels=labels)
        print(f"   {len(index.cases)} cases at {cfg.preprocess.spacing} mm in {index.cache_dir}")
    _done(t, "caches ready")

    t = _step(f"4/6 ASA pretraining ({PRETRAIN_CONFIG})")
    ckpt = run_pretrain(pre_cfg, out / "pretrain", resume=None)
    _done(t, f"checkpoint {ckpt}")

    t = _step("5/6 export the teacher backbone")
    export = out / "asa_teacher.safetensors"
    export_checkpoint(ckpt, export, overwrite=True)  # derived from this demo's checkpoint: a rerun redoes it
    _done(t, f"{export} (+ .json sidecar)")

    t = _step(f"6/6 fine-tune on the phantom labels ({finetune_iterations} iterations): scratch vs ASA")
    results: dict[str, Any] = {}
    for name, source in (("scratch", "scratch"), ("asa", str(export))):
        run = out / "finetune" / name
        done = run / "metrics.json"
        if done.exists() and json.loads(done.read_text()).get("iterations") == ft_cfg.train.iterations:
            results[name] = json.loads(done.read_text())
            print(f"   {name}: reused {done}")
            continue
        cfg = load_config(
            FinetuneConfig, FINETUNE_CONFIG, [*ft_base, *finetune_overrides, f"init.source={source}"]
        )
        doc = run_finetune(cfg, run)
        results[name] = doc
        dice = doc["summary"]["dice"]["mean"]
        print(f"   {name}: loss {doc['loss_first']:.3f} -> {doc['loss_last']:.3f}, mean Dice {dice:.3f}")
    _done(t, "fine-tunes finished")

    index = ensure_cache(ft_cfg.data, with_labels=True)
    table = dice_table(results, index.label_names)
    note = (
        f"Per-organ Dice on the {n_validation} held-out phantoms (validation split, fine-tuning grid, "
        f"background excluded), after {finetune_iterations} fine-tuning iterations.\n"
        "Demo scale: a few minutes of CPU pretraining is not expected to beat scratch by a margin;\n"
        "`asa3d evaluate` runs the full protocol (fractions x seeds, paired statistics).\n\n"
    )
    atomic_write_text(out / "dice_table.md", note + table)
    atomic_write_text(
        out / "results.json",
        json.dumps(
            {
                k: {"summary": v["summary"], "loss_first": v["loss_first"], "loss_last": v["loss_last"]}
                for k, v in results.items()
            },
            indent=1,
        ),
    )
    print("\n" + note + table)
    print(f"demo finished in {time.time() - t_all:.0f} s; everything is in {out}")
    return results


def _cmd_demo(args: argparse.Namespace) -> int:
    run_demo(
        args.out,
        n_cases=args.n,
        n_validation=args.n_validation,
        finetune_iterations=args.finetune_iterations,
        pretrain_overrides=args.pretrain,
        finetune_overrides=args.finetune,
    )
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole pipeline on the embedded phantom (about 10 minutes on 2 CPU cores)",
        description=__doc__,
        epilog="examples:\n  asa3d demo --out runs/demo\n"
        "  asa3d demo --out runs/demo_quick --n 6 --finetune-iterations 20",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo; reruns resume)")
    p.add_argument("--n", type=int, default=10, help="phantom cases (default 10)")
    p.add_argument(
        "--n-validation", type=int, default=2, help="of which held out for the Dice table (default 2)"
    )
    p.add_argument("--finetune-iterations", type=int, default=100, help="per fine-tune (default 100)")
    p.add_argument(
        "--pretrain", nargs="*", default=[], metavar="key=value", help=f"overrides of {PRETRAIN_CONFIG}"
    )
    p.add_argument(
        "--finetune", nargs="*", default=[], metavar="key=value", help=f"overrides of {FINETUNE_CONFIG}"
    )
    p.set_defaults(func=_cmd_demo)
