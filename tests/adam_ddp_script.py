"""Pretrain a tiny 2D Adam on in-memory images; run under ``torchrun`` by tests/test_adam_ddp.py.
Each rank dumps its final method state and the keys it produced itself at every step, so the
test can check that every rank's queue holds both ranks' keys, in rank order, identically.

    python tests/adam_ddp_script.py --out DIR --dump PREFIX [key=value ...]
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch
from torch.utils.data import Dataset

from adam_tiny import ADAM_TINY_2D
from asa3d.config import apply_overrides, from_dict
from asa3d.config_sections import PretrainConfig

METHOD = {**ADAM_TINY_2D, "queue_size": 24, "levels": [0, 2], "key_bn": "shuffle"}


class Images(Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, idx: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(idx)
        return {"image": torch.rand(1, 48, 48, generator=g), "id": f"im{idx}"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--dump", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import asa3d.engine.trainer as tr
    from asa3d.methods.adam import Adam

    base: dict[str, Any] = {
        "method": dict(METHOD),
        "data": {"num_workers": 0},
        "train": {
            "epochs": 2,
            "batch_size": 4,  # 2 per rank
            "lr": 0.05,
            "warmup_epochs": 0,
            "lr_schedule": "constant",
            "seed": 0,
            "progress": False,
            "log_every": 1,
            "monitor_every": 0,
            "image_every": 0,
            "precision": "fp32",
            "device": "cpu",
        },
    }
    cfg = from_dict(PretrainConfig, apply_overrides(base, list(args.overrides)))
    own: list[dict[str, torch.Tensor]] = []
    orig_end = Adam.on_step_end

    def record(self: Adam, phase: str, gi: int, total: int) -> dict[str, Any]:
        own.append(
            {
                "keys": torch.cat([k for k, _ in self._pending]),
                "ids": torch.cat([i for _, i in self._pending]),
            }
        )
        return orig_end(self, phase, gi, total)

    Adam.on_step_end = record  # type: ignore[method-assign]
    from fit_dump import dump_state_after_fit

    dump_state_after_fit(args.dump, extra=lambda: {"own": own})
    tr.run_pretrain(cfg, args.out, False, dataset_factory=lambda phase, spec: Images())
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
