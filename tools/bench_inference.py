"""Inference latency: the merged vislora model (unload) vs the untouched base model, and the unmerged overhead.

One process, three contenders called round-robin (rotating order) under torch.inference_mode; medians of wall and
CPU time. The adapter has random B (a real update), r=8 on qkv/proj/fc1/fc2 (ViT) or mlp.fc1/fc2 (ConvNeXt).
Target: merged / base = 1.00 within noise (the merged model is the base architecture with other numbers).

    .venv/bin/python tools/bench_inference.py
    .venv/bin/python tools/bench_inference.py --model convnext_tiny --batch 1 8 --rounds 20
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vislora import LoraConfig, inject, lora_layers, unload  # noqa: E402

TARGETS = {"vit": ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"], "convnext": ["mlp.fc1", "mlp.fc2"]}


def contenders(name: str, r: int) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    base = timm.create_model(name, pretrained=False, num_classes=10).eval()
    adapted = inject(copy.deepcopy(base), LoraConfig(r=r, alpha=2 * r, targets=TARGETS[name.split("_")[0]]),
                     verify=False)
    with torch.no_grad():
        for _, layer in lora_layers(adapted):
            layer.lora_B.normal_(std=0.02)
    merged = unload(copy.deepcopy(adapted)).eval()
    return {"base": base, "unmerged": adapted.eval(), "merged": merged}


def bench(models: dict[str, nn.Module], x: torch.Tensor, rounds: int, warmup: int) -> dict[str, dict]:
    names = list(models)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for i in range(warmup + rounds):
            for n in names[i % 3:] + names[:i % 3]:
                tic, cpu_tic = time.perf_counter(), time.process_time()
                models[n](x)
                if i >= warmup:
                    wall[n].append(time.perf_counter() - tic)
                    cpu[n].append(time.process_time() - cpu_tic)
    out = {}
    for n in names:
        out[n] = {"wall_ms": 1000 * statistics.median(wall[n]), "cpu_ms": 1000 * statistics.median(cpu[n]),
                  "wall_paired": statistics.median(a / b for a, b in zip(wall[n], wall["base"], strict=True)),
                  "cpu_paired": statistics.median(a / b for a, b in zip(cpu[n], cpu["base"], strict=True))}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_small_patch16_224", choices=["vit_small_patch16_224", "convnext_tiny"])
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the results to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = contenders(args.model, args.r)
    with torch.inference_mode():  # the merged model computes what the unmerged one does
        x = torch.randn(2, 3, args.img, args.img)
        err = (models["merged"](x) - models["unmerged"](x)).abs().max().item()
    results = {"model": args.model, "img": args.img, "threads": args.threads, "rounds": args.rounds,
               "merged_vs_unmerged_max_abs": err, "batches": {}}
    print(f"{args.model} @{args.img}, r={args.r}, {args.threads} threads, {args.rounds} rounds; "
          f"merged vs unmerged max |diff| {err:.2e}")
    print(f"{'batch':>5} {'contender':<9} {'wall ms':>9} {'/base':>6} {'cpu ms':>9} {'/base':>6}")
    for b in args.batch:
        torch.manual_seed(b)
        res = bench(models, torch.randn(b, 3, args.img, args.img), args.rounds, args.warmup)
        results["batches"][b] = res
        for n, v in res.items():
            print(f"{b:>5} {n:<9} {v['wall_ms']:9.2f} {v['wall_paired']:6.3f} "
                  f"{v['cpu_ms']:9.2f} {v['cpu_paired']:6.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
