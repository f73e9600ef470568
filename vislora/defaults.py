"""Every field a recipe may set, with its default and why: plain data, no logic but the
learning-rate rule.

vislora.recipe reads a user's recipe over these (unknown keys are errors) and checks it.
"""

from __future__ import annotations

from typing import Any

# Every field a recipe may set, with its default. A key absent here is an error (except inside
# FREE_FORM).
DEFAULTS: dict[str, Any] = {
    "task": "classification",  # classification | detection | segmentation
    "model": {
        "name": "vit_tiny_patch16_224",  # any timm model name
        "pretrained": False,  # timm hub weights (needs network)
        "checkpoint": None,  # local .safetensors weights for the timm model (head keys of another size are dropped)
        "kwargs": {},  # extra timm.create_model arguments, e.g. {img_size: 32, patch_size: 4}
        # a NEW classifier (one the weights do not hold: another number of classes, or no weights at
        # all) starts at zero, so its first steps cannot destroy the pretrained features (BEiT / MAE
        # fine-tuning do the same); timm = keep timm's random init (issue #13 measured LoRA
        # collapsing to chance with it on MobileNetV2)
        "head_init": "zero",  # zero | timm
        "drop_path": None,  # stochastic depth: timm's drop_path_rate; None = the model's default
    },
    # LoraConfig fields; `adapter: null` (or "none") = full fine-tuning, `adapter: linear_probe` =
    # head only
    "adapter": {
        "r": 8, "alpha": 16, "dropout": 0.0, "targets": "vit", "exclude": [], "rslora": False, "train": ["head"],
        "qkv": None, "rank_pattern": {}, "alpha_pattern": {}, "init": "default",
        "use_dora": False,  # DoRA (PEFT's name): a trained magnitude per output row beside the low-rank direction
    },
    "data": {
        # ROOT/train + ROOT/val, or ROOT/<class> split by val_fraction; segmentation:
        # ROOT/{train,val}/images/*, ROOT/{train,val}/masks/<same stem>.png (class indices, 255 =
        # ignore) and ROOT/classes.txt
        "path": "data/demo",
        "img_size": None,  # None = the model's pretrained_cfg input size (segmentation: segmenter.img_size)
        "val_fraction": 0.2,  # for ROOT/<class> layouts: stratified, seeded split
        # None = pretrained_cfg; segmentation resizes the whole image (crop_pct is 1.0 there)
        "mean": None, "std": None, "interpolation": None, "crop_pct": None,
        # train augmentation; None = the task's default (TASK_DEFAULTS below). Segmentation moves
        # the mask with the image (nearest-neighbour). hflip: 0 for text, digits and other
        # asymmetric images
        "augment": {"scale": None, "hflip": None, "color_jitter": None,
                    # classification only (vislora.knobs, vislora.data; TASK_ONLY_AUGMENT): timm's
                    # Mixup / CutMix alphas (0 = off) with a soft-target loss, a timm auto-augment
                    # string (rand-m9-mstd0.5, trivial, augmix-m5, original ...; None = off) and
                    # RandomErasing's probability (0 = off)
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
        # LP-FT (Kumar et al., ICLR 2022): the first N epochs train the new classifier alone, at
        # head_lr, then everything trains (its own warmup + cosine). Only where more than the head
        # trains (LoRA, full FT) and the model has a classifier; None = the task's default
        # (TASK_DEFAULTS: 0). Measured on the shipped ViT (4 of 20 epochs, 3 seeds, LoRA at 2e-3):
        # 56.9 vs 57.0 demo digits, 87.9 vs 87.9 sklearn digits, 82.1 vs 81.3 Fashion-MNIST, so it
        # is not on by default
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
        # a small folder gives few optimizer steps (120 images at batch 64: 1 step an epoch): each
        # epoch then passes over it several times, until train.epochs epochs make at least this many.
        # Off (None) by default: measured at 60 on 10 small folders (issue #30, BENCHMARKS.md "A step
        # floor") it lifted LoRA by up to 14 points in most, but cost it 3.9 / 10.7 in two and made
        # full fine-tuning end 10-32 points below its first epoch on one
        "min_steps": None,
        # what a detected collapse (the task's health check, silent during warm-up) does: recover =
        # the best epoch's model and optimizer state come back from checkpoints/best.pt and the rest
        # of the schedule runs at COLLAPSE_LR_FACTOR x the lr (vislora.train), at most
        # MAX_RECOVERIES times, each recorded in metrics.jsonl; warn = only the warning. Issue #30:
        # MobileNetV2 LoRA on a 160-image folder collapsed to chance for good
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
# Defaults that depend on the task, filled in where the recipe leaves None (the run's recipe.yaml
# shows them).
TASK_DEFAULTS: dict[str, dict] = {
    # a small custom folder, not ImageNet: crops keep >= 70% of the image (0.08 wipes out small
    # objects), mild jitter. Measured (issue #13; BENCHMARKS.md "Defaults", 3 seeds): on MobileNetV2
    # -> digits ImageNet's [0.08, 1] / jitter 0.4 -> [0.35, 1] took LoRA 94.2 -> 96.7; [0.35, 1] ->
    # [0.7, 1] moved the 30 CNN cells (2 models x 3 folders x LoRA conv / conv1x1 / full / probe /
    # PEFT) by -0.2 .. +3.7 (mean +1.5) and the shipped ViT's 12 by +1.1 .. +10.3 (LoRA +7.4 / +4.5
    # on the digit folders: a 28 px image cropped to 35% is a blurred 17 px patch its features never
    # saw). Turn hflip off (0) for text and digits.
    "classification": {"data": {"augment": {"scale": [0.7, 1.0], "hflip": 0.5, "color_jitter": 0.2}},
                       "train": {"head_epochs": 0}},
    # detection and segmentation: the keys mean what they mean for classification (vislora/augment.py:
    # crop, then flip, then jitter of brightness / contrast / saturation on every image, hue 0; boxes and
    # masks move along). Detection crops must keep the boxes: scale 0.5-1 keeps 97% of them, 0.08-1 only
    # 70% (measured). Until #26 detection flipped before the crop and jittered hue by color_jitter / 4 in
    # 80% of the images: the shipped recipe (det_mobilenetv2_fcos.yaml, scale [0.6, 1]) went from mAP@.5
    # 0.334 / mAP 0.248 (2026-11-29) to 0.323 / 0.237 (2026-12-03, one seed; 47 commits touched the
    # detection path in between, not only the augmentation)
    "detection": {"data": {"augment": {"scale": [0.5, 1.0], "hflip": 0.5, "color_jitter": 0.2}},
                  "train": {"head_epochs": 0}},  # a detector has no classifier to train first
    # segmentation crops zoom in at most 1/sqrt(0.5) = 1.4x, so objects keep their context (its pipeline
    # was classification's before #26 already, draw for draw; the shipped recipe re-measured: mIoU 38.1)
    "segmentation": {"data": {"augment": {"scale": [0.5, 1.0], "hflip": 0.5, "color_jitter": 0.2}},
                     "train": {"head_epochs": 0}},
}

# Learning rates by training mode where train.lr is None. Measured (issue #13) on real ImageNet
# MobileNetV2 -> scikit-learn's digits folder (1,347 / 450 images, 64 px, 4 epochs, batch 64,
# default augmentation, zero head), val top-1: full fine-tuning 3e-4 92.0 / 1e-3 96.9; linear probe
# 1e-3 77.1 / 1e-2 82.2. LoRA: 2e-3 first (1e-3 95.3 / 3e-3 96.2 there), then 5e-3 from the defaults
# benchmark (BENCHMARKS.md, 3 seeds): on the shipped ViT 2e-3 -> 5e-3 took LoRA from 57.0 to 63.0
# (demo digits) and 87.9 to 90.7 (sklearn digits), above full fine-tuning's 60.4 / 89.3, while the
# 12 CNN cells moved by -1.6 .. +0.9 (mean +0.1). LoRA's best lr being several times full
# fine-tuning's is the usual finding (its update starts at zero and lives in a few directions).
MODE_DEFAULTS: dict[str, float] = {"lora": 5e-3, "full": 1e-3, "linear_probe": 1e-2}
# LoRA in spatial and depthwise convolutions (CNNs) runs at a lower lr than LoRA in Linear layers
# (ViTs): a ViT's LayerNorms renormalise what an update changes, a CNN's frozen BatchNorms are fixed
# affine maps that pass it on. Issue #30: MobileNetV2 LoRA (`conv`) at 5e-3 on a 160-image folder (2
# steps an epoch) jumped to chance in 2 of 3 seeds and stayed there. Per preset, the lowest of 5e-3
# / 2e-3 / 1e-3 that keeps the selection set's 6 CNN cells (BENCHMARKS.md "Defaults") within 1 point
# of 5e-3, 3 seeds: `conv` 2e-3 (-0.8 .. +1.4; 1e-3: -2.1 .. -0.4); `conv1x1` keeps 5e-3 (2e-3 cost
# it 1.9 and 1.4 points on the demo digits).
FAST_PRESETS = ("vit", "all-linear", "conv1x1")  # LoRA presets at MODE_DEFAULTS["lora"]
LORA_CONV_LR = 2e-3  # every other preset (conv, all) and lists of patterns


def default_lr(recipe: dict) -> float:
    """train.lr where the recipe leaves it None: by training mode, and for LoRA by where the
    adapters sit."""
    if mode(recipe) != "lora":
        return MODE_DEFAULTS[mode(recipe)]
    return MODE_DEFAULTS["lora"] if recipe["adapter"]["targets"] in FAST_PRESETS else LORA_CONV_LR


def mode(recipe: dict) -> str:
    """The training mode of a resolved recipe: lora, full or linear_probe."""
    adapter = recipe["adapter"]
    return "lora" if isinstance(adapter, dict) else "full" if adapter is None else "linear_probe"


# the train pipeline's target kind (vislora.augment) -> the task whose data.augment defaults it
# takes
AUGMENT_TARGETS = {"image": "classification", "bboxes": "detection", "mask": "segmentation"}
# data.augment keys that only some tasks accept (the others refuse them by name): task -> keys
TASK_ONLY_AUGMENT = {"classification": ("mixup", "cutmix", "rand", "erase")}
AUTO_AUGMENT = ("rand", "augmix", "original", "originalr", "v0", "v0r", "3a", "trivial")  # timm's policy names
EMA_DEFAULTS = {"decay": 0.9998, "warmup": True}  # timm's decay; warm-up (ModelEmaV3's) suits short fine-tunes
LOGGERS = {"tensorboard": "tensorboard", "mlflow": "mlflow-skinny", "wandb": "wandb"}  # name -> pip package
