"""Recipes: one YAML file = one complete run. Plain nested dicts over commented defaults; unknown keys are errors.

Paths: a relative path written in a recipe file (data.path, data.images, data.train_ann, data.val_ann,
model.checkpoint) is relative to the folder of that recipe file; one given on the command line (--data,
--set) is relative to the working directory. Both are stored absolute in the run's recipe.yaml, so a run
trains, evaluates and exports the same from any working directory.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
from pathlib import Path
from typing import Any

import yaml

from vislora.errors import VisloraError

# Every field a recipe may set, with its default. A key absent here is an error (except inside FREE_FORM).
DEFAULTS: dict[str, Any] = {
    "task": "classification",  # classification | detection | segmentation
    "model": {
        "name": "vit_tiny_patch16_224",  # any timm model name
        "pretrained": False,  # timm hub weights (needs network)
        "checkpoint": None,  # local .safetensors weights for the timm model (head keys of another size are dropped)
        "kwargs": {},  # extra timm.create_model arguments, e.g. {img_size: 32, patch_size: 4}
        # a NEW classifier (one the weights do not hold: another number of classes, or no weights at all) starts at
        # zero, so its first steps cannot destroy the pretrained features (BEiT / MAE fine-tuning do the same);
        # timm = keep timm's random init (issue #13 measured LoRA collapsing to chance with it on MobileNetV2)
        "head_init": "zero",  # zero | timm
        "drop_path": None,  # stochastic depth: timm's drop_path_rate; None = the model's default
    },
    # LoraConfig fields; `adapter: null` (or "none") = full fine-tuning, `adapter: linear_probe` = head only
    "adapter": {
        "r": 8, "alpha": 16, "dropout": 0.0, "targets": "vit", "exclude": [], "rslora": False, "train": ["head"],
        "qkv": None, "rank_pattern": {}, "alpha_pattern": {}, "init": "default",
        "use_dora": False,  # DoRA (PEFT's name): a trained magnitude per output row beside the low-rank direction
    },
    "data": {
        # ROOT/train + ROOT/val, or ROOT/<class> split by val_fraction; segmentation: ROOT/{train,val}/images/*,
        # ROOT/{train,val}/masks/<same stem>.png (class indices, 255 = ignore) and ROOT/classes.txt
        "path": "data/demo",
        "img_size": None,  # None = the model's pretrained_cfg input size (segmentation: segmenter.img_size)
        "val_fraction": 0.2,  # for ROOT/<class> layouts: stratified, seeded split
        # None = pretrained_cfg; segmentation resizes the whole image (crop_pct is 1.0 there)
        "mean": None, "std": None, "interpolation": None, "crop_pct": None,
        # train augmentation; None = the task's default (TASK_DEFAULTS below). Segmentation moves the mask with the
        # image (nearest-neighbour). hflip: 0 for text, digits and other asymmetric images
        "augment": {"scale": None, "hflip": None, "color_jitter": None,
                    # classification only (vislora.knobs, vislora.data; CLASSIFICATION_ONLY): timm's Mixup /
                    # CutMix alphas (0 = off) with a soft-target loss, a timm auto-augment string (rand-m9-mstd0.5,
                    # trivial, augmix-m5, original ...; None = off) and RandomErasing's probability (0 = off)
                    "mixup": 0.0, "cutmix": 0.0, "rand": None, "erase": 0.0},
        "workers": 2,  # DataLoader worker processes
        # detection only: format coco (images, train_ann, val_ann) or yolo (path)
        "format": None, "images": None, "train_ann": None, "val_ann": None,
    },
    "detector": {  # detection only
        "head": "fcos",  # fcos | retinanet | fasterrcnn
        "min_size": 320, "max_size": 320,  # torchvision's resize bounds
        "out_indices": None, "fpn_channels": None, "score_thresh": 0.05, "detections_per_img": 100,
        "nms_thresh": None,  # None = the head's own (torchvision: FCOS 0.6, RetinaNet and Faster R-CNN 0.5)
        "anchor_sizes": None,  # one base size per FPN level; None = the stride (FCOS), 4x the stride otherwise
        "representation_size": None,  # Faster R-CNN box head width; None = 1024
    },
    "segmenter": {  # segmentation only
        "head": "fpn",  # fpn (FPN merge of the pyramid, levels summed) | deeplabv3 (torchvision's DeepLabHead)
        "img_size": 512,  # train crop and eval input side when data.img_size is None
        "out_indices": None,  # CNN stages fed to the decoder; None = the last 4 (fpn) or the last one (deeplabv3)
        "channels": None,  # FPN width; None = 64 for backbones under 10M parameters, else 256
        "output_stride": None,  # CNNs: 8 or 16 dilates the last stages (DeepLab's setting, more compute); None = 32
        "atrous_rates": [12, 24, 36],  # deeplabv3 ASPP dilations (torchvision's); smaller suit small feature maps
    },
    "train": {
        "epochs": 10,
        "batch_size": 64,
        "lr": None,  # peak AdamW learning rate; None = default_lr() below: by adapter mode and LoRA preset
        "weight_decay": 0.05,  # AdamW weight decay (not on biases and norms)
        "warmup_epochs": 1,  # linear warmup, then cosine decay to min_lr
        # LP-FT (Kumar et al., ICLR 2022): the first N epochs train the new classifier alone, at head_lr, then
        # everything trains (its own warmup + cosine). Only where more than the head trains (LoRA, full FT) and the
        # model has a classifier; None = the task's default (TASK_DEFAULTS: 0). Measured on the shipped ViT (4 of 20
        # epochs, 3 seeds, LoRA at 2e-3): 56.9 vs 57.0 demo digits, 87.9 vs 87.9 sklearn digits, 82.1 vs 81.3
        # Fashion-MNIST, so it is not on by default
        "head_epochs": None,
        "head_lr": None,  # the head stage's peak lr; None = the linear probe's default (MODE_DEFAULTS)
        "min_lr": 0.0,
        "grad_accum": 1,  # optimizer step every N batches
        "clip_grad": None,  # max gradient norm, None = no clipping
        "lora_plus_ratio": None,  # LoRA+ (Hayou et al. 2024): the adapters' B factors at ratio x the lr of A
        "label_smoothing": 0.0,
        "amp": "auto",  # auto (bf16 on GPU/CPU-if-supported: off on CPU) | bf16 | fp16 | none
        "seed": 0,
        "device": "auto",  # auto | cpu | cuda | cuda:N | mps
        "lowrank_penalty": 0.0,  # lambda of the Frobenius penalty sum ||B A||_F^2 (vislora.svd)
        "factor_l2": 0.0,  # plain L2 on the factors A and B, added to the loss
        "max_steps": None,  # stop after this many optimizer steps (smoke tests)
        # what a detected collapse (the task's health check, silent during warm-up) does: recover = the best
        # epoch's model and optimizer state come back from checkpoints/best.pt and the rest of the schedule runs at
        # COLLAPSE_LR_FACTOR x the lr (vislora.train), at most MAX_RECOVERIES times, each recorded in metrics.jsonl;
        # warn = only the warning. Issue #30: MobileNetV2 LoRA on a 160-image folder collapsed to chance for good
        "on_collapse": "recover",  # recover | warn
        # timm's knobs (vislora.knobs), each off or at today's value by default
        "opt": "adamw",  # a timm optimizer name (timm.optim.create_optimizer_v2): adamw, sgd, lion, lamb, ...
        "layer_decay": None,  # layer-wise lr decay (timm's param_groups_layer_decay); LoRA factors by block depth
        "ema": None,  # {decay: 0.9998, warmup: true}: timm's ModelEmaV3 of the trained weights, kept when better
        "grad_checkpointing": False,  # timm's set_grad_checkpointing(): less memory, a slower step
        "channels_last": False,  # NHWC weights and inputs
        "compile": False,  # torch.compile for the training forward; eval, export and files stay eager
        "log": [],  # loggers besides metrics.jsonl and summary.csv: tensorboard, mlflow, wandb (vislora.loggers)
    },
    "eval": {"batch_size": None, "topk": 5},  # None = train.batch_size
    "export": {"formats": ["torchscript", "onnx"], "opset": 17, "dynamic_batch": True},
}
FREE_FORM = {"model.kwargs", "adapter.rank_pattern", "adapter.alpha_pattern"}
ADAPTER_MODES = {"none": None, "full": None, "linear_probe": "linear_probe"}
PATH_KEYS = ("data.path", "data.images", "data.train_ann", "data.val_ann", "model.checkpoint")

# Defaults that depend on the task, filled in where the recipe leaves None (the run's recipe.yaml shows them).
TASK_DEFAULTS: dict[str, dict] = {
    # a small custom folder, not ImageNet: crops keep >= 70% of the image (0.08 wipes out small objects), mild jitter.
    # Measured (issue #13; BENCHMARKS.md "Defaults", 3 seeds): on MobileNetV2 -> digits ImageNet's [0.08, 1] /
    # jitter 0.4 -> [0.35, 1] took LoRA 94.2 -> 96.7; [0.35, 1] -> [0.7, 1] moved the 30 CNN cells (2 models x 3
    # folders x LoRA conv / conv1x1 / full / probe / PEFT) by -0.2 .. +3.7 (mean +1.5) and the shipped ViT's 12 by
    # +1.1 .. +10.3 (LoRA +7.4 / +4.5 on the digit folders: a 28 px image cropped to 35% is a blurred 17 px patch
    # its features never saw). Turn hflip off (0) for text and digits.
    "classification": {"data": {"augment": {"scale": [0.7, 1.0], "hflip": 0.5, "color_jitter": 0.2}},
                       "train": {"head_epochs": 0}},
    # detection and segmentation: the keys mean what they mean for classification (vislora/augment.py: crop, then
    # flip, then jitter of brightness / contrast / saturation on every image, hue 0; boxes and masks move along).
    # detection crops must keep the boxes: scale 0.5-1 keeps 97% of them, 0.08-1 only 70% (measured). Until #26
    # detection flipped before the crop and jittered hue by color_jitter / 4 in 80% of the images: the shipped
    # recipe (det_mobilenetv2_fcos.yaml, scale [0.6, 1]) went from mAP@.5 0.334 / mAP 0.248 (2026-11-29) to 0.323 /
    # 0.237 (2026-12-03, one seed; 47 commits touched the detection path in between: not all the augmentation's)
    "detection": {"data": {"augment": {"scale": [0.5, 1.0], "hflip": 0.5, "color_jitter": 0.2}},
                  "train": {"head_epochs": 0}},  # a detector has no classifier to train first
    # segmentation crops zoom in at most 1/sqrt(0.5) = 1.4x, so objects keep their context (its pipeline already
    # was classification's before #26, draw for draw: the shipped recipe's mIoU 38.1 stands)
    "segmentation": {"data": {"augment": {"scale": [0.5, 1.0], "hflip": 0.5, "color_jitter": 0.2}},
                     "train": {"head_epochs": 0}},
}

# Learning rates by training mode where train.lr is None. Measured (issue #13) on real ImageNet MobileNetV2 ->
# scikit-learn's digits folder (1,347 / 450 images, 64 px, 4 epochs, batch 64, default augmentation, zero head),
# val top-1: full fine-tuning 3e-4 92.0 / 1e-3 96.9; linear probe 1e-3 77.1 / 1e-2 82.2. LoRA: 2e-3 first (1e-3
# 95.3 / 3e-3 96.2 there), then 5e-3 from the defaults benchmark (BENCHMARKS.md, 3 seeds): on the shipped ViT 2e-3
# -> 5e-3 took LoRA from 57.0 to 63.0 (demo digits) and 87.9 to 90.7 (sklearn digits), above full fine-tuning's
# 60.4 / 89.3, while the 12 CNN cells moved by -1.6 .. +0.9 (mean +0.1). LoRA's best lr being several times full
# fine-tuning's is the usual finding (its update starts at zero and lives in a few directions).
MODE_DEFAULTS: dict[str, float] = {"lora": 5e-3, "full": 1e-3, "linear_probe": 1e-2}
# LoRA in spatial and depthwise convolutions (CNNs) runs at a lower lr than LoRA in Linear layers (ViTs): a ViT's
# LayerNorms renormalise what an update changes, a CNN's frozen BatchNorms are fixed affine maps that pass it on.
# Issue #30: MobileNetV2 LoRA (`conv`) at 5e-3 on a 160-image folder (2 steps an epoch) jumped to chance in 2 of 3
# seeds and stayed there. Per preset, the lowest of 5e-3 / 2e-3 / 1e-3 that keeps the selection set's 6 CNN cells
# (BENCHMARKS.md "Defaults") within 1 point of 5e-3, 3 seeds: `conv` 2e-3 (-0.8 .. +1.4; 1e-3: -2.1 .. -0.4);
# `conv1x1` keeps 5e-3 (2e-3 cost it 1.9 and 1.4 points on the demo digits).
FAST_PRESETS = ("vit", "all-linear", "conv1x1")  # LoRA presets at MODE_DEFAULTS["lora"]
LORA_CONV_LR = 2e-3  # every other preset (conv, all) and lists of patterns


def default_lr(recipe: dict) -> float:
    """train.lr where the recipe leaves it None: by training mode, and for LoRA by where the adapters sit."""
    if mode(recipe) != "lora":
        return MODE_DEFAULTS[mode(recipe)]
    return MODE_DEFAULTS["lora"] if recipe["adapter"]["targets"] in FAST_PRESETS else LORA_CONV_LR


def mode(recipe: dict) -> str:
    """The training mode of a resolved recipe: lora, full or linear_probe."""
    adapter = recipe["adapter"]
    return "lora" if isinstance(adapter, dict) else "full" if adapter is None else "linear_probe"


# the names other tools give recipe fields (Ultralytics, timm's train.py, Keras), for did-you-mean
ALIASES = {"learning_rate": "train.lr", "lr0": "train.lr", "imgsz": "data.img_size", "image_size": "data.img_size",
           "batch": "train.batch_size", "epoch": "train.epochs", "weights": "model.checkpoint",
           "model_name": "model.name", "arch": "model.name", "num_workers": "data.workers", "rank": "adapter.r",
           "lora_alpha": "adapter.alpha", "lora_dropout": "adapter.dropout", "target_modules": "adapter.targets",
           "modules_to_save": "adapter.train", "val_split": "data.val_fraction", "dataset": "data.path",
           # timm's train.py arguments for the knobs of issue #27
           "model_ema": "train.ema", "model_ema_decay": "train.ema", "aa": "data.augment.rand",
           "auto_augment": "data.augment.rand", "reprob": "data.augment.erase", "drop_path_rate": "model.drop_path",
           "torchcompile": "train.compile", "log_wandb": "train.log", "optimizer": "train.opt"}
SECTION_KEYS = {"model": "model.name", "data": "data.path", "adapter": "adapter.targets"}  # `model=...` means these


def dotted_keys(tree: dict = DEFAULTS, prefix: str = "") -> list[str]:
    """Every field of the recipe as a dotted key ('train.lr'), sections included."""
    keys = []
    for key, value in tree.items():
        keys.append(prefix + key)
        if isinstance(value, dict) and prefix + key not in FREE_FORM:
            keys += dotted_keys(value, f"{prefix}{key}.")
    return keys


def find_key(word: str) -> str | None:
    """The recipe field a bare name most likely means: 'epochs' -> 'train.epochs', 'lr0' -> 'train.lr',
    'model' -> 'model.name'; None when nothing is close."""
    word = word.strip().lstrip("-").replace("-", "_")
    if word in ALIASES or word in SECTION_KEYS:
        return ALIASES.get(word) or SECTION_KEYS[word]
    leaves: dict[str, str] = {}
    for dotted in dotted_keys():  # the first section holding a name wins: data.img_size, train.batch_size
        if "." in dotted:
            leaves.setdefault(dotted.rsplit(".", 1)[-1], dotted)
    close = difflib.get_close_matches(word, list(leaves), n=1, cutoff=0.8)
    return leaves[close[0]] if close else None


def unknown_key(source: str, prefix: str, key: str, known: list[str]) -> VisloraError:
    """The error for an unknown recipe key: a close name at this level, else the field it names elsewhere."""
    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
    guess = f"{prefix}{close[0]}" if close else find_key(str(key))
    hint = f"did you mean '{guess}'? " if guess and guess != f"{prefix}{key}" else ""
    return VisloraError(f"{source}: unknown recipe key '{prefix}{key}' ({hint}known here: {', '.join(sorted(known))})")


def _merge(base: dict, override: dict, prefix: str, source: str) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        dotted = f"{prefix}{key}"
        if key not in base:
            raise unknown_key(source, prefix, key, list(base))
        if isinstance(base[key], dict) and dotted not in FREE_FORM:
            if not isinstance(value, dict):
                raise VisloraError(f"{source}: recipe key '{dotted}' must be a mapping, got {value!r}")
            out[key] = _merge(base[key], value, dotted + ".", source)
        elif isinstance(base[key], (int, float)) and not isinstance(base[key], bool) and isinstance(value, str):
            try:  # YAML 1.1 reads 3e-4 (no dot) as a string
                out[key] = float(value)
            except ValueError:
                raise VisloraError(f"{source}: recipe key '{dotted}' must be a number, got {value!r}") from None
        else:
            out[key] = value
    return out


def _fill_none(values: dict, defaults: dict) -> None:
    """Fill, in place, the None entries of `values` from `defaults` (nested)."""
    for key, default in defaults.items():
        if isinstance(default, dict) and isinstance(values.get(key), dict):
            _fill_none(values[key], default)
        elif values.get(key) is None:
            values[key] = copy.deepcopy(default)


# ---- field checks: a wrong type or range names its key before any work starts ---------------------
def _number(source: str, key: str, value, low: float = -math.inf, whole: bool = False, open_low: bool = False):
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise VisloraError(f"{source}: {key} must be a {'whole ' if whole else ''}number, got {value!r}")
    if whole and value != int(value):
        raise VisloraError(f"{source}: {key} must be a whole number, got {value!r}")
    if value < low or (open_low and value == low):
        raise VisloraError(f"{source}: {key} must be {'>' if open_low else '>='} {low:g}, got {value!r}")
    return int(value) if whole else value


def _pair(source: str, key: str, value, low: float, high: float):
    if not (isinstance(value, (list, tuple)) and len(value) == 2):
        raise VisloraError(f"{source}: {key} must be a pair [min, max], got {value!r}")
    lo, hi = (_number(source, key, v) for v in value)
    if not low < lo <= hi <= high:
        raise VisloraError(f"{source}: {key} must be [min, max] with {low:g} < min <= max <= {high:g}, got {value!r}")
    return [lo, hi]


def _check_fields(recipe: dict, source: str) -> None:
    """Types and ranges of the fields a typo breaks late (e.g. epochs: -1 trained nothing, silently)."""
    t, d = recipe["train"], recipe["data"]
    for key, low, open_low in (("epochs", 1, False), ("batch_size", 1, False), ("grad_accum", 1, False)):
        t[key] = _number(source, f"train.{key}", t[key], low, whole=True, open_low=open_low)
    t["head_epochs"] = _number(source, "train.head_epochs", t["head_epochs"], 0)  # a fraction: fewshot's cells
    if t["max_steps"] is not None:
        t["max_steps"] = _number(source, "train.max_steps", t["max_steps"], 1, whole=True)
    for key in ("lr", "head_lr", "weight_decay", "warmup_epochs", "min_lr", "lowrank_penalty", "factor_l2",
                "label_smoothing"):
        if t[key] is not None:
            t[key] = _number(source, f"train.{key}", t[key], 0)
    if t["clip_grad"] is not None:
        t["clip_grad"] = _number(source, "train.clip_grad", t["clip_grad"], 0, open_low=True)
    if t["lora_plus_ratio"] is not None:
        t["lora_plus_ratio"] = _number(source, "train.lora_plus_ratio", t["lora_plus_ratio"], 0, open_low=True)
    t["seed"] = _number(source, "train.seed", t["seed"], 0, whole=True)
    d["val_fraction"] = _number(source, "data.val_fraction", d["val_fraction"], 0)
    if d["val_fraction"] >= 1:
        raise VisloraError(f"{source}: data.val_fraction must be in [0, 1), got {d['val_fraction']!r}")
    d["workers"] = _number(source, "data.workers", d["workers"], 0, whole=True)
    a = d["augment"]
    if a["scale"] is not None:
        a["scale"] = _pair(source, "data.augment.scale", a["scale"], 0, 1)
    if a["hflip"] is not None and not 0 <= _number(source, "data.augment.hflip", a["hflip"]) <= 1:
        raise VisloraError(f"{source}: data.augment.hflip is a probability in [0, 1], got {a['hflip']!r}")
    if a["color_jitter"] is not None:
        a["color_jitter"] = _number(source, "data.augment.color_jitter", a["color_jitter"], 0)
    if recipe["eval"]["batch_size"] is not None:
        recipe["eval"]["batch_size"] = _number(source, "eval.batch_size", recipe["eval"]["batch_size"], 1, whole=True)
    recipe["eval"]["topk"] = _number(source, "eval.topk", recipe["eval"]["topk"], 1, whole=True)
    if t["on_collapse"] not in ("recover", "warn"):
        raise VisloraError(f"{source}: train.on_collapse must be recover or warn, got {t['on_collapse']!r}")
    if not isinstance(t["device"], str):
        raise VisloraError(f"{source}: train.device must be auto, cpu, cuda, cuda:N or mps, got {t['device']!r}")
    if not isinstance(recipe["model"]["kwargs"], dict):
        raise VisloraError(f"{source}: model.kwargs must be a mapping, got {recipe['model']['kwargs']!r}")


CLASSIFICATION_ONLY = ("mixup", "cutmix", "rand", "erase")  # data.augment keys of image classification alone
AUTO_AUGMENT = ("rand", "augmix", "original", "originalr", "v0", "v0r", "3a", "trivial")  # timm's policy names
EMA_DEFAULTS = {"decay": 0.9998, "warmup": True}  # timm's decay; warm-up (ModelEmaV3's) suits short fine-tunes
LOGGERS = {"tensorboard": "tensorboard", "mlflow": "mlflow-skinny", "wandb": "wandb"}  # name -> pip package


def _check_knobs(recipe: dict, source: str) -> None:
    """The timm knobs' types and ranges, and the augmentations only classification has, refused by name."""
    t, a, m = recipe["train"], recipe["data"]["augment"], recipe["model"]
    for key in ("mixup", "cutmix"):
        a[key] = _number(source, f"data.augment.{key}", a[key], 0)
    if not 0 <= _number(source, "data.augment.erase", a["erase"]) <= 1:
        raise VisloraError(f"{source}: data.augment.erase is a probability in [0, 1], got {a['erase']!r}")
    if a["rand"] is not None and (not isinstance(a["rand"], str) or a["rand"].split("-")[0] not in AUTO_AUGMENT):
        raise VisloraError(f"{source}: data.augment.rand must be a timm auto-augment string starting with one of "
                           f"{', '.join(AUTO_AUGMENT)} (e.g. rand-m9-mstd0.5), got {a['rand']!r}")
    used = [k for k in CLASSIFICATION_ONLY if a[k]]
    if used and recipe["task"] != "classification":
        raise VisloraError(f"{source}: data.augment.{used[0]} is for classification only, not task "
                           f"{recipe['task']}: set it to {'null' if used[0] == 'rand' else 0}")
    if m["drop_path"] is not None:
        m["drop_path"] = _number(source, "model.drop_path", m["drop_path"], 0)
        if m["drop_path"] >= 1 or "drop_path_rate" in m["kwargs"]:
            raise VisloraError(f"{source}: model.drop_path must be in [0, 1) and not also in model.kwargs "
                               f"(drop_path_rate), got {m['drop_path']!r}")
    if not isinstance(t["opt"], str) or not t["opt"]:
        raise VisloraError(f"{source}: train.opt must be a timm optimizer name (adamw, sgd, lion, lamb ...), "
                           f"got {t['opt']!r}")
    if t["layer_decay"] is not None:
        t["layer_decay"] = _number(source, "train.layer_decay", t["layer_decay"], 0, open_low=True)
        if t["layer_decay"] > 1:
            raise VisloraError(f"{source}: train.layer_decay must be in (0, 1], got {t['layer_decay']!r}")
    t["ema"] = _ema(source, t["ema"])
    for key in ("grad_checkpointing", "channels_last", "compile"):
        if not isinstance(t[key], bool):
            raise VisloraError(f"{source}: train.{key} must be true or false, got {t[key]!r}")
    t["log"] = _names(source, "train.log", t["log"] or [], allow_str=False)
    unknown = [name for name in t["log"] if name not in LOGGERS]
    if unknown:
        raise VisloraError(f"{source}: train.log names unknown logger {unknown[0]!r} (known: {', '.join(LOGGERS)})")


def _ema(source: str, value) -> dict | None:
    """train.ema: null (off), true (EMA_DEFAULTS) or {decay, warmup}."""
    if value is None or value is False:
        return None
    given = {} if value is True else value
    if not isinstance(given, dict):
        raise VisloraError(f"{source}: train.ema must be null, true or {{decay, warmup}}, got {value!r}")
    unknown = [k for k in given if k not in EMA_DEFAULTS]
    if unknown:
        raise unknown_key(source, "train.ema.", unknown[0], list(EMA_DEFAULTS))
    ema = {**EMA_DEFAULTS, **given}
    if not 0 <= _number(source, "train.ema.decay", ema["decay"]) < 1:
        raise VisloraError(f"{source}: train.ema.decay must be in [0, 1), got {ema['decay']!r}")
    if not isinstance(ema["warmup"], bool):
        raise VisloraError(f"{source}: train.ema.warmup must be true or false, got {ema['warmup']!r}")
    return {"decay": float(ema["decay"]), "warmup": ema["warmup"]}


def _names(source: str, key: str, value, allow_str: bool = True) -> str | list[str]:
    """A name pattern or a list of them: one string is read as a list of one (`exclude: blocks.0.attn.qkv`)."""
    if isinstance(value, str):
        return value if allow_str else [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise VisloraError(f"{source}: {key} must be a name or a list of names, got {value!r}")


def _check_adapter(adapter: dict, source: str) -> None:
    """The adapter section's types: patterns are strings or lists of them, per-layer maps are name -> number."""
    adapter["targets"] = _names(source, "adapter.targets", adapter["targets"])
    for key in ("exclude", "train"):
        adapter[key] = _names(source, f"adapter.{key}", adapter[key], allow_str=False)
    for key in ("rank_pattern", "alpha_pattern"):
        value = adapter[key] if adapter[key] is not None else {}
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise VisloraError(f"{source}: adapter.{key} must map layer patterns to numbers, got {value!r}")
        adapter[key] = {k: _number(source, f"adapter.{key}.{k}", v, 0, open_low=True) for k, v in value.items()}
    adapter["r"] = _number(source, "adapter.r", adapter["r"], 0, open_low=True)
    adapter["alpha"] = _number(source, "adapter.alpha", adapter["alpha"], 0, open_low=True)
    adapter["dropout"] = _number(source, "adapter.dropout", adapter["dropout"], 0)
    for key in ("qkv", "init"):
        if adapter[key] is not None and not isinstance(adapter[key], str):
            raise VisloraError(f"{source}: adapter.{key} must be a string, got {adapter[key]!r}")
    if not isinstance(adapter["use_dora"], bool):
        raise VisloraError(f"{source}: adapter.use_dora must be true or false, got {adapter['use_dora']!r}")
    if adapter["use_dora"] and adapter["init"] == "pissa":
        raise VisloraError(f"{source}: adapter.init pissa with adapter.use_dora: PiSSA moves the top singular part "
                         "of W into the adapter, DoRA's magnitude is not an additive part; use one of them")


def resolve(raw: dict, source: str = "recipe") -> dict:
    """Defaults + the user's recipe: the adapter mode normalised (None, 'linear_probe' or a LoraConfig dict), the
    task's defaults filled in, field types and ranges checked (ValueError naming the key)."""
    if not isinstance(raw, dict):
        raise VisloraError(f"{source}: a recipe must be a YAML mapping")
    unknown = [key for key in raw if key not in DEFAULTS]  # before `adapter` is taken out: it is known here
    if unknown:
        raise unknown_key(source, "", unknown[0], list(DEFAULTS))
    raw = dict(raw)
    adapter = raw.pop("adapter", DEFAULTS["adapter"])
    recipe = _merge({k: v for k, v in DEFAULTS.items() if k != "adapter"}, raw, "", source)
    if adapter is None or isinstance(adapter, str):
        key = str(adapter).lower()
        if adapter is not None and key not in ADAPTER_MODES:
            raise VisloraError(f"{source}: adapter must be a mapping, null, 'none' or 'linear_probe', got {adapter!r}")
        recipe["adapter"] = ADAPTER_MODES.get(key)
    else:
        recipe["adapter"] = _merge(DEFAULTS["adapter"], adapter, "adapter.", source)
    if recipe["task"] not in TASK_DEFAULTS:
        raise VisloraError(f"{source}: task must be one of {', '.join(TASK_DEFAULTS)}, not {recipe['task']!r}")
    _fill_none(recipe, TASK_DEFAULTS[recipe["task"]])
    if recipe["train"]["lr"] is None:
        recipe["train"]["lr"] = default_lr(recipe)
    if recipe["train"]["head_lr"] is None:
        recipe["train"]["head_lr"] = MODE_DEFAULTS["linear_probe"]
    _check_fields(recipe, source)
    _check_knobs(recipe, source)
    if isinstance(recipe["adapter"], dict):
        _check_adapter(recipe["adapter"], source)
        if recipe["adapter"]["use_dora"] and recipe["train"]["lowrank_penalty"]:
            raise VisloraError(f"{source}: train.lowrank_penalty with adapter.use_dora: the penalty is ||s B A||^2, "
                             "which is not DoRA's change of the weight; use train.factor_l2, or plain LoRA")
    t = recipe["train"]
    if mode(recipe) != "linear_probe" and t["head_epochs"] >= t["epochs"]:
        raise VisloraError(f"{source}: train.head_epochs={t['head_epochs']} leaves no epoch of train.epochs="
                         f"{t['epochs']} for the rest of the model")
    return recipe


def _absolute(value, base: Path):
    return os.path.abspath(base / os.path.expanduser(value)) if isinstance(value, str) and value else value


def absolute_paths(raw: dict, base: str | Path) -> dict:
    """A copy of a raw recipe with its relative PATH_KEYS made absolute against `base`."""
    raw = copy.deepcopy(raw)
    for dotted in PATH_KEYS:
        section, key = dotted.split(".")
        if isinstance(raw.get(section), dict) and key in raw[section]:
            raw[section][key] = _absolute(raw[section][key], Path(base))
    return raw


def parse_override(item: str) -> tuple[list[str], Any]:
    """'train.lr=3e-4' -> (['train', 'lr'], 0.0003); the value is read as YAML."""
    if "=" not in item:
        raise VisloraError(f"--set expects key.sub=value, got '{item}'")
    key, value = item.split("=", 1)
    try:
        return key.strip().split("."), yaml.safe_load(value)
    except yaml.YAMLError as e:
        reason = str(e).splitlines()[0]
        raise VisloraError(f"--set {item}: the value is not valid YAML ({reason}); quote text, e.g. "
                         f"{key}='\"{value}\"'") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`--set key.sub=value` items on a raw recipe; path values are relative to the working directory."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        keys, value = parse_override(item)
        if ".".join(keys) in PATH_KEYS:
            value = _absolute(value, Path.cwd())
        node = raw
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
    return raw


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe not found: {path}")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise VisloraError(f"{path}: not valid YAML: {e}") from e


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> dict:
    """Read a YAML recipe (its relative paths against its own folder), apply `--set` overrides, validate."""
    raw = absolute_paths(read_yaml(path), Path(path).parent)
    return resolve(apply_overrides(raw, overrides or []), str(path))


def check_paths(recipe: dict, source: str) -> None:
    """The files and folders a resolved recipe uses exist (FileNotFoundError naming the key): data.path (not read by
    COCO detection data), data.images / train_ann / val_ann and model.checkpoint when set."""
    d = recipe["data"]
    used = {"data.path": d["path"] if d["format"] != "coco" else None, "data.images": d["images"],
            "data.train_ann": d["train_ann"], "data.val_ann": d["val_ann"],
            "model.checkpoint": recipe["model"]["checkpoint"]}
    for key, path in used.items():
        if path and not Path(path).exists():
            raise FileNotFoundError(f"{source}: {key} {path} does not exist"
                                    + (" (for the shipped weights: tools/import_weights.py)" if key ==
                                       "model.checkpoint" else ""))


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'key: old -> new' for every leaf that differs between two resolved recipes."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and f"{prefix}{key}" not in FREE_FORM:
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def save_recipe(recipe: dict, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(recipe, sort_keys=False))
