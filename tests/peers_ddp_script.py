"""Pretrain one peer method on in-memory phantom volumes; run under ``torchrun`` by
tests/test_peers_ddp.py, which compares what every rank holds at the end.

    python tests/peers_ddp_script.py --method voco --out DIR --dump PREFIX [key=value ...]
    ... --check-bn PREFIX   # (also) RankBatchNorm1d on each rank vs BatchNorm over all ranks' rows
    python tests/peers_ddp_script.py --check-gather PREFIX   # Swin SSL's gathered NT-Xent vs one process
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from asa3d.config import apply_overrides, from_dict
from asa3d.config_sections import PretrainConfig

MODEL = {"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [3, 3, 3, 3], "window_size": 4}
METHODS: dict[str, dict[str, Any]] = {
    "simmim": {"name": "simmim", "input_size": 64},
    "swinssl": {"name": "swinssl", "crop_size": 64, "contrastive_dim": 32},
    "voco": {
        "name": "voco",
        "volume_size": [128, 128, 64],
        "grid": 2,
        "num_random_crops": 2,
        "crop_out_size": 64,
        "proj_hidden_dim": 32,
        "proj_dim": 32,
    },
}


class PhantomVolumes(Dataset):
    """``n`` small phantom CTs scaled to [0, 1], a pure function of the index."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, idx: int) -> dict[str, Any]:
        from asa3d.data.phantom import make_phantom

        img, _, _ = make_phantom((0, idx), shape=(72, 72, 64), spacing=(6.0, 6.0, 6.0))
        v = torch.from_numpy(np.clip((img.astype(np.float32) + 175.0) / 425.0, 0.0, 1.0))[None]
        return {"image": v, "id": f"ph{idx}"}


def check_bn(prefix: str) -> None:
    """Each rank normalises its own rows; output and input gradient must equal BatchNorm over
    the rows of both ranks together."""
    import torch.distributed as dist

    from asa3d.methods.voco import RankBatchNorm1d

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    full = torch.randn(6 * world, 5, generator=g) * 3.0 + 1.0
    w = torch.randn(6 * world, 5, generator=g)
    mine = full[6 * rank : 6 * (rank + 1)].clone().requires_grad_(True)
    (RankBatchNorm1d()(mine) * w[6 * rank : 6 * (rank + 1)]).sum().backward()
    ref = full.clone().requires_grad_(True)
    y_ref = torch.nn.functional.batch_norm(ref, None, None, training=True)
    (y_ref * w).sum().backward()
    torch.save(
        {
            "out": RankBatchNorm1d()(mine.detach()),
            "out_ref": y_ref.detach()[6 * rank : 6 * (rank + 1)],
            "grad": mine.grad,
            "grad_ref": ref.grad[6 * rank : 6 * (rank + 1)],
        },
        f"{prefix}.rank{rank}",
    )
    dist.destroy_process_group()


def check_gather(prefix: str) -> None:
    """Swin UNETR SSL's contrastive term over ranks: each rank's NT-Xent over its rows with every
    rank's rows as candidates, gathered with ``all_gather_with_grad`` (and, for contrast, the plain
    no-grad ``all_gather``); the rank-mean loss and the DDP-averaged gradient of a linear embedder,
    next to one process's NT-Xent over the global batch."""
    import torch.distributed as dist

    from asa3d.methods.dist_context import DistContext
    from asa3d.methods.swinssl_losses import nt_xent

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    n = 3
    x1, x2 = torch.randn(world * n, 6, generator=g), torch.randn(world * n, 6, generator=g)
    w0 = torch.randn(6, 5, generator=g)
    ctx = DistContext(rank, world)
    mine = slice(rank * n, (rank + 1) * n)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, gather in (("with_grad", ctx.all_gather_with_grad), ("plain", ctx.all_gather)):
        w = w0.clone().requires_grad_(True)
        z1, z2 = x1[mine] @ w, x2[mine] @ w
        loss = nt_xent(z1, z2, 0.5, gather(z1), gather(z2), rank * n)
        loss.backward()
        assert w.grad is not None
        grad, mean_loss = w.grad.clone(), loss.detach().clone()
        dist.all_reduce(grad)  # DDP: gradients averaged over ranks
        dist.all_reduce(mean_loss)
        out[name] = {"loss": mean_loss / world, "grad": grad / world}
    w = w0.clone().requires_grad_(True)
    ref = nt_xent(x1 @ w, x2 @ w, 0.5)
    ref.backward()
    out["one_process"] = {"loss": ref.detach(), "grad": w.grad}
    torch.save(out, f"{prefix}.rank{rank}")
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", choices=sorted(METHODS))
    parser.add_argument("--out")
    parser.add_argument("--volumes", type=int, default=4)
    parser.add_argument("--dump", default=None, help="write the final method state here (per rank)")
    parser.add_argument("--check-bn", default=None)
    parser.add_argument("--check-gather", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.check_gather:
        check_gather(args.check_gather)
        return 0
    if args.check_bn:  # its own process group, before the run's
        check_bn(args.check_bn)
        if not args.method:
            return 0
    import asa3d.engine.trainer as tr

    base: dict[str, Any] = {
        "method": dict(METHODS[args.method]),
        "model": dict(MODEL, drop_path_rate=0.0),
        "data": {"num_workers": 0},
        "train": {
            "epochs": 1,
            "batch_size": 2,
            "lr": 1e-3,
            "warmup_epochs": 0,
            "lr_schedule": "constant",  # an epoch cosine over one round is 0 throughout
            "seed": 0,
            "progress": False,
            "log_every": 1,
            "monitor_every": 0,
            "precision": "fp32",
            "device": "cpu",
        },
    }
    cfg = from_dict(PretrainConfig, apply_overrides(base, list(args.overrides)))
    if args.dump:
        from fit_dump import dump_state_after_fit

        dump_state_after_fit(args.dump, with_init=True)
    n = args.volumes
    tr.run_pretrain(cfg, args.out, False, dataset_factory=lambda phase, spec: PhantomVolumes(n))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
