"""``asa3d data {phantom, prepare, summary}``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from asa3d.config import ConfigError, apply_overrides, describe, from_dict, read_yaml
from asa3d.config_sections import DataConfig


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in --help, and epilogs kept as written."""


def _data_config(args: argparse.Namespace) -> DataConfig:
    """config file ``data:`` section < ``data.key=value`` overrides < explicit flags."""
    data: dict[str, Any] = {}
    if args.config:
        doc = read_yaml(args.config)
        data = dict(doc.get("data", doc if "root" in doc else {}))
    source = None
    overrides = []
    for tok in args.items:
        if "=" in tok and not Path(tok).exists():
            key = tok.split("=", 1)[0]
            overrides.append(tok[len("data.") :] if key.startswith("data.") else tok)
        elif source is None:
            source = tok
        else:
            raise ConfigError(f"unexpected argument {tok!r}: give one SOURCE and key=value overrides.")
    data = apply_overrides(data, overrides)
    flags = {
        "root": source,
        "preset": args.preset,
        "labels": args.labels,
        "split": args.split,
        "cache_dir": args.cache_dir,
    }
    if getattr(args, "workers", None) is not None:
        flags["num_workers"] = args.workers
    if getattr(args, "skip_bad", False):
        flags["skip_bad"] = True
    data.update({k: v for k, v in flags.items() if v is not None})
    pre = dict(data.get("preprocess") or {})
    if getattr(args, "spacing", None):
        pre["spacing"] = list(args.spacing)
    if getattr(args, "window", None):
        pre["window"] = list(args.window)
    if pre:
        data["preprocess"] = pre
    return from_dict(DataConfig, data, where="data")


def _cmd_phantom(args: argparse.Namespace) -> int:
    from asa3d.data.phantom import write_phantom_dataset  # lazy: pulls scipy

    path = write_phantom_dataset(
        Path(args.out),
        n=args.n,
        seed=args.seed,
        shape=tuple(args.shape),
        spacing=tuple(args.spacing),
        n_validation=args.n_validation,
    )
    print(f"wrote {args.n} phantom CT volumes with labels; datalist: {path}")
    print(f"next: asa3d data prepare {path}")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from asa3d.data.prepare import datalist_from_config, ensure_cache

    cfg = _data_config(args)
    if args.labels_mode == "auto":
        with_labels = datalist_from_config(cfg).has_labels if cfg.root else False
    else:
        with_labels = args.labels_mode == "yes"
    index = ensure_cache(cfg, with_labels=with_labels)
    print(
        f"cache {index.cache_dir}: {len(index)} case(s) of {index.name!r}/{index.split} "
        f"({index.reused} reused, {index.built} built), labels: {'yes' if with_labels else 'no'}"
    )
    print(f"preprocessing: {json.dumps(index.preprocess)}")
    total = sum(f.stat().st_size for c in index.cases for f in c.dir.iterdir())
    print(f"size on disk: {total / 1e6:.1f} MB; index: {index.cache_dir / 'index.json'}")
    if index.rejected:
        print(f"rejected ({len(index.rejected)}):")
        for r in index.rejected:
            print(f"  {r['id']}: {r['reason']}")
    return 0


def _cmd_summary(args: argparse.Namespace) -> int:
    from asa3d.data.datalist import load_datalist
    from asa3d.data.summary import format_summary, summarize

    dl = load_datalist(root=args.source, split=args.split, labels=args.labels, preset=args.preset)
    rep = summarize(dl)
    print(format_summary(rep))
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=1, default=str))
        print(f"written: {args.json}")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "data",
        help="make a phantom, prepare (cache) or summarise a dataset",
        description="Data preparation verbs.",
        formatter_class=_Formatter,
    )
    sub = p.add_subparsers(dest="data_command", metavar="VERB")
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])

    ph = sub.add_parser(
        "phantom", help="write a labelled procedural CT phantom dataset", formatter_class=_Formatter
    )
    ph.add_argument("--n", type=int, default=8, help="number of volumes")
    ph.add_argument("--out", required=True, help="output folder (a dataset.json is written there)")
    ph.add_argument(
        "--seed", type=int, default=0, help="subject i is drawn from (seed, i): the same whatever --n is"
    )
    ph.add_argument(
        "--shape", type=int, nargs=3, default=(96, 96, 80), metavar=("X", "Y", "Z"), help="voxels per axis"
    )
    ph.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        default=(4.0, 4.0, 4.0),
        metavar=("SX", "SY", "SZ"),
        help="voxel size in mm",
    )
    ph.add_argument("--n-validation", type=int, default=0, help="cases listed under 'validation'")
    ph.set_defaults(func=_cmd_phantom)

    pr = sub.add_parser(
        "prepare",
        help="read, validate, preprocess and cache a dataset",
        formatter_class=_Formatter,
        description="Build (or reuse) the preprocessed cache of a dataset. SOURCE is a dataset.json, "
        "a folder of scans, or a preset's download folder; key=value overrides set DataConfig keys "
        "(data.root=PATH, data.preprocess.spacing=[1.5,1.5,2.0], ...).",
        epilog="DataConfig keys (defaults):\n" + "\n".join(describe(DataConfig, "data.")),
    )
    pr.add_argument("items", nargs="*", metavar="SOURCE|key=value", help="dataset + dotted overrides")
    pr.add_argument("--config", help="YAML config whose 'data:' section is used")
    pr.add_argument("--preset", help="btcv | amos22_paper | amos22_ct | lits | pancreas_ct | luna16 | msd")
    pr.add_argument("--labels", help="folder of label maps matched by file name (folder datalists)")
    pr.add_argument("--split", help="training | validation | test | all (config default: training)")
    pr.add_argument("--cache-dir", help="cache folder (default: <root>/.asa3d_cache or ~/.cache/asa3d)")
    pr.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        metavar=("SX", "SY", "SZ"),
        help="target spacing in mm (config default: 1.5 1.5 2.0)",
    )
    pr.add_argument(
        "--window",
        type=float,
        nargs=2,
        metavar=("LO", "HI"),
        help="HU window scaled to [0, 1] (config default: -175 250)",
    )
    pr.add_argument("--workers", type=int, help="parallel processes (config default: 2)")
    pr.add_argument("--skip-bad", action="store_true", help="report and skip bad scans instead of stopping")
    pr.add_argument(
        "--with-labels",
        dest="labels_mode",
        default="auto",
        choices=["auto", "yes", "no"],
        help="cache label maps (auto: when every case has one)",
    )
    pr.set_defaults(func=_cmd_prepare)

    sm = sub.add_parser(
        "summary",
        help="counts, shapes, spacings, HU statistics and rejected files",
        formatter_class=_Formatter,
    )
    sm.add_argument("source", help="dataset.json, folder of scans, or a preset's download folder")
    sm.add_argument("--preset", default=None)
    sm.add_argument("--labels", default=None, help="folder of label maps matched by file name")
    sm.add_argument("--split", default="training")
    sm.add_argument("--json", default=None, help="also write the report as JSON here")
    sm.set_defaults(func=_cmd_summary)
