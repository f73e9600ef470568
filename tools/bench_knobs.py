"""CPU training-step time of train.channels_last and train.compile against eager (issue #27), same process.

One small timm model, LoRA through vislora.inject as `vislora train` does it; three copies of it (eager,
channels_last through vislora.knobs.prepare, torch.compile through vislora.knobs.Compiled) step in turn, one
step each per round (forward, backward, AdamW step), so a busy machine slows them alike. Reports the median
step time of each and the median of the per-round ratios to eager. Compile time is left out (warm-up rounds).

    OMP_NUM_THREADS=1 nice .venv/bin/python tools/bench_knobs.py                       # mobilenetv2_100, 96 px
    .venv/bin/python tools/bench_knobs.py --model resnet18 --targets conv --img 128 --rounds 30
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vislora import LoraConfig, inject, knobs  # noqa: E402

OFF = {"grad_checkpointing": False, "channels_last": False}


def contender(args, kind: str):
    """(forward callable, optimizer) of one copy of the model, built from the same seed."""
    torch.manual_seed(0)
    try:  # ViTs are built for the input size
        model = timm.create_model(args.model, pretrained=False, num_classes=10, img_size=args.img)
    except TypeError:
        model = timm.create_model(args.model, pretrained=False, num_classes=10)
    inject(model, LoraConfig(r=8, targets=args.targets, train=("head",)))
    model = knobs.prepare(model.train(), {**OFF, "channels_last": kind == "channels_last"})
    net = knobs.Compiled(model) if kind == "compile" else model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return net, optimizer


def step(net, optimizer, x, y) -> float:
    tic = time.perf_counter()
    F.cross_entropy(net(x), y).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - tic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mobilenetv2_100")
    parser.add_argument("--targets", default="conv")
    parser.add_argument("--img", type=int, default=96)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3, help="rounds left out (compilation happens in the first)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kinds = ["eager", "channels_last", "compile"]
    nets = {k: contender(args, k) for k in kinds}
    x, y = torch.randn(args.batch, 3, args.img, args.img), torch.randint(0, 10, (args.batch,))
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(args.warmup + args.rounds):
        for k in kinds:
            t = step(*nets[k], x, y)
            if r >= args.warmup:
                times[k].append(t)
    compiled = nets["compile"][0].compiled is not None
    result = {"model": args.model, "targets": args.targets, "img": args.img, "batch": args.batch,
              "threads": args.threads, "rounds": args.rounds, "compiled": compiled,
              "median_s": {k: statistics.median(v) for k, v in times.items()},
              "ratio_to_eager": {k: statistics.median(a / e for a, e in zip(times[k], times["eager"], strict=True))
                                 for k in kinds[1:]}}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
