"""Seconds per ASA iteration: asa3d's encoder-only forwards versus the reference way.

The reference way (docs/methods/asa.md, "Cost") runs the whole SwinUNETR (last stage, UNETR blocks, decoder)
for the teacher in both phases and for both crops of a symmetric phase 2, then discards the
decoder output. It is written here from that description, on the same weights and views, so the
losses must agree (phase 2 compared with ``p2_symmetric=true``). The floor is one plain SwinUNETR
forward + backward on the same input. The reference way and the floor run in MONAI's default
attention (as the reference code's vendored MONAI does); asa3d's teacher forwards use MONAI's
scaled-dot-product window attention (``model.use_flash_attention``, autograd-free passes only).

    python benchmarks/asa_step.py --quick            # paper width (F=48, W=8192) and tiny, 64^3

Targets at F=48: phase 2 >= 2.5x faster than the reference way, the P1+P2 pair >= 1.8x, and
phase 1 <= 1.3x a plain forward+backward.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable

import torch
from monai.networks.nets import SwinUNETR

from asa3d.config_sections import ModelConfig
from asa3d.methods.asa import ASA
from asa3d.methods.asa_losses import appearance_loss, consistency_loss, order_loss_3d
from asa3d.methods.base import build_method
from asa3d.models.backbone import decode_swinunetr
from asa3d.views.related_crops import CropPair, related_crops
from asa3d.views.resize import resize_volumes
from asa3d.views.shuffle import ShuffleResult, shuffle_blocks

P1_TASKS = ("sop", "var", "gc")
P2_TASKS = ("gc", "lc")


# ---- the reference way ---------------------------------------------------------------------------
def full_swinunetr(net: SwinUNETR, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Whole SwinUNETR forward, returning the decoder output and the hidden states."""
    hs = net.swinViT(x, net.normalize)
    return decode_swinunetr(net, x, hs), hs


def _tok(h: torch.Tensor) -> torch.Tensor:
    return h.flatten(2).transpose(1, 2)


def stock_copy(net: SwinUNETR) -> SwinUNETR:
    """The same weights in MONAI's default attention path: the reference code's vendored MONAI
    has no scaled-dot-product attention, so the reference way must not get asa3d's setting."""
    ref = copy.deepcopy(net)
    for mod in ref.modules():
        if hasattr(mod, "use_flash_attention"):
            mod.use_flash_attention = False
    return ref


Nets = tuple[SwinUNETR, SwinUNETR]  # (student, teacher) computed the reference way


def reference_p1(m: ASA, nets: Nets, x: torch.Tensor, sh: ShuffleResult) -> torch.Tensor:
    c, k = m.cfg, m.stage
    recon, hs = full_swinunetr(nets[0], sh.x_perm)
    tok = _tok(hs[k])
    loss = c.lambda_var * appearance_loss(recon, x)
    loss = loss + c.lambda_vop * order_loss_3d(m.student.order_head(tok), sh.target3d)
    z_s = m.student.global_proj(tok.mean(1))
    with torch.no_grad():
        _, ht = full_swinunetr(nets[1], x)  # decoder output discarded
        z_t = m.teacher.global_proj(_tok(ht[k]).mean(1))
    return loss + c.lambda_global * consistency_loss(z_s, z_t, True, c.consistency_reduction)


def reference_p2(m: ASA, nets: Nets, pair: CropPair) -> torch.Tensor:
    """Symmetric: 1/2 [(G12 + G21) + 1/2 (L12 + L21)], every network pass a full SwinUNETR."""
    c, k = m.cfg, m.stage
    s = [_tok(full_swinunetr(nets[0], crop)[1][k]) for crop in (pair.crop1, pair.crop2)]
    with torch.no_grad():
        t = [_tok(full_swinunetr(nets[1], crop)[1][k]) for crop in (pair.crop1, pair.crop2)]
    masks = (pair.mask1, pair.mask2)
    g, loc = [], []
    for i, j in ((0, 1), (1, 0)):
        z_s = m.student.global_proj(s[i].mean(1))
        with torch.no_grad():
            z_t = m.teacher.global_proj(t[j].mean(1))
            u_t = m.teacher.local_proj(t[j][masks[j]])
        g.append(consistency_loss(z_s, z_t, True, c.consistency_reduction))
        u_s = m.student.local_proj(s[i][masks[i]])
        loc.append(consistency_loss(u_s, u_t, c.local_normalize, c.consistency_reduction))
    return 0.5 * (c.lambda_global * (g[0] + g[1]) + 0.5 * c.lambda_local * (loc[0] + loc[1]))


# ---- timing ----------------------------------------------------------------------------------------
def run_once(fn: Callable[[], torch.Tensor], params: list[torch.nn.Parameter]) -> tuple[float, float, float]:
    """(process CPU seconds, wall seconds, loss) of one forward + backward, grads cleared first.

    Process CPU time is the primary measure: the machine is shared, and with one thread it counts
    our work only, not the time other processes hold the cores."""
    for p in params:
        p.grad = None
    c0, w0 = time.process_time(), time.perf_counter()
    loss = fn()
    loss.backward()
    return time.process_time() - c0, time.perf_counter() - w0, loss.item()


def bench(name: str, feature_size: int, width: int, size: int, warmup: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    model_cfg = ModelConfig(feature_size=feature_size, drop_path_rate=0.0)  # no drop-path: equal losses
    method = build_method(
        {
            "name": "asa",
            "input_size": size,
            "subvolume_size": 16,
            "p2_max_offset_cells": 2,
            "global_proj_dim": width,
            "p2_symmetric": True,
        },
        model_cfg,
    )
    assert isinstance(method, ASA)
    method.train()
    params = list(method.trainable_parameters())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a student that has moved away from its teacher: non-zero consistency terms
        for p in params:
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    vol = [torch.rand(1, size + 10, size + 6, size - 4, generator=g)]
    x = resize_volumes(vol, size)
    sh = shuffle_blocks(x, 16, generator=g)
    pair = related_crops(resize_volumes(vol, method.cfg.p2_size), size, 16, 2, generator=g)
    plain = stock_copy(method.student.backbone.net)  # the floor: a plain MONAI SwinUNETR
    ref_nets = (stock_copy(method.student.backbone.net), stock_copy(method.teacher.backbone.net))
    params += [p for net in (plain, *ref_nets) for p in net.parameters() if p.requires_grad]

    variants: dict[str, Callable[[], torch.Tensor]] = {
        "plain": lambda: plain(x).mean(),
        "ours_p1": lambda: method.shuffle_step(x, sh, P1_TASKS).loss,
        "ref_p1": lambda: reference_p1(method, ref_nets, x, sh),
        "ours_p2": lambda: method.crops_step(pair, P2_TASKS).loss,
        "ref_p2": lambda: reference_p2(method, ref_nets, pair),
    }
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    wall: dict[str, list[float]] = {k: [] for k in variants}
    loss: dict[str, float] = {}
    for i in range(warmup + repeats):  # interleaved, so a busy spell of the machine hits every variant
        for key, fn in variants.items():
            c, w, loss[key] = run_once(fn, params)
            if i >= warmup:
                cpu[key].append(c)
                wall[key].append(w)
    res = {k: min(v) for k, v in cpu.items()}
    l1, r1, l2, r2 = loss["ours_p1"], loss["ref_p1"], loss["ours_p2"], loss["ref_p2"]

    print(
        f"\n== {name}: feature_size {feature_size}, W {width}, {size}^3, batch 1, "
        f"{torch.get_num_threads()} thread(s), min of {repeats} =="
    )
    print(f"loss P1 ours {l1:.7f} ref {r1:.7f} |diff| {abs(l1 - r1):.2e}")
    print(f"loss P2 ours {l2:.7f} ref {r2:.7f} |diff| {abs(l2 - r2):.2e}  (p2_symmetric=true)")
    for key in variants:
        print(f"  {key:8s} {res[key]:8.3f} s/iter process CPU   (wall {min(wall[key]):8.3f} s)")
    ratios = {
        "P1 ref/ours": res["ref_p1"] / res["ours_p1"],
        "P2 ref/ours": res["ref_p2"] / res["ours_p2"],
        "P1+P2 ref/ours": (res["ref_p1"] + res["ref_p2"]) / (res["ours_p1"] + res["ours_p2"]),
        "P1 ours/plain": res["ours_p1"] / res["plain"],
        "P2 ours/plain": res["ours_p2"] / res["plain"],
    }
    for key, v in ratios.items():
        print(f"  {key:15s} {v:6.2f}x")
    if feature_size == 48:
        checks = [
            ("P2 ref/ours >= 2.5", ratios["P2 ref/ours"] >= 2.5),
            ("P1+P2 ref/ours >= 1.8", ratios["P1+P2 ref/ours"] >= 1.8),
            ("P1 ours/plain <= 1.3", ratios["P1 ours/plain"] <= 1.3),
        ]
        print("  targets: " + ", ".join(f"{n}: {'ok' if ok else 'MISSED'}" for n, ok in checks))
    ok = abs(l1 - r1) <= 1e-5 and abs(l2 - r2) <= 1e-5
    print(f"  losses equal within 1e-5: {'yes' if ok else 'NO'}", flush=True)
    res.update(ratios)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 warm-up + 2 timed rounds (default 1 + 4)")
    ap.add_argument("--size", type=int, default=64, help="input cube S (default 64)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", choices=["paper", "tiny"], default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warmup, repeats = (1, 2) if args.quick else (1, 4)
    if args.only in (None, "paper"):
        bench("paper width", 48, 8192, args.size, warmup, repeats)
    if args.only in (None, "tiny"):
        bench("tiny", 12, 256, args.size, warmup, repeats)


if __name__ == "__main__":
    main()
