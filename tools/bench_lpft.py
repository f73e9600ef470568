"""LP-FT check for the defaults benchmark (issue #13): LoRA with every default, started from a finished linear-probe
run's head instead of a zero one (Kumar et al., ICLR 2022). No training code changes: the probe's head is loaded
before LoRA is injected, and a loaded head is kept.

Needs the probe runs of `tools/bench_accuracy.py --mode defaults --models vit_fmnist --epochs 20`.
    .venv/bin/python tools/bench_lpft.py fmnist digits          # -> runs/lpft_vit/<target>, results_<targets>.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from vislora.recipe import read_yaml, resolve  # noqa: E402
from vislora.tasks.classification import adapt as lora_adapt  # noqa: E402
from vislora.train import train  # noqa: E402


def head_then_lora(head: dict[str, torch.Tensor]):
    """An adapt hook: load the probe's head (and nothing else), then inject LoRA as the recipe says."""
    def adapt(model: torch.nn.Module, recipe: dict) -> torch.nn.Module:
        missing, unknown = model.load_state_dict(head, strict=False)
        if unknown or len(missing) != len(model.state_dict()) - len(head):
            raise SystemExit(f"the probe's weights are not just a head: unknown {unknown[:3]}")
        return lora_adapt(model, recipe)
    return adapt


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("targets", nargs="+", choices=["mnist", "fmnist", "digits"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--runs", default=str(ROOT / "runs" / "bench_defaults" / "defaults" / "vit_fmnist"))
    p.add_argument("--out", default=str(ROOT / "runs" / "lpft_vit"))
    args = p.parse_args()
    torch.set_num_threads(1)
    card = json.loads((ROOT / "data" / "vit_fmnist.json").read_text())
    rows = []
    for target in args.targets:
        probe = Path(args.runs) / target / "probe" / str(args.seed)
        if not (probe / "weights.safetensors").is_file():
            raise SystemExit(f"{probe} holds no finished probe run: run the defaults benchmark first")
        data = read_yaml(probe / "recipe.yaml")["data"]["path"]
        recipe = {"model": {"name": card["architecture"], "checkpoint": str(ROOT / "data" / card["file"]),
                            "kwargs": card["kwargs"]},
                  "adapter": {"targets": "vit"}, "data": {"path": data, "img_size": card["input_size"][-1]},
                  "train": {"epochs": args.epochs, "seed": args.seed}}
        start = time.perf_counter()
        run = Path(args.out) / target
        train(resolve(recipe, "bench_lpft"), run, adapt=head_then_lora(load_file(probe / "weights.safetensors")))
        curve = [json.loads(line)["val_top1"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        rows.append({"target": target, "seed": args.seed, "val_top1": curve[-1], "curve": curve,
                     "wall_s": round(time.perf_counter() - start, 1)})
        print(json.dumps(rows[-1]), flush=True)
    (Path(args.out) / f"results_{'_'.join(args.targets)}.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
