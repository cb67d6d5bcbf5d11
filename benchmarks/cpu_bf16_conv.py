"""Why bf16 training on a CPU falls back to fp32 (asa3d.engine.precision.training_precision).

Repeats one conv3d forward/backward at a U-Net bottleneck's size (192 channels, 2x2x4 voxels)
and counts the runs whose bf16 weight gradient is far from the fp32 one. On AVX-512-BF16 CPUs
with torch 2.13 some runs return values near 1e32: oneDNN's bf16 weight-gradient kernel, of the
same kind as pytorch/pytorch issue 169688. fp32 is the reference; bf16 with oneDNN disabled is
correct but ~200x slower at real sizes, so it is no way out.

    python benchmarks/cpu_bf16_conv.py [--repeats 200]
"""

from __future__ import annotations

import argparse

import torch


def bad_runs(shape: tuple[int, ...], repeats: int, dtype: torch.dtype) -> tuple[int, float]:
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(shape[1], shape[1], 3, padding=1, bias=False)
    x = torch.randn(shape)
    conv(x).square().mean().backward()
    ref = conv.weight.grad.clone()
    scale = ref.abs().max().item()
    bad, worst = 0, 0.0
    for _ in range(repeats):
        conv.zero_grad()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            y = conv(x)
        y.float().square().mean().backward()
        err = (conv.weight.grad - ref).abs().max().item() / scale
        worst = max(worst, err)
        bad += err > 0.5  # bf16 rounding alone stays near 1e-2
    return bad, worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}; {args.repeats} repeats per row; error relative to the fp32 gradient")
    for shape in [(1, 192, 2, 2, 4), (1, 32, 2, 2, 2), (2, 48, 8, 8, 16)]:
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            bad, worst = bad_runs(shape, args.repeats, dtype)
            frac = bad / args.repeats
            print(f"{str(shape):>20} {name}: bad {bad}/{args.repeats} ({frac:.3f}), worst error {worst:.3g}")


if __name__ == "__main__":
    main()
