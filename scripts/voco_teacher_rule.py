"""The decision rule on VoCo's teacher (docs/methods/voco.md, "The teacher: decision"): train the
tiny config on the phantom without a teacher (the CVPR paper) and with the released code's EMA
teacher, from the same seed and data, and print whether L_pred (L_pos + L_neg) and label_error
(mean |logit - label|) fall after warm-up.

    nice python scripts/voco_teacher_rule.py --out /tmp/voco_rule             # 100 steps per mode
    nice python scripts/voco_teacher_rule.py --out /tmp/voco_rule --steps 40  # quicker, noisier

The backbone is shrunk (depths 1, window 4) so that both runs fit in about half an hour of one CPU core; the
crop geometry, losses and optimiser are those of configs/pretrain/voco_tiny.yaml.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def run(mode: str, dataset: Path, out: Path, steps: int, warmup: int, extra: list[str]) -> list[dict]:
    from asa3d.config import load_config
    from asa3d.config_sections import PretrainConfig
    from asa3d.engine.trainer import run_pretrain

    overrides = [
        f"data.root={dataset}",
        f"method.voco_teacher={mode}",
        f"train.total_steps={steps}",
        f"train.warmup_steps={warmup}",
        "train.max_iters_per_phase=null",
        "train.progress=false",
        "train.log_every=1",
        "train.monitor_every=0",
        "train.image_every=0",
        "model.depths=[1,1,1,1]",
        "model.window_size=4",
        f"method.track_after={warmup}",
        *extra,
    ]
    cfg = load_config(PretrainConfig, "pretrain/voco_tiny.yaml", overrides)
    run_pretrain(cfg, out / mode, False)
    recs = [json.loads(x) for x in (out / mode / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "loss/loss" in r]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--volumes", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("overrides", nargs="*", help="extra config overrides for both runs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from asa3d.data.phantom import write_phantom_dataset

    dataset = write_phantom_dataset(
        args.out / "phantom",
        n=args.volumes + 2,
        seed=0,
        shape=(96, 96, 80),
        spacing=(4.0, 4.0, 4.0),
        n_validation=2,
    )
    w = max(5, (args.steps - args.warmup) // 5)  # windows: the first and the last fifth after warm-up
    rows = []
    for mode in ("none", "ema"):
        steps = run(mode, dataset, args.out, args.steps, args.warmup, args.overrides)
        after = steps[args.warmup :]
        for key in ("pred", "label_error", "reg"):
            vals = [(r["loss/pos"] + r["loss/neg"]) if key == "pred" else r[f"loss/{key}"] for r in after]
            early, late = float(np.mean(vals[:w])), float(np.mean(vals[-w:]))
            rows.append((mode, key, early, late, late / early))
    print(f"\n== VoCo teacher rule: {args.steps} steps, warm-up {args.warmup}, windows of {w} steps ==")
    print("| teacher | term | first window | last window | last / first |")
    print("|---|---|---|---|---|")
    for mode, key, early, late, ratio in rows:
        print(f"| {mode} | {key} | {early:.4f} | {late:.4f} | {ratio:.2f} |")
    (args.out / "summary.json").write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
