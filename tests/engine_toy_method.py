"""A tiny registered method for engine tests, independent of ASA's progress.

Student = a minimal SwinUNETR (feature_size 12, depth 1 per stage, 32^3 input) + a projector;
teacher = an EMA copy. Two phases that touch different parameter subsets, like ASA:
``recon`` trains swinViT + encoder1 (no projector), ``consist`` trains patch_embed, layers1-3
and the projector (no layers4, no encoder1). Run as a script it pretrains on in-memory volumes
(used by the torchrun and SIGKILL tests):

    python tests/engine_toy_method.py --out DIR [key=value ...]
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from asa3d.config import apply_overrides, from_dict
from asa3d.config_sections import ModelConfig, PretrainConfig
from asa3d.methods.base import METHODS, PretrainMethod, SampleSpec, StepOutput, register_method

CROP = 32
TOY_MODEL = {
    "feature_size": 12,
    "depths": [1, 1, 1, 1],
    "num_heads": [3, 3, 3, 3],
    "window_size": 4,
    "drop_path_rate": 0.0,
}


@dataclass
class ToyConfig:
    proj_dim: int = 16
    noise: float = 0.01  # view randomness from the global RNG (0 for the DDP equivalence test)
    ema_momentum_start: float = 0.9
    nan_term: str = ""  # make this term NaN ...
    nan_calls: list[int] = field(default_factory=list)  # ... at these training_step call indices


class _Net(nn.Module):
    def __init__(self, model_cfg: ModelConfig, proj_dim: int) -> None:
        super().__init__()
        from asa3d.models.backbones.swinunetr import swinunetr_spec

        self.net = swinunetr_spec(model_cfg, 1).build()
        self.proj = nn.Linear(model_cfg.feature_size * 8, proj_dim)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        h = self.net.swinViT(x, self.net.normalize)
        return self.proj(h[3].mean(dim=(2, 3, 4)))


class EngineToy(PretrainMethod):
    name = "engine_toy"
    Config = ToyConfig

    def __init__(self, cfg: ToyConfig, model_cfg: ModelConfig) -> None:
        super().__init__(cfg, model_cfg)
        self.student = _Net(model_cfg, cfg.proj_dim)
        self.teacher = copy.deepcopy(self.student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.calls = 0
        self.ema_calls: list[tuple[str, int, int]] = []
        self.round_starts: list[tuple[int, int]] = []

    def train(self, mode: bool = True) -> EngineToy:
        super().train(mode)
        self.teacher.eval()
        return self

    def phases(self) -> list[str]:
        return ["recon", "consist"]

    def sample_spec(self, phase: str) -> SampleSpec:
        return SampleSpec(mode="crop", crop_size=(CROP, CROP, CROP))

    def _maybe_nan(self, terms: dict[str, torch.Tensor]) -> None:
        if self.cfg.nan_term in terms and self.calls in self.cfg.nan_calls:
            terms[self.cfg.nan_term] = terms[self.cfg.nan_term] * float("nan")

    def training_step(self, batch: Mapping[str, Any], phase: str) -> StepOutput:
        x = batch["image"]
        # a little view randomness from the global RNG, as real methods have
        if self.cfg.noise:
            x = x + self.cfg.noise * torch.randn_like(x)
        if os.environ.get("ASA3D_TOY_STEP_SLEEP"):  # lets the kill test land mid-round
            time.sleep(float(os.environ["ASA3D_TOY_STEP_SLEEP"]))
        net = self.student.net
        if phase == "recon":
            h = net.swinViT(x, net.normalize)
            rec = net.encoder1(x).mean(dim=1, keepdim=True)
            terms = {"rec": F.mse_loss(rec.float(), x.float()), "reg": 1e-3 * h[4].float().pow(2).mean()}
        else:
            s = self.student.embed(x)
            with torch.no_grad():
                t = self.teacher.embed(x)
            cos = F.cosine_similarity(s.float(), t.float(), dim=1).mean()
            terms = {"cos": 2.0 - 2.0 * cos}
        self._maybe_nan(terms)
        self.calls += 1
        return StepOutput(loss=sum(terms.values()), terms=terms)  # type: ignore[arg-type]

    @torch.no_grad()
    def on_round_start(self, round_index: int, total_rounds: int) -> None:
        self.round_starts.append((round_index, total_rounds))

    def on_step_end(self, phase: str, global_iter: int, total_iters: int) -> dict[str, float]:
        self.ema_calls.append((phase, global_iter, total_iters))
        m0 = self.cfg.ema_momentum_start
        m = 1.0 - (1.0 - m0) * (1.0 + math.cos(math.pi * global_iter / max(1, total_iters))) / 2.0
        for pt, ps in zip(self.teacher.parameters(), self.student.parameters(), strict=False):
            pt.mul_(m).add_(ps.detach().float(), alpha=1.0 - m)
        return {"ema_momentum": m}

    def trainable_parameters(self):  # type: ignore[override]
        return self.student.parameters()

    def transfer_state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.teacher.net.state_dict())

    def transfer_parts(self) -> dict[str, bool]:
        parts = self.backbone_spec().parts  # recon trains swinViT + encoder1, never the decoder
        return {p: p != "decoder" for p in parts}

    @torch.no_grad()
    def monitor_embeddings(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        x = batch["image"]
        return {"teacher": self.teacher.embed(x), "student": self.student.embed(x)}


if EngineToy.name not in METHODS:
    register_method(EngineToy)


class ToyVolumes(Dataset):
    """``n`` smooth random 32^3 volumes, a pure function of the index."""

    def __init__(self, n: int = 4) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, idx: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(1000 + idx)
        v = torch.rand(1, 1, 8, 8, 8, generator=g)
        v = F.interpolate(v, size=(CROP, CROP, CROP), mode="trilinear", align_corners=False)[0]
        return {"image": v, "id": f"toy{idx}"}


def toy_factory(n: int = 4):  # noqa: ANN201
    return lambda phase, spec: ToyVolumes(n)


def toy_config(overrides: list[str] | tuple[str, ...] = ()) -> PretrainConfig:
    base: dict[str, Any] = {
        "method": {"name": "engine_toy"},
        "model": dict(TOY_MODEL),
        "data": {"num_workers": 0},
        "train": {
            "epochs": 2,
            "batch_size": 2,
            "lr": 0.05,
            "warmup_epochs": 1,
            "seed": 0,
            "progress": False,
            "log_every": 1,
            "monitor_every": 2,
            "device": "cpu",
        },
    }
    return from_dict(PretrainConfig, apply_overrides(base, list(overrides)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--volumes", type=int, default=4)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--dump", default=None, help="write the final method state here (per rank)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("ASA3D_TEST_THREADS", "1")))
    logging.basicConfig(level=logging.INFO)
    from asa3d.engine.trainer import run_pretrain

    resume: bool | str | None = {None: None, "true": True, "false": False}.get(args.resume, args.resume)
    cfg = toy_config(args.overrides)
    if args.dump:
        from fit_dump import dump_state_after_fit

        dump_state_after_fit(args.dump)
    run_pretrain(cfg, args.out, resume, dataset_factory=toy_factory(args.volumes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
