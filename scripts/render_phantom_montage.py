"""Render the phantom montage for the docs, and optionally a real CT the same way.

    python scripts/render_phantom_montage.py                       # -> docs/phantom_montage.png
    python scripts/render_phantom_montage.py --real CT.nii.gz --real-label SEG.nii.gz \
        --real-out /tmp/real_montage.png --totalseg                 # a real scan, for comparison

The real scan's rendering is written outside the repository on purpose: real data and
anything derived from it never go into the project.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from asa3d.data.montage import MontageRow, render_side_by_side
from asa3d.data.phantom import PHANTOM_LABELS, make_phantom

REPO = Path(__file__).resolve().parents[1]

# TotalSegmentator "total" class index -> phantom label, to colour a real scan comparably.
TOTALSEG_TO_PHANTOM = {
    1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6, 7: 9, 52: 7, 63: 8, 64: 11, 21: 10,
    **{k: 12 for k in range(26, 51)},  # vertebrae S1 .. C1
    **{k: 13 for k in range(10, 15)},  # lung lobes
}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "phantom_montage.png")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--shape", type=int, nargs=3, default=[96, 96, 80])
    ap.add_argument("--spacing", type=float, nargs=3, default=[4.0, 4.0, 4.0])
    ap.add_argument("--real", type=Path, help="a real CT (NIfTI) to render the same way")
    ap.add_argument("--real-label", type=Path, help="its label map")
    ap.add_argument("--real-out", type=Path, default=Path("/tmp/real_ct_montage.png"))
    ap.add_argument("--totalseg", action="store_true", help="map TotalSegmentator classes to phantom labels")
    args = ap.parse_args(argv)

    rows = []
    for n, seed in enumerate(args.seeds):
        t0 = time.perf_counter()
        image, label, _ = make_phantom((seed, 0), tuple(args.shape), tuple(args.spacing))
        dt = time.perf_counter() - t0
        print(f"phantom seed ({seed}, 0) {tuple(args.shape)} generated in {dt:.2f} s")
        centre = _organ_center(label)
        if n == 0:  # the first subject also without overlay, to judge the CT look itself
            rows.append(MontageRow(image, None, args.spacing, title=f"phantom ({seed}, 0)", center=centre))
        rows.append(
            MontageRow(image, label, args.spacing, title=f"phantom ({seed}, 0) + labels", center=centre)
        )
    out = render_side_by_side(
        rows, args.out, label_names=PHANTOM_LABELS, suptitle="asa3d procedural CT phantom (W 425 / L 38)"
    )
    print(f"wrote {out} ({out.stat().st_size // 1024} kB)")

    if args.real:
        import nibabel as nib

        real_out = args.real_out.resolve()
        if REPO in real_out.parents:
            ap.error("--real-out must be outside the repository (real data never goes into the project)")
        img = nib.as_closest_canonical(nib.load(args.real))
        image = np.asarray(img.dataobj, dtype=np.float32)
        label = None
        if args.real_label:
            lab = np.asarray(nib.as_closest_canonical(nib.load(args.real_label)).dataobj).astype(np.int64)
            if args.totalseg:
                lut = np.zeros(max(lab.max() + 1, 128), np.uint8)
                for k, v in TOTALSEG_TO_PHANTOM.items():
                    lut[k] = v
                lab = lut[lab]
            label = lab
        row = MontageRow(
            image, label, img.header.get_zooms()[:3], title=args.real.name, center=_organ_center(label)
        )
        render_side_by_side([row], real_out, label_names=PHANTOM_LABELS if args.totalseg else None)
        print(f"wrote {real_out}")
    return 0


def _organ_center(label: np.ndarray | None) -> tuple[int, int, int] | None:
    """Axial slice through the kidneys' hilum level, coronal/sagittal through the body centre."""
    if label is None:
        return None
    c = [s // 2 for s in label.shape]
    kid = np.argwhere(np.isin(label, (2, 3)))
    if len(kid):
        c[2] = int(kid[:, 2].mean())
        c[1] = int(kid[:, 1].mean())
    return (c[0], c[1], c[2])


if __name__ == "__main__":
    raise SystemExit(main())
