"""``asa3d eve``: the Eve pictures and scores of a pretrained encoder (docs/methods/adam.md, "Eve").

Light at import (no torch, no MONAI): the work is imported inside the command function, so
``asa3d --help`` and ``asa3d eve --help`` answer at once.
"""

from __future__ import annotations

import argparse
from pathlib import Path

# one line per paragraph: the CLI wraps prose to the terminal, keeping the line breaks it is given
DESCRIPTION = "\n\n".join(
    [
        "Embed two images (A, B) with a pretrained encoder and draw Adam's three Eve pictures: a t-SNE "
        "of patches around landmarks at three scales, dense correspondence lines (within a patient: A and "
        "its rotated, cropped copy A'; across patients: A and B; 3D on the three orthogonal slices), and "
        "the whole-vs-parts cosine similarity table. scores.json holds the numbers: t-SNE silhouette and "
        "k-NN, cross-scale consistency, landmark localisation error and hit rates (within and, with "
        "labels, across patients), whole vs parts.",
        "CKPT: a pretraining checkpoint (.pt, read with weights_only=True) or an export (.safetensors with "
        "its JSON sidecar) of a ResNet (Adam-2D, 3D ResNet) or SwinUNETR encoder (Adam-3D, ASA, SimMIM, "
        "Swin UNETR SSL, VoCo). 2D networks take PNG / JPEG / DICOM images at their native size; 3D "
        "networks take scans (NIfTI, MetaImage, NRRD, DICOM folder), preprocessed as the checkpoint "
        "records and resized to the cube the method trained on. Landmarks are centroids of the "
        "structures in --labels (2D: a DRR mask .npz or a label PNG; 3D: label volumes), else a grid of "
        "nine points. See docs/methods/adam.md.",
    ]
)

EPILOG = """examples:
  asa3d eve runs/adam2d_tiny/last.pt --images drr/imagesTr/drr_000.png drr/imagesTr/drr_001.png \\
      --labels drr/masksTr/drr_000.npz drr/masksTr/drr_001.npz --out eve/adam2d
  asa3d eve adam3d.safetensors --images ph/imagesTr/phantom_000.nii.gz ph/imagesTr/phantom_001.nii.gz \\
      --labels ph/labelsTr/phantom_000.nii.gz ph/labelsTr/phantom_001.nii.gz --out eve/adam3d --device cuda
  asa3d eve runs/asa/last.pt --images a.nii.gz b.nii.gz --out eve/asa     # grid landmarks

writes DIR/tsne.png, correspondence.png, whole_parts.png, whole_parts.md and scores.json (last);
an existing DIR's outputs are replaced only with --overwrite."""


def _floats(text: str) -> list[float]:
    try:
        vals = [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: numbers separated by commas, e.g. 8,16,32") from None
    return vals


def cmd_eve(args: argparse.Namespace) -> int:
    from asa3d.eve.run import EveOptions, check_outputs, run_eve
    from asa3d.paths import ensure_writable_dir

    out = Path(args.out)
    check_outputs(out, args.overwrite)  # before the checkpoint or any image is read
    ensure_writable_dir(out)
    opts = EveOptions(
        scales=args.scales,
        grid=args.grid,
        match_grid=args.match_grid,
        match_size=args.match_size,
        dense=args.dense,
        top_k=args.top_k,
        radii=args.radii,
        seed=args.seed,
        landmarks=args.landmarks,
        device=_device(args.device),
        input_size=args.input_size,
        volume_size=args.volume_size,
        progress=not args.no_progress,
    )
    scores = run_eve(
        args.checkpoint, args.images, out, args.labels, args.label_names, opts, overwrite=args.overwrite
    )
    _summary(scores, out)
    return 0


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _summary(s: dict, out: Path) -> None:
    t = s["tsne"]
    unit = s["unit"]
    lw = s["localisation"]["within_patient"]
    la = s["localisation"]["across_patients"]
    c = s["scale_consistency"]

    def num(v: float | None, f: str = ".2f") -> str:
        return "n/a" if v is None else format(v, f)

    print(
        f"t-SNE: silhouette {num(t['silhouette'])}, "
        f"5-NN landmark accuracy across patients {num(t['knn_accuracy'])}"
    )
    print(f"cross-scale consistency: AUC {num(c['auc'])}, margin {num(c['margin'], '.3f')}")
    print(f"localisation within patient: median {num(lw.get(f'median_error_{unit}'), '.1f')} {unit}")
    if la:
        print(f"localisation across patients: median {num(la.get(f'median_error_{unit}'), '.1f')} {unit}")
    for r in s["whole_parts"]:
        print(f"whole vs parts {r['split']}: {r['cos_mean']:.3f} (baseline {r['baseline_mean']:.3f})")
    print(f"wrote {out}/tsne.png, correspondence.png, whole_parts.png/.md, scores.json ({s['seconds']} s)")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eve",
        help="Eve pictures of a pretrained encoder: landmark t-SNE, dense correspondence, whole vs parts",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", metavar="CKPT", help="pretraining checkpoint (.pt) or export (.safetensors)")
    p.add_argument(
        "--images", nargs=2, required=True, metavar=("A", "B"), help="two images (2D) or scans (3D)"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument(
        "--labels",
        nargs=2,
        metavar=("LA", "LB"),
        help="label maps of A and B (landmarks: structure centroids)",
    )
    p.add_argument(
        "--label-names",
        metavar="JSON",
        help='class names of integer label maps: a dataset.json or {"1": "liver"}',
    )
    p.add_argument(
        "--landmarks", nargs="+", metavar="NAME", help="use these structures (default: all shared, <= 10)"
    )
    p.add_argument(
        "--scales", type=_floats, metavar="S1,S2,S3",
        help="three crop sides (mm for scans and DICOM, else pixels); default 2D 1/8,1/4,1/2 of the "
        "shorter side, 3D 48,72,96 mm",
    )  # fmt: skip
    p.add_argument(
        "--radii", type=_floats, metavar="R1,R2", help="hit-rate radii (default 10,20 mm; 5%%,10%% in px)"
    )
    p.add_argument("--grid", type=int, help="localisation search grid per axis (default 2D 24, 3D 8)")
    p.add_argument(
        "--match-grid", type=int, help="correspondence picture grid per axis (default 2D 16, 3D 10)"
    )
    p.add_argument("--match-size", type=float, help="correspondence window side (default: the largest scale)")
    p.add_argument(
        "--dense", choices=("window", "map"), default="window",
        help="dense features of the correspondence picture: sliding-window crop embeddings (default, "
        "what the loss trains) or the encoder's feature map (ResNet layer4, SwinUNETR h3)",
    )  # fmt: skip
    p.add_argument(
        "--top-k", type=int, default=20, help="matches drawn per pair (default 20; 3D: half per slice)"
    )
    p.add_argument("--input-size", type=int, help="crop input side (default: the method's view size)")
    p.add_argument(
        "--volume-size", type=int, help="3D: cube side volumes are resized to (default: the method's)"
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--seed", type=int, default=0, help="seed of the augmented copies and the t-SNE")
    p.add_argument("--overwrite", action="store_true", help="replace Eve outputs already in DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eve)
