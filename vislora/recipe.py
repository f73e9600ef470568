"""Recipes: one YAML file = one complete run. Plain nested dicts over commented defaults; unknown keys are errors."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from vislora.inject import LoraConfig

# Every field a recipe may set, with its default. A key absent here is an error (except inside FREE_FORM).
DEFAULTS: dict[str, Any] = {
    "task": "classification",  # classification | detection
    "model": {
        "name": "vit_tiny_patch16_224",  # any timm model name
        "pretrained": False,  # timm hub weights (needs network)
        "checkpoint": None,  # local .safetensors weights for the timm model (head keys of another size are dropped)
        "kwargs": {},  # extra timm.create_model arguments, e.g. {img_size: 32, patch_size: 4}
    },
    # LoraConfig fields; `adapter: null` (or "none") = full fine-tuning, `adapter: linear_probe` = head only
    "adapter": {
        "r": 8, "alpha": 16, "dropout": 0.0, "targets": "vit", "exclude": [], "rslora": False, "train": ["head"],
        "qkv": None, "rank_pattern": {}, "alpha_pattern": {}, "init": "default",
    },
    "data": {
        "path": "data/demo",  # ROOT/train + ROOT/val, or ROOT/<class> split by val_fraction
        "img_size": None,  # None = the model's pretrained_cfg input size
        "val_fraction": 0.2,  # for ROOT/<class> layouts: stratified, seeded split
        "mean": None, "std": None, "interpolation": None, "crop_pct": None,  # None = pretrained_cfg
        "augment": {"scale": [0.08, 1.0], "hflip": 0.5, "color_jitter": 0.4},  # train augmentation strength
        "workers": 2,  # DataLoader worker processes
        # detection only: format coco (images, train_ann, val_ann) or yolo (path)
        "format": None, "images": None, "train_ann": None, "val_ann": None,
    },
    "detector": {  # detection only
        "head": "fcos",  # fcos | retinanet | fasterrcnn
        "min_size": 320, "max_size": 320,  # torchvision's resize bounds
        "out_indices": None, "fpn_channels": None, "score_thresh": 0.05, "nms_thresh": 0.5, "detections_per_img": 100,
    },
    "train": {
        "epochs": 10,
        "batch_size": 64,
        "lr": 1.0e-3,  # peak AdamW learning rate
        "weight_decay": 0.05,  # AdamW weight decay (not on biases and norms)
        "warmup_epochs": 1,  # linear warmup, then cosine decay to min_lr
        "min_lr": 0.0,
        "grad_accum": 1,  # optimizer step every N batches
        "clip_grad": None,  # max gradient norm, None = no clipping
        "label_smoothing": 0.0,
        "amp": "auto",  # auto (bf16 on GPU/CPU-if-supported: off on CPU) | bf16 | fp16 | none
        "seed": 0,
        "device": "auto",  # auto | cpu | cuda
        "lowrank_penalty": 0.0,  # lambda of the Frobenius penalty sum ||B A||_F^2 (vislora.svd)
        "factor_l2": 0.0,  # plain L2 on the factors A and B, added to the loss
        "max_steps": None,  # stop after this many optimizer steps (smoke tests)
    },
    "eval": {"batch_size": None, "topk": 5},  # None = train.batch_size
    "export": {"formats": ["torchscript", "onnx"], "opset": 17, "dynamic_batch": True},
}
FREE_FORM = {"model.kwargs", "adapter.rank_pattern", "adapter.alpha_pattern"}
ADAPTER_MODES = {"none": None, "full": None, "linear_probe": "linear_probe"}


def _merge(base: dict, override: dict, prefix: str, source: str) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        dotted = f"{prefix}{key}"
        if key not in base:
            known = ", ".join(sorted(base))
            raise ValueError(f"{source}: unknown recipe key '{dotted}' (known here: {known})")
        if isinstance(base[key], dict) and dotted not in FREE_FORM:
            if not isinstance(value, dict):
                raise ValueError(f"{source}: recipe key '{dotted}' must be a mapping, got {value!r}")
            out[key] = _merge(base[key], value, dotted + ".", source)
        elif isinstance(base[key], (int, float)) and not isinstance(base[key], bool) and isinstance(value, str):
            try:  # YAML 1.1 reads 3e-4 (no dot) as a string
                out[key] = float(value)
            except ValueError:
                raise ValueError(f"{source}: recipe key '{dotted}' must be a number, got {value!r}") from None
        else:
            out[key] = value
    return out


def resolve(raw: dict, source: str = "recipe") -> dict:
    """Defaults + the user's recipe, with the adapter mode normalised (None, 'linear_probe' or a LoraConfig dict)."""
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: a recipe must be a YAML mapping")
    raw = dict(raw)
    adapter = raw.pop("adapter", DEFAULTS["adapter"])
    recipe = _merge({k: v for k, v in DEFAULTS.items() if k != "adapter"}, raw, "", source)
    if adapter is None or isinstance(adapter, str):
        key = str(adapter).lower()
        if adapter is not None and key not in ADAPTER_MODES:
            raise ValueError(f"{source}: adapter must be a mapping, null, 'none' or 'linear_probe', got {adapter!r}")
        recipe["adapter"] = ADAPTER_MODES.get(key)
    else:
        recipe["adapter"] = _merge(DEFAULTS["adapter"], adapter, "adapter.", source)
    if recipe["task"] not in ("classification", "detection"):
        raise ValueError(f"{source}: task must be classification or detection, not {recipe['task']!r}")
    return recipe


def parse_override(item: str) -> tuple[list[str], Any]:
    """'train.lr=3e-4' -> (['train', 'lr'], 0.0003); the value is read as YAML."""
    if "=" not in item:
        raise ValueError(f"--set expects key.sub=value, got '{item}'")
    key, value = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = copy.deepcopy(raw)
    for item in overrides:
        keys, value = parse_override(item)
        node = raw
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
    return raw


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> dict:
    """Read a YAML recipe, apply `--set` overrides, validate against DEFAULTS."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from e
    return resolve(apply_overrides(raw, overrides or []), str(path))


def lora_config(recipe: dict) -> LoraConfig | None:
    """The recipe's LoraConfig, or None for full fine-tuning and linear probing."""
    adapter = recipe["adapter"]
    return LoraConfig(**adapter) if isinstance(adapter, dict) else None


def save_recipe(recipe: dict, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(recipe, sort_keys=False))
