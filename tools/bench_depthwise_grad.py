"""Depthwise conv weight gradient on CPU: torch's own (oneDNN, NCHW) vs vislora's grouped-conv formulation.

Shapes are those of ConvNeXt-T at 96 px (batch 16, 7x7) and EfficientNet/MobileNet at 64 px (batch 64, 5x5),
plus 3x3 for contrast (vislora keeps torch's gradient there). The two alternate, medians of the repeats.

    .venv/bin/python tools/bench_depthwise_grad.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vislora.layers import depthwise_weight_grad  # noqa: E402

SHAPES = [  # batch, channels, output size, kernel, stride
    (16, 96, 24, 7, 1), (16, 384, 6, 7, 1), (16, 768, 3, 7, 1),
    (64, 32, 32, 5, 1), (64, 144, 8, 5, 2), (64, 480, 4, 5, 1), (64, 1152, 2, 5, 1), (64, 96, 16, 5, 2),
    (64, 32, 32, 3, 1), (64, 144, 16, 3, 1),
]


def torch_grad(x: torch.Tensor, g: torch.Tensor, w: torch.Tensor, stride: int, pad: int) -> torch.Tensor:
    return torch.ops.aten.convolution_backward(g, x, w, None, [stride] * 2, [pad] * 2, [1, 1], False, [0, 0],
                                               x.shape[1], [False, True, False])[1]


def vislora_grad(x: torch.Tensor, g: torch.Tensor, w: torch.Tensor, stride: int, pad: int) -> torch.Tensor:
    return depthwise_weight_grad(x, g, tuple(w.shape[2:]), (stride, stride), (pad, pad), (1, 1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{'batch':>5} {'ch':>5} {'out':>4} {'k':>2} {'s':>2} {'torch ms':>9} {'vislora ms':>10} {'ratio':>6}")
    for n, c, size, k, s in SHAPES:
        x, w = torch.randn(n, c, size * s, size * s), torch.randn(c, 1, k, k)
        g = torch.randn_like(F.conv2d(x, w, stride=s, padding=k // 2, groups=c))
        inputs = (x, g, w, s, k // 2)
        torch.testing.assert_close(vislora_grad(*inputs), torch_grad(*inputs), rtol=1e-3, atol=1e-2)
        times: dict[str, list[float]] = {"torch": [], "vislora": []}
        for _ in range(args.repeats):
            for name, fn in (("torch", torch_grad), ("vislora", vislora_grad)):
                tic = time.perf_counter()
                fn(*inputs)
                times[name].append(1000 * (time.perf_counter() - tic))
        t, v = statistics.median(times["torch"]), statistics.median(times["vislora"])
        print(f"{n:5d} {c:5d} {size:4d} {k:2d} {s:2d} {t:9.2f} {v:10.2f} {v / t:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
