"""ASA's view wiring, through the method's public steps: every crop offset is reachable, local
pairs are the same physical cell, and in phase 1 the teacher sees the un-permuted volume."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from asa3d.config_sections import ModelConfig
from asa3d.methods.base import build_method
from asa3d.views.related_crops import CropPair, related_crops
from asa3d.views.shuffle import shuffle_blocks

MODEL = ModelConfig(feature_size=12, window_size=4, depths=(1, 1, 1, 1), drop_path_rate=0.0)
S, P = 32, 8  # G = 4 cells per axis, tap at stage 2


def _method(**over):
    cfg = {
        "name": "asa",
        "input_size": S,
        "subvolume_size": P,
        "p2_max_offset_cells": 2,
        "global_proj_dim": 16,
        "local_proj_dim": 16,
        "phases": [
            {"name": "P1", "view": "shuffle", "tasks": ["sop", "gc"]},
            {"name": "P2", "view": "related_crops", "tasks": ["gc", "lc"]},
        ],
    }
    cfg.update(over)
    torch.manual_seed(0)
    return build_method(cfg, MODEL)


@pytest.mark.parametrize("m", [1, 2, 3])
def test_every_crop_offset_is_reachable_on_every_axis(m: int) -> None:
    vol = torch.zeros(64, 1, S + m * P, S + m * P, S + m * P)
    pair = related_crops(vol, S, P, m, generator=torch.Generator().manual_seed(m))
    for off in (pair.offset1, pair.offset2):
        for axis in range(3):
            assert set(off[:, axis].tolist()) == set(range(m + 1)), (m, axis)
    # the two crops are drawn independently: every (a, b) combination on an axis occurs
    combos = {(a, b) for a, b in zip(pair.offset1[:, 0].tolist(), pair.offset2[:, 0].tolist(), strict=True)}
    assert combos == {(a, b) for a in range(m + 1) for b in range(m + 1)}


def _coordinate_volume(b: int, size: int) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float32)
    return torch.stack(torch.meshgrid(r, r, r, indexing="ij"))[None].repeat(b, 1, 1, 1, 1) + 1.0


def _coordinate_tokens(x: torch.Tensor, stage: int) -> torch.Tensor:
    """Token features = the mean voxel coordinate of each p^3 cell, in the tokens' raster order."""
    return F.avg_pool3d(x, P).flatten(2).transpose(1, 2)


@pytest.mark.parametrize("symmetric", [False, True])
def test_local_pairs_are_the_same_physical_cell(symmetric: bool) -> None:
    method = _method(p2_symmetric=symmetric, local_normalize=False)
    for net in (method.student, method.teacher):
        net.tokens = _coordinate_tokens  # type: ignore[method-assign]
        net.local_proj = nn.Identity()
    pair = related_crops(
        _coordinate_volume(8, S + 2 * P), S, P, 2, generator=torch.Generator().manual_seed(1)
    )
    assert (pair.offset1 != pair.offset2).any()  # the test needs crops that do not coincide
    out = method.crops_step(pair, ["lc"])
    assert out.terms["local"].item() == 0.0
    shifted = CropPair(
        crop1=pair.crop1,
        crop2=torch.roll(pair.crop2, P, dims=4),  # the teacher's cells one cell off
        offset1=pair.offset1,
        offset2=pair.offset2,
        mask1=pair.mask1,
        mask2=pair.mask2,
    )
    assert method.crops_step(shifted, ["lc"]).terms["local"].item() > 0.1
    swapped = CropPair(pair.crop1, pair.crop2, pair.offset1, pair.offset2, pair.mask2, pair.mask1)
    assert method.crops_step(swapped, ["lc"]).terms["local"].item() > 0.1


def _inputs_of(net: nn.Module) -> tuple[list[torch.Tensor], list]:
    """Inputs every 1-channel Conv3d of ``net`` (the patch embedding, encoder1) receives."""
    seen: list[torch.Tensor] = []
    hooks = [
        m.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
        for m in net.modules()
        if isinstance(m, nn.Conv3d) and m.in_channels == 1
    ]
    return seen, hooks


@pytest.mark.parametrize(("teacher_input", "expect"), [("original", "x"), ("permuted", "x_perm")])
def test_phase1_teacher_sees_the_configured_volume(teacher_input: str, expect: str) -> None:
    method = _method(p1_teacher_input=teacher_input)
    x = torch.rand(2, 1, S, S, S)
    sh = shuffle_blocks(x, P, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(sh.x_perm, x)
    t_seen, t_hooks = _inputs_of(method.teacher)
    s_seen, s_hooks = _inputs_of(method.student)
    method.shuffle_step(x, sh, ["sop", "gc"])
    for h in t_hooks + s_hooks:
        h.remove()
    want = x if expect == "x" else sh.x_perm
    assert t_seen and all(torch.equal(t, want) for t in t_seen)
    assert s_seen and all(torch.equal(s, sh.x_perm) for s in s_seen)  # the student always solves the puzzle
