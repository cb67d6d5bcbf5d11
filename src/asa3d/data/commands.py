"""``asa3d data {phantom, index, summary, prepare}``.

Kept light: torch, MONAI, nibabel, SimpleITK and blosc2 are imported inside the functions that run
a verb, so ``asa3d --help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asa3d.cli_help import add_config_help
from asa3d.config import ConfigError, apply_overrides, from_dict, load_config, read_yaml, to_dict
from asa3d.config_sections import DataConfig
from asa3d.data.errors import DataError

log = logging.getLogger(__name__)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """A flag's default in --help where it has one (a flag without one says in its own help what
    applies instead), and epilogs kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            "%(default)" not in text
            and not any(action.default is v for v in (None, False, argparse.SUPPRESS))  # 0 is a default
            and (action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE))
        ):
            text += " (default: %(default)s)"
        return text


RUN_SECTIONS = ("model", "method", "train", "eval", "init", "probe", "grid", "mode")  # not data.*


def _split_items(items: list[str]) -> tuple[str | None, list[str], list[str]]:
    """SOURCE, ``data.*`` overrides (prefix dropped), overrides of other run sections."""
    source = None
    data_ov, run_ov = [], []
    for tok in items:
        if "=" in tok and not Path(tok).exists():
            key = tok.split("=", 1)[0]
            if key.startswith("data."):
                data_ov.append(tok[len("data.") :])
            elif key.split(".", 1)[0] in RUN_SECTIONS:
                run_ov.append(tok)
            else:
                data_ov.append(tok)
        elif source is None:
            source = tok
        else:
            raise ConfigError(f"unexpected argument {tok!r}: give one SOURCE and key=value overrides.")
    return source, data_ov, run_ov


def _config_class(doc: dict[str, Any]) -> type | None:
    """The run config a YAML file belongs to, from its sections (None: a bare data section)."""
    if "method" in doc:
        from asa3d.config_sections import PretrainConfig

        return PretrainConfig
    if "grid" in doc:
        from asa3d.eval.config_sections import EvaluateConfig

        return EvaluateConfig
    if any(k in doc for k in ("eval", "init", "probe", "mode")) or "crop_size" in (doc.get("train") or {}):
        from asa3d.eval.config_sections import FinetuneConfig

        return FinetuneConfig
    return None


@dataclass
class RunData:
    """What ``data prepare --config`` needs to know of the run: its data section (with the
    defaults of that run's config class, e.g. fine-tuning's 1.5 mm isotropic spacing), the splits
    it reads, whether it needs labels, and its training crop."""

    data: DataConfig
    splits: list[str]
    labels: bool | None  # None: cache labels when every case has one
    crop: tuple[int, int, int] | None = None
    kind: str = "data"


def _run_data(args: argparse.Namespace) -> RunData:
    """config file (its run class's defaults underneath) < ``data.key=value`` < explicit flags."""
    source, data_ov, run_ov = _split_items(args.items)
    run = RunData(DataConfig(), [], None)
    data: dict[str, Any] = {}
    if args.config:
        doc = read_yaml(args.config)
        cls = _config_class(doc)
        if cls is None:
            if run_ov:
                raise ConfigError(f"{args.config} has no run sections; cannot apply {run_ov}.")
            data = dict(doc.get("data", doc if "root" in doc else {}))
        else:
            full = load_config(cls, args.config, [*run_ov, *(f"data.{o}" for o in data_ov)])
            data_ov = []
            data = to_dict(full.data)
            run.kind = cls.__name__
            if hasattr(full, "eval"):  # fine-tuning / evaluation: labelled, every split it scores
                run.labels = True
                run.splits = [s for s in (full.data.split, full.eval.split, full.eval.val_split) if s]
                run.crop = tuple(full.train.crop_size)
    elif run_ov:
        raise ConfigError(f"{run_ov}: run-section overrides need --config (a pretrain/finetune YAML).")
    data = apply_overrides(data, data_ov)
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
    run.data = from_dict(DataConfig, data, where="data")
    if args.split or not run.splits:
        run.splits = [run.data.split]
    run.splits = list(dict.fromkeys(run.splits))
    return run


def _data_config(args: argparse.Namespace) -> DataConfig:
    return _run_data(args).data


@dataclass
class _DataSection:
    """The data section alone, so ``--help`` lists its keys as ``data.*``."""

    data: DataConfig = field(default_factory=DataConfig)


def _prepare_help_config(path: str | None) -> _DataSection:
    """The data settings ``data prepare --config PATH`` would use (defaults without a config)."""
    if not path:
        return _DataSection()
    doc = read_yaml(path)
    cls = _config_class(doc)
    if cls is None:
        section = dict(doc.get("data", doc if "root" in doc else {}))
        return _DataSection(from_dict(DataConfig, section, where="data"))
    return _DataSection(load_config(cls, path).data)


def _cmd_phantom(args: argparse.Namespace) -> int:
    from asa3d.data.phantom import write_phantom_dataset  # lazy: pulls scipy

    out = Path(args.out)
    if (out / "dataset.json").exists() and not args.overwrite:
        raise DataError(
            f"{out / 'dataset.json'}: a data set is already there; pass --overwrite to rewrite it, or "
            "choose another --out.",
            out,
        )
    path = write_phantom_dataset(
        out,
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
    import dataclasses

    from asa3d.data.prepare import cache_dir_of, datalist_from_config, ensure_cache
    from asa3d.data.validate import smaller_than_crop

    run = _run_data(args)
    cfg = run.data
    if args.labels_mode != "auto":
        with_labels = args.labels_mode == "yes"
    elif run.labels is not None:
        with_labels = run.labels
    else:
        with_labels = datalist_from_config(cfg).has_labels if cfg.root else False
    if args.config:
        print(f"data settings of {args.config} ({run.kind}): splits {run.splits}")
    print(f"cache folder: {cache_dir_of(cfg) if cfg.root else '?'}", flush=True)
    small: list[str] = []
    for split in run.splits:
        index = ensure_cache(dataclasses.replace(cfg, split=split), with_labels=with_labels, progress=True)
        print(
            f"cache {index.cache_dir}: {len(index)} case(s) of {index.name!r}/{index.split} "
            f"({index.reused} reused, {index.built} built), labels: {'yes' if with_labels else 'no'}"
        )
        if index.rejected:
            print(f"rejected ({len(index.rejected)}):")
            for r in index.rejected:
                print(f"  {r['id']}: {r['reason']}")
        if run.crop:
            small += smaller_than_crop({c.id: c.shape for c in index.cases}, run.crop)
    print(f"preprocessing: {json.dumps(index.preprocess)}")
    total = sum(f.stat().st_size for c in index.cases for f in c.dir.iterdir())
    print(f"size on disk: {total / 1e6:.1f} MB; index: {index.cache_dir / 'index.json'}")
    small = list(dict.fromkeys(small))
    for msg in small[:3]:
        log.warning(msg)
    if len(small) > 3:
        log.warning("... and %d more case(s) smaller than the crop.", len(small) - 3)
    return 0


def _cmd_summary(args: argparse.Namespace) -> int:
    from asa3d.atomic import atomic_write_text
    from asa3d.data.datalist import load_datalist
    from asa3d.data.summary import format_summary, summarize

    dl = load_datalist(root=args.source, split=args.split, labels=args.labels, preset=args.preset)
    rep = summarize(dl, progress=True)
    print(format_summary(rep))
    if args.json:
        atomic_write_text(args.json, json.dumps(rep, indent=1, default=str))
        print(f"written: {args.json}")
    if not rep["cases"]:
        print(
            f"asa3d data summary: error: no usable case among the {len(rep['rejected'])} listed; fix the "
            "rejected files above (or point SOURCE at the right data).",
            file=sys.stderr,
        )
        return 2
    return 0


def _cmd_index(args: argparse.Namespace) -> int:
    from asa3d.data.pattern_index import write_index

    res = write_index(
        args.root,
        args.image,
        args.out,
        label=args.label,
        label_names=args.label_names,
        name=args.name,
        overwrite=args.overwrite,
        validation=args.validation,
        seed=args.seed,
    )
    ids = [c["id"] for c in res.training + res.validation + res.unlabelled]
    shown = ", ".join(ids[:4]) + (", ..." if len(ids) > 4 else "")
    print(
        f"wrote {res.path}: {len(res.training)} training case(s)"
        + (f", {len(res.validation)} held out (validation)" if res.validation else "")
        + (f", {len(res.unlabelled)} unlabelled (test)" if res.unlabelled else "")
        + f"; ids {shown}"
    )
    if res.label_names:
        print("labels: " + ", ".join(f"{k}={v}" for k, v in res.label_names.items()))
    for n in res.notes:
        print(f"note: {n}")
    print(f"next: asa3d data summary {res.path}")
    return 0


EXAMPLES = {
    "phantom": """examples:
  asa3d data phantom --n 8 --out data/phantom --n-validation 2
  asa3d data phantom --n 2 --out data/tiny --shape 48 48 40 --spacing 8 8 8""",
    "index": """examples (one folder per patient: STS_002/CT_image.nii.gz + CT_mask.nii.gz):
  asa3d data index /data/sts --image "*/CT_image.nii.gz" --label "*/CT_mask.nii.gz" --out sts.json
  asa3d data index /data/sts --image "*/CT_image.nii.gz" --label "*/CT_mask.nii.gz" \\
      --label-names 0=background,1=tumour --out sts.json
  asa3d data index /data/scans --image "**/*.nii.gz" --out unlabelled.json   # pretraining only

The text the wildcards match is the case id (STS_002); a label pairs with the image whose
wildcards match the same text. Images without a label are listed under 'test'.""",
    "summary": """examples:
  asa3d data summary data/phantom/dataset.json
  asa3d data summary /data/scans --labels /data/labels --json summary.json
  asa3d data summary /data/BTCV --preset btcv

Exits with status 2 when no case is usable.""",
    "prepare": """examples:
  asa3d data prepare data/phantom/dataset.json --workers 2
  asa3d data prepare --config finetune/phantom_tiny.yaml data.root=data/phantom/dataset.json
  asa3d data prepare /data/scans --labels /data/labels --skip-bad
  ASA3D_CACHE_DIR=/scratch/asa3d asa3d data prepare /data/BTCV --preset btcv

With --config the cache is built exactly as that run reads it (its spacing, window, splits and
labels), so the run reuses it. Cache folder: data.cache_dir / --cache-dir, else
$ASA3D_CACHE_DIR/<dataset>-<hash>, else <dataset folder>/.asa3d_cache (or ~/.cache/asa3d/... when
that folder is read-only).""",
}


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "data",
        help="make a phantom, index a layout, summarise or prepare (cache) a dataset",
        description="Data verbs: phantom (a labelled synthetic CT set), index (a dataset.json from "
        "any folder layout), summary (what is there and what cannot be used), prepare (the cache "
        "every run reads).",
        epilog="example:\n  asa3d data index /data/sts --image '*/CT_image.nii.gz' --label "
        "'*/CT_mask.nii.gz' --out sts.json\n  asa3d data summary sts.json",
        formatter_class=_Formatter,
    )
    sub = p.add_subparsers(dest="data_command", metavar="VERB")
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])

    ph = sub.add_parser(
        "phantom",
        help="write a labelled procedural CT phantom dataset",
        description="Write N procedural abdominal CT phantoms with organ label maps and a dataset.json.",
        epilog=EXAMPLES["phantom"],
        formatter_class=_Formatter,
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
    ph.add_argument("--overwrite", action="store_true", help="rewrite a data set already in --out")
    ph.set_defaults(func=_cmd_phantom)

    ix = sub.add_parser(
        "index",
        help="write an MSD dataset.json for any folder layout (glob patterns)",
        description="Find images (and label maps) under ROOT by glob patterns relative to it and write "
        "an MSD dataset.json that every asa3d verb reads. Case ids are the text the wildcards "
        "match, unique; label names come from --label-names or from the label values.",
        epilog=EXAMPLES["index"],
        formatter_class=_Formatter,
    )
    ix.add_argument("root", help="the data folder the patterns are relative to")
    ix.add_argument("--image", required=True, help='pattern of the images, e.g. "*/CT_image.nii.gz"')
    ix.add_argument("--label", default=None, help='pattern of the label maps, e.g. "*/CT_mask.nii.gz"')
    ix.add_argument(
        "--label-names",
        default=None,
        help="INDEX=NAME,... e.g. 0=background,1=tumour (default: class_K for each value found)",
    )
    ix.add_argument("--name", default=None, help="data set name (default: ROOT's folder name)")
    ix.add_argument("--out", required=True, help="the dataset.json to write")
    ix.add_argument(
        "--validation",
        type=int,
        default=0,
        metavar="N",
        help="hold out N labelled cases (seeded draw) under 'validation', scored by finetune/evaluate",
    )
    ix.add_argument("--seed", type=int, default=0, help="seed of the --validation draw")
    ix.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    ix.set_defaults(func=_cmd_index)

    sm = sub.add_parser(
        "summary",
        help="counts, shapes, spacings, HU statistics and rejected files",
        description="Read and validate every case of a dataset: counts, shapes, spacings, "
        "orientations, HU statistics, and each file that cannot be used with the reason.",
        epilog=EXAMPLES["summary"],
        formatter_class=_Formatter,
    )
    sm.add_argument("source", help="dataset.json, folder of scans, or a preset's download folder")
    sm.add_argument("--preset", default=None)
    sm.add_argument("--labels", default=None, help="folder of label maps matched by file name")
    sm.add_argument("--split", default="training")
    sm.add_argument("--json", default=None, help="also write the report as JSON here")
    sm.set_defaults(func=_cmd_summary)

    dflt = DataConfig()

    def _mm(values: tuple[float, ...]) -> str:
        return " ".join(str(v) for v in values)

    pr = sub.add_parser(
        "prepare",
        help="read, validate, preprocess and cache a dataset",
        formatter_class=_Formatter,
        description="Build (or reuse) the preprocessed cache of a dataset. SOURCE is a dataset.json, "
        "a folder of scans, or a preset's download folder; key=value overrides set DataConfig keys "
        "(data.root=PATH, data.preprocess.spacing=[1.5,1.5,2.0], ...).",
        add_help=False,
    )
    pr.add_argument("items", nargs="*", metavar="SOURCE|key=value", help="dataset + dotted overrides")
    pr.add_argument(
        "--config",
        help="the pretrain/finetune/evaluate YAML of the run: its data settings, splits and labels",
    )
    add_config_help(pr, _prepare_help_config, EXAMPLES["prepare"])
    unless = "unless given, the value of --config's data section, else"
    pr.add_argument("--preset", help="btcv | amos22_paper | amos22_ct | lits | pancreas_ct | luna16 | msd")
    pr.add_argument("--labels", help="folder of label maps matched by file name (folder datalists)")
    pr.add_argument(
        "--split",
        help="training | validation | test | all (unless given: every split --config's run reads, "
        f"else {dflt.split})",
    )
    pr.add_argument(
        "--cache-dir", help="cache folder (unless given: $ASA3D_CACHE_DIR/..., else <root>/.asa3d_cache)"
    )
    pr.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        metavar=("SX", "SY", "SZ"),
        help=f"target spacing in mm ({unless} {_mm(dflt.preprocess.spacing)})",
    )
    pr.add_argument(
        "--window",
        type=float,
        nargs=2,
        metavar=("LO", "HI"),
        help=f"HU window scaled to [0, 1] ({unless} {_mm(dflt.preprocess.window)})",
    )
    pr.add_argument("--workers", type=int, help=f"parallel processes ({unless} {dflt.num_workers})")
    pr.add_argument("--skip-bad", action="store_true", help="report and skip bad scans instead of stopping")
    pr.add_argument(
        "--with-labels",
        dest="labels_mode",
        default="auto",
        choices=["auto", "yes", "no"],
        help="cache label maps (auto: a fine-tuning config's choice, else when every case has one)",
    )
    pr.set_defaults(func=_cmd_prepare)
