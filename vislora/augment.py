"""The one train augmentation of every task and the one eval transform, both albumentations-style
callables.

`train_pipeline(preprocess, augment, target)` builds the same steps for classification (target
"image"), detection ("bboxes": the boxes move with the pixels) and segmentation ("mask": the mask
moves with them, nearest-neighbour): a RandomResizedCrop to the input size (data.augment.scale: the
kept area's range; preprocess's interpolation for the image), a HorizontalFlip (data.augment.hflip:
its probability), a ColorJitter (data.augment.color_jitter = j: brightness, contrast and saturation
j, hue 0, every image; 0 disables it), then normalisation. So each data.augment key means the same
thing for every task; only the defaults differ (vislora.defaults.TASK_DEFAULTS says why).
Classification alone adds timm's auto-augment (rand) and RandomErasing (erase); vislora.recipe
refuses them for the other tasks, and so does this module.

`EvalTransform(preprocess, whole)` is the geometry every evaluation and exported model uses
(vislora.image .eval_transform): timm's resize and centre crop (classification), or the whole image
resized (whole=True, segmentation, which resizes its mask with it, nearest). Detection has no eval
transform: the detector resizes."""

from __future__ import annotations

import contextlib
import functools

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from PIL import Image
from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import str_to_pil_interp

from vislora import image
from vislora.defaults import AUGMENT_TARGETS as TARGETS
from vislora.defaults import TASK_DEFAULTS
from vislora.errors import VisloraError

INTERPOLATIONS = {"nearest": cv2.INTER_NEAREST, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC,
                  "area": cv2.INTER_AREA, "box": cv2.INTER_AREA, "hamming": cv2.INTER_LINEAR,
                  "lanczos": cv2.INTER_LANCZOS4}  # albumentations (cv2) flags for the train crop
BATCH_AUGMENT = ("mixup", "cutmix")  # whole batches (vislora.knobs.BatchMix), not this per-image pipeline
IMAGE_ONLY = ("rand", "erase")  # classification's per-image extras (vislora.defaults.TASK_ONLY_AUGMENT)
EXTRA_DEFAULTS = {"ratio": (3 / 4, 4 / 3), "rand": None, "erase": 0.0}  # not recipe keys but ratio; off
# Boxes: pascal_voc pixels; a box the crop leaves less than 30% of (or under 4 px^2, 1 px wide or
# high) is dropped, the others are clipped to the crop (detection's behaviour since its first
# recipe, kept)
BOX_PARAMS = {"format": "pascal_voc", "label_fields": ["labels"], "min_visibility": 0.3, "min_area": 4.0,
              "min_width": 1.0, "min_height": 1.0, "clip": True}
# TrivialAugment (Mueller & Hutter 2021) in timm's terms: one op per image at a uniform magnitude,
# always applied
TRIVIAL = "rand-n1-m10-mstd101-inc1-p1.0"


def settings(augment: dict | None, target: str = "image") -> dict:
    """data.augment with the target's task defaults filled in (None = default) and its ranges
    checked."""
    if target not in TARGETS:
        raise ValueError(f"augmentation target must be one of {sorted(TARGETS)}, got {target!r}")
    defaults = {**TASK_DEFAULTS[TARGETS[target]]["data"]["augment"], **EXTRA_DEFAULTS}
    given = {k: v for k, v in (augment or {}).items() if v is not None and k not in BATCH_AUGMENT}
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise VisloraError(f"unknown augment key(s) {unknown}; known: {', '.join(defaults)}")
    aug = {**defaults, **given}
    extras = [k for k in IMAGE_ONLY if aug[k] and target != "image"]
    if extras:
        raise VisloraError(f"data.augment.{extras[0]} is for classification only, not task {TARGETS[target]}")
    lo, hi = (float(v) for v in aug["scale"])
    if not 0 < lo <= hi <= 1:
        raise VisloraError(f"augment 'scale' must be (min, max) with 0 < min <= max <= 1, got {aug['scale']}")
    rlo, rhi = (float(v) for v in aug["ratio"])
    if not 0 < rlo <= rhi:
        raise VisloraError(f"augment 'ratio' must be (min, max) with 0 < min <= max, got {aug['ratio']}")
    if not 0 <= float(aug["hflip"]) <= 1:
        raise VisloraError(f"augment 'hflip' is a probability in [0, 1], got {aug['hflip']}")
    if float(aug["color_jitter"]) < 0:
        raise VisloraError(f"augment 'color_jitter' must be >= 0 (0 disables it), got {aug['color_jitter']}")
    return {"scale": (lo, hi), "ratio": (rlo, rhi), "hflip": float(aug["hflip"]),
            "color_jitter": float(aug["color_jitter"]), "rand": aug["rand"], "erase": float(aug["erase"])}


def interpolation_flag(preprocess: dict) -> int:
    """cv2's flag for preprocess's interpolation (a name of INTERPOLATIONS)."""
    name = preprocess.get("interpolation")
    if name not in INTERPOLATIONS:
        raise VisloraError(f"preprocess 'interpolation'={name!r} is not one of {sorted(INTERPOLATIONS)}")
    return INTERPOLATIONS[name]


def auto_augment(config: str, pre: dict, size: int):
    """timm's policy for data.augment.rand (rand-*, augmix-*, original, v0, 3a ...; trivial =
    TRIVIAL), with the hparams timm's create_transform gives it: translation, fill colour from the
    mean, the interpolation."""
    config = TRIVIAL if config == "trivial" else config
    hparams = {"translate_const": int(size * 0.45), "img_mean": tuple(min(255, round(255 * x)) for x in pre["mean"])}
    with contextlib.suppress(KeyError):  # an interpolation PIL does not name (cv2's area): timm's default
        hparams["interpolation"] = str_to_pil_interp(pre["interpolation"])
    try:
        if config.startswith("rand"):
            return rand_augment_transform(config, hparams)
        if config.startswith("augmix"):
            return augment_and_mix_transform(config, {**hparams, "translate_pct": 0.3})
        return auto_augment_transform(config, hparams)
    except (AssertionError, ValueError, KeyError, IndexError) as e:
        raise VisloraError(f"data.augment.rand={config!r} is not a timm auto-augment string ({e or type(e).__name__}"
                           "); e.g. rand-m9-mstd0.5, augmix-m5-w4, original, trivial") from None


def pil_op(op, image: np.ndarray, **_) -> np.ndarray:
    """A timm PIL transform as an albumentations step on HxWx3 uint8."""
    return np.asarray(op(Image.fromarray(image)))


def tensor_op(op, image: np.ndarray, **_) -> np.ndarray:
    """A timm CHW-tensor transform (RandomErasing, in place) as an albumentations step on HxWx3
    float32."""
    return op(torch.from_numpy(image.transpose(2, 0, 1).copy())).numpy().transpose(1, 2, 0)


def train_pipeline(preprocess: dict, augment: dict | None = None, target: str = "image") -> A.Compose:
    """The train augmentation of every task: HxWx3 uint8 (with bboxes= and labels=, or mask=) -> CHW
    float32.

    preprocess: input_size (S, [H, W] or [3, H, W]) and interpolation (the image's resize; a mask is
    resized nearest), mean and std (normalisation; without them the pixels are only scaled to [0,
    1], as a torchvision detector, which normalises itself, wants them). augment: the recipe's
    data.augment; None values take the defaults of target's task. target: "image" (classification),
    "bboxes" (detection: pascal_voc boxes with their labels, BOX_PARAMS) or "mask" (segmentation:
    HxW class indices). Steps: RandomResizedCrop (scale, ratio), HorizontalFlip (p = hflip),
    ColorJitter (brightness = contrast = saturation = color_jitter, hue 0, p 1; off under an
    auto-augment policy but 3a, as timm does), timm's auto-augment (rand), normalisation, timm's
    RandomErasing (erase, per-pixel noise)."""
    aug = settings(augment, target)
    h, w = image.input_hw(preprocess)
    steps: list = [A.RandomResizedCrop(size=(h, w), scale=aug["scale"], ratio=aug["ratio"],
                                       interpolation=interpolation_flag(preprocess),
                                       mask_interpolation=cv2.INTER_NEAREST)]
    if aug["hflip"] > 0:
        steps.append(A.HorizontalFlip(p=aug["hflip"]))
    if aug["color_jitter"] > 0 and (not aug["rand"] or "3a" in aug["rand"]):
        j = aug["color_jitter"]
        steps.append(A.ColorJitter(brightness=j, contrast=j, saturation=j, hue=0.0, p=1.0))
    if aug["rand"]:
        steps.append(A.Lambda(image=functools.partial(pil_op, auto_augment(aug["rand"], preprocess, min(h, w))),
                              p=1.0))
    if "mean" in preprocess or "std" in preprocess:
        if "mean" not in preprocess or "std" not in preprocess:
            raise VisloraError(f"preprocess dict needs both mean and std (has {sorted(preprocess)})")
        steps.append(A.Normalize(mean=tuple(preprocess["mean"]), std=tuple(preprocess["std"]), max_pixel_value=255.0))
    else:
        steps.append(A.ToFloat(max_value=255.0))
    if aug["erase"] > 0:
        erase = RandomErasing(aug["erase"], mode="pixel", device="cpu")
        steps.append(A.Lambda(image=functools.partial(tensor_op, erase), p=1.0))
    steps.append(ToTensorV2())
    return A.Compose(steps, bbox_params=A.BboxParams(**BOX_PARAMS) if target == "bboxes" else None)


class EvalTransform:
    """vislora.image.eval_transform (the geometry every evaluation and exported model uses) called
    like an albumentations pipeline: transform(image=HxWx3 uint8[, mask=HxW]) -> {"image": CHW
    float32 tensor[, "mask"]}.

    whole=False: timm's resize and centre crop (classification). whole=True: the whole image resized
    to the input size, aspect not kept (segmentation: what a served segmenter is fed), a mask
    resized with it, nearest."""

    def __init__(self, preprocess: dict, whole: bool = False):
        self.transform, self.whole = image.eval_transform(preprocess, whole=whole), whole
        h, w = image.input_hw(preprocess)
        self.resize_mask = functools.partial(image.resize, height=h, width=w, interpolation="nearest")

    def __call__(self, image: np.ndarray, mask: np.ndarray | None = None) -> dict:
        out = {"image": torch.from_numpy(self.transform(image))}
        if mask is not None:
            if not self.whole:
                raise ValueError("EvalTransform moves a mask only with the whole-image geometry (whole=True)")
            out["mask"] = torch.from_numpy(self.resize_mask(mask).copy())
        return out
