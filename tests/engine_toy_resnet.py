"""A toy method with state on a 2D MONAI ResNet, for the engine's distributed tests.

Student: ``monai.networks.nets.ResNet`` (spatial_dims=2, one basic block per stage, BatchNorm);
its ``fc`` is an 8-d projector. The loss is InfoNCE between two noisy views of each image, with
negatives from a key queue (a MoCo-style buffer). Buffers with rank-dependent values:
- BatchNorm running statistics (each rank sees other images): policy ``broadcast``;
- the key queue: filled with keys all-gathered from every rank, policy ``gathered``.
``method.gather_keys=false`` enqueues this rank's keys only (a bug the replica check must name).
Run as a script (under torchrun, or alone for the SIGKILL test) it pretrains on in-memory 32x32
images:

    python tests/engine_toy_resnet.py --out DIR [--resume true|false|PATH] [--dump PREFIX] [key=value ...]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from asa3d.config import apply_overrides, from_dict
from asa3d.config_sections import ModelConfig, PretrainConfig
from asa3d.methods.base import METHODS, PretrainMethod, SampleSpec, StepOutput, register_method
from asa3d.models.backbones import BackboneSpec
from asa3d.models.backbones.resnet import resnet_spec

SIZE = 32
RESNET = {
    "block": "basic",
    "layers": [1, 1, 1, 1],
    "block_inplanes": [4, 8, 8, 8],
    "spatial_dims": 2,
    "n_input_channels": 1,
    "num_classes": 8,
}


@dataclass
class ResNetToyConfig:
    queue_size: int = 16
    temperature: float = 0.2
    noise: float = 0.1
    gather_keys: bool = True
    queue_policy: str = "gathered"


class ResNetQueueToy(PretrainMethod):
    name = "engine_toy_resnet"
    Config = ResNetToyConfig

    def __init__(self, cfg: ResNetToyConfig, model_cfg: ModelConfig) -> None:
        super().__init__(cfg, model_cfg)
        self.spec = resnet_spec(depth=10, spatial_dims=2, in_channels=1, num_classes=8, widths=(4, 8, 8, 8))
        self.student = self.spec.build()
        g = torch.Generator().manual_seed(0)
        self.register_buffer(
            "queue", F.normalize(torch.randn(cfg.queue_size, RESNET["num_classes"], generator=g), dim=1)
        )
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self._keys: torch.Tensor | None = None

    def phases(self) -> list[str]:
        return ["contrast"]

    def sample_spec(self, phase: str) -> SampleSpec:
        return SampleSpec(mode="whole")  # in-memory 2D images (dataset factory)

    def backbone_spec(self) -> BackboneSpec:
        return self.spec

    def buffer_policy(self) -> dict[str, str]:
        return {"student.": "broadcast", "queue": self.cfg.queue_policy}

    def training_step(self, batch: Mapping[str, Any], phase: str) -> StepOutput:
        x = batch["image"]
        if os.environ.get("ASA3D_TOY_STEP_SLEEP"):  # lets the kill test land mid-round
            time.sleep(float(os.environ["ASA3D_TOY_STEP_SLEEP"]))
        v1 = x + self.cfg.noise * torch.randn_like(x)
        v2 = x + self.cfg.noise * torch.randn_like(x)
        q = F.normalize(self.student(v1), dim=1)
        with torch.no_grad():
            k = F.normalize(self.student(v2), dim=1)
        pos = (q * k).sum(1, keepdim=True)
        neg = q @ self.queue.T
        logits = torch.cat([pos, neg], 1) / self.cfg.temperature
        loss = F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))
        self._keys = k
        return StepOutput(loss=loss, terms={"nce": loss})

    @torch.no_grad()
    def on_step_end(self, phase: str, global_iter: int, total_iters: int) -> dict[str, float]:
        keys = self.dist.all_gather(self._keys) if self.cfg.gather_keys else self._keys
        n, size = len(keys), self.queue.shape[0]
        idx = (int(self.queue_ptr) + torch.arange(n)) % size
        self.queue[idx] = keys
        self.queue_ptr.fill_((int(self.queue_ptr) + n) % size)
        return {}

    def transfer_state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.student.state_dict())


if ResNetQueueToy.name not in METHODS:
    register_method(ResNetQueueToy)


class ToyImages(Dataset):
    """``n`` smooth random 32x32 one-channel images, a pure function of the index."""

    def __init__(self, n: int = 8) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, idx: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(2000 + idx)
        v = F.interpolate(torch.rand(1, 1, 4, 4, generator=g), size=(SIZE, SIZE), mode="bilinear")[0]
        return {"image": v, "id": f"img{idx}"}


def resnet_config(overrides: list[str] | tuple[str, ...] = ()) -> PretrainConfig:
    base: dict[str, Any] = {
        "method": {"name": "engine_toy_resnet"},
        "data": {"num_workers": 0},
        "train": {
            "epochs": 2,
            "batch_size": 4,
            "lr": 0.05,
            "warmup_epochs": 0,
            "seed": 0,
            "progress": False,
            "log_every": 1,
            "monitor_every": 0,
            "device": "cpu",
        },
    }
    return from_dict(PretrainConfig, apply_overrides(base, list(overrides)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--resume", default=None, help="true | false | a checkpoint; default: auto")
    parser.add_argument("--dump", default=None, help="write the final method state here (per rank)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("ASA3D_TEST_THREADS", "1")))
    logging.basicConfig(level=logging.INFO)
    import asa3d.engine.trainer as tr

    if args.dump:
        from fit_dump import dump_state_after_fit

        dump_state_after_fit(args.dump)
    resume: bool | str | None = {None: None, "true": True, "false": False}.get(args.resume, args.resume)
    data = ToyImages(args.images)
    tr.run_pretrain(resnet_config(args.overrides), args.out, resume, dataset_factory=lambda phase, spec: data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
