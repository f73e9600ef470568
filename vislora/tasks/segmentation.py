"""Semantic segmentation: a timm backbone under a light decoder, per-pixel cross-entropy, mIoU over the val set.

The timm model sits at `body` of the Segmenter, so `inject(segmenter, cfg, within="body")` adapts only the
backbone (the presets leave its stem alone) while the decoder trains fully. CNNs use timm's features_only mode; a
plain ViT gives its last token map, and for the FPN head detection's simple pyramid. Decoders: torchvision's
FeaturePyramidNetwork with every level convolved, upsampled and summed (Panoptic FPN's semantic branch), or
torchvision's DeepLabV3 head on the last map. Logits are upsampled (bilinear) to the input size: the model maps an
NCHW batch to N x C x H x W logits, so it traces and exports to ONNX like a classifier.
Data: ROOT/{train,val}/images/* with ROOT/{train,val}/masks/<stem>.png (class indices, 255 = ignore) and
ROOT/classes.txt (one name a line, 0 = background); albumentations moves the mask with the image (nearest).
Every image and mask is resized to the input size (the whole image, aspect not kept); mIoU comes from one
confusion matrix accumulated over the whole val set at that size.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from albumentations.pytorch import ToTensorV2
from sklearn.model_selection import train_test_split
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from torchvision.ops import FeaturePyramidNetwork
from tqdm import tqdm

from vislora import data as vdata
from vislora import image
from vislora.files import listing
from vislora.inject import LoraConfig
from vislora.tasks.backbone import (
    Features,
    SimplePyramid,
    adapt_backbone,
    body_channels,
    create_body,
    fpn_width,
    is_plain_vit,
)
from vislora.tasks.common import (
    Setup,
    batch_predictor,
    denormalize,
    lora_config,
    seeded,
    write_confusion,
)

log = logging.getLogger(__name__)

NAME = "segmentation"
SCORE = "val_miou"  # the validation metric that picks the best epoch (higher is better)
EXPORT = {"torchscript": "trace", "input": "batch", "onnx": None, "served": None}  # None: supported

IGNORE = 255  # mask value of pixels that count for nothing (loss, metrics)
HEADS = ("fpn", "deeplabv3")
SEGMENTER_KEYS = {"head", "img_size", "out_indices", "channels", "output_stride", "atrous_rates"}
CLASSES_FILE = "classes.txt"
PREDICT_DIR = "predictions"  # where `predict` writes masks and predictions.json without out_dir (vislora.evaluate
# passes predictions/ beside the model)
SHOWN = 6  # images in OUT_masks.png
COLLAPSE_EPOCHS = 3  # health() warns from this epoch on


# ---- model: timm body -> features -> decoder -> logits at the input size ---------------------------
class FpnDecoder(nn.Module):
    """torchvision's FPN over the feature maps, each level through a 3x3 conv (GroupNorm, ReLU), upsampled to the
    finest level and summed, then a 1x1 classifier: Panoptic FPN's semantic branch, one conv per level."""

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int):
        super().__init__()
        self.fpn = FeaturePyramidNetwork(list(in_channels), channels)
        self.levels = nn.ModuleList([
            nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                          nn.GroupNorm(math.gcd(32, channels), channels), nn.ReLU(inplace=True))
            for _ in in_channels])
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: list[Tensor]) -> Tensor:
        maps = list(self.fpn({str(i): f for i, f in enumerate(feats)}).values())
        out = self.levels[0](maps[0])
        for level, m in zip(self.levels[1:], maps[1:], strict=True):
            out = out + F.interpolate(level(m), size=out.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(out)


class DeepLabDecoder(nn.Module):
    """torchvision's DeepLabV3 head (ASPP, 3x3 conv, classifier) on the last feature map."""

    def __init__(self, in_channels: int, num_classes: int, atrous_rates: Sequence[int]):
        super().__init__()
        self.head = DeepLabHead(in_channels, num_classes, tuple(int(r) for r in atrous_rates))

    def forward(self, feats: list[Tensor]) -> Tensor:
        return self.head(feats[-1])


class Segmenter(Features):
    """A timm `body` (features_only CNN or plain ViT), a ViT's optional simple `pyramid`, a `decoder`;
    NCHW images -> N x num_classes x H x W logits."""

    def __init__(self, body: nn.Module, decoder: nn.Module, pyramid: SimplePyramid | None = None):
        super().__init__(body, pyramid)
        self.decoder = decoder

    def forward(self, x: Tensor) -> Tensor:
        logits = self.decoder(self.features(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def build_segmenter(model_cfg: dict, segmenter_cfg: dict, num_classes: int) -> Segmenter:
    """The recipe's timm backbone (detection's create_body: checkpoint checked, stem named) under the chosen head.
    segmenter_cfg: the recipe's `segmenter` section (see vislora/recipe.py for every key's meaning)."""
    unknown = sorted(set(segmenter_cfg) - SEGMENTER_KEYS)
    if unknown:
        raise ValueError(f"unknown segmenter key(s) {unknown}; known: {sorted(SEGMENTER_KEYS)}")
    head = segmenter_cfg.get("head") or "fpn"
    if head not in HEADS:
        raise ValueError(f"segmenter.head '{head}' is not one of {HEADS}")
    if num_classes < 2:
        raise ValueError(f"segmentation needs at least 2 classes (background and one more), got {num_classes}")
    cfg = dict(model_cfg)
    if segmenter_cfg.get("output_stride"):
        cfg["kwargs"] = {**(model_cfg.get("kwargs") or {}), "output_stride": int(segmenter_cfg["output_stride"])}
    indices = segmenter_cfg.get("out_indices") or ((-4, -3, -2, -1) if head == "fpn" else (-1,))
    body = create_body(cfg, indices)
    pyramid = SimplePyramid(body.embed_dim) if is_plain_vit(body) and head == "fpn" else None
    in_channels = body_channels(body, pyramid is not None)
    if head == "fpn":
        decoder: nn.Module = FpnDecoder(in_channels, fpn_width(body, segmenter_cfg.get("channels")), num_classes)
    else:
        decoder = DeepLabDecoder(in_channels[-1], num_classes, segmenter_cfg.get("atrous_rates") or (12, 24, 36))
    return Segmenter(body, decoder, pyramid)


def segmenter_train_modules(model: Segmenter) -> list[str]:
    """The modules trained fully next to a backbone adapter: the decoder (and a ViT's pyramid)."""
    return ["decoder"] + (["pyramid"] if hasattr(model, "pyramid") else [])


def adapt_segmenter(model: Segmenter, lora: LoraConfig | None, probe: bool = False) -> Segmenter:
    """LoRA inside `body` with the decoder trained; None: full fine-tuning; probe: the decoder alone."""
    return adapt_backbone(model, lora, "body", segmenter_train_modules(model), probe)


# ---- data -------------------------------------------------------------------------------------------
def read_classes(root: str | os.PathLike) -> list[str]:
    """Class names of ROOT/classes.txt, one a line in index order (0 = background)."""
    path = Path(root) / CLASSES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a segmentation folder names its classes there, one per line in "
                                "mask-index order, background first")
    names = [line.strip() for line in path.read_text().splitlines()]
    while names and not names[-1]:
        names.pop()
    if "" in names:
        raise ValueError(f"{path}: line {names.index('') + 1} is empty (every index 0..{len(names) - 1} needs a name)")
    if len(names) < 2:
        raise ValueError(f"{path} names {len(names)} class(es): segmentation needs background and at least one more")
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: duplicate class names {sorted({n for n in names if names.count(n) > 1})}")
    if len(names) > IGNORE:
        raise ValueError(f"{path} names {len(names)} classes: masks are 8-bit and {IGNORE} means ignore")
    return names


def check_pair(image_path: Path, mask_path: Path, num_classes: int) -> tuple[Path, str] | None:
    """(the file at fault, why) when this image and mask cannot be used, None when they can: unreadable, sizes
    differ, or an index outside the class list other than 255."""
    try:
        width, height = image.image_size(image_path)
    except ValueError as e:
        return image_path, str(e)
    try:
        mask = image.read_mask(mask_path)
    except ValueError as e:
        return mask_path, str(e)
    if mask.shape != (height, width):
        return mask_path, (f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image {image_path} is "
                           f"{width}x{height}")
    bad = np.unique(mask[(mask >= num_classes) & (mask != IGNORE)])
    if bad.size:
        return mask_path, (f"mask {mask_path} holds class index(es) {bad[:5].tolist()} outside 0..{num_classes - 1} "
                           f"({CLASSES_FILE}) and {IGNORE} (ignore)")
    return None


def _files(folder: Path, suffixes: Sequence[str]) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes
                  and not p.name.startswith("."))


def scan_pairs(folder: str | os.PathLike, num_classes: int) -> tuple[list[tuple[Path, Path]], list[tuple[str, str]]]:
    """(image, mask) pairs of FOLDER/images/* and FOLDER/masks/<stem>.png, and (path, reason) of what is skipped:
    an image without a mask, a mask without an image, or a pair check_pair rejects. Logs every reason."""
    folder = Path(folder)
    for sub in ("images", "masks"):
        if not (folder / sub).is_dir():
            raise FileNotFoundError(f"{folder / sub} not found (layout: {folder}/images/* and {folder}/masks/*.png)")
    images = _files(folder / "images", image.EXTENSIONS)
    masks = {p.stem: p for p in _files(folder / "masks", (".png",))}
    skipped: list[tuple[str, str]] = []
    candidates, seen = [], set()
    for path in images:
        if path.stem in seen:
            skipped.append((str(path), f"image {path} has the stem of another image: one mask cannot serve both"))
        elif path.stem not in masks:
            skipped.append((str(path), f"image {path} has no mask {folder / 'masks' / (path.stem + '.png')}"))
        else:
            candidates.append((path, masks[path.stem]))
        seen.add(path.stem)
    skipped += [(str(m), f"mask {m} has no image") for stem, m in masks.items() if stem not in seen]
    with ThreadPoolExecutor(max_workers=8) as pool:
        reasons = list(pool.map(lambda pair: check_pair(*pair, num_classes), candidates))
    pairs = [pair for pair, fault in zip(candidates, reasons, strict=True) if fault is None]
    skipped += [(str(fault[0]), fault[1]) for fault in reasons if fault is not None]
    if skipped:
        log.warning("%s: skipping %d file(s): %s", folder, len(skipped), listing([why for _, why in skipped], 10))
    if images and not pairs:
        raise ValueError(f"{folder}: none of the {len(images)} images has a usable mask ({skipped[0][1]})")
    return pairs, skipped


class SegmentationDataset(Dataset):
    """(CHW float32 image, HxW int64 mask) per pair; `skipped` lists the paths set aside at scan time. A pair that
    fails to load later gives None (logged), which segmentation_collate drops."""

    def __init__(self, pairs: list[tuple[Path, Path]], class_names: list[str], transform: A.Compose,
                 skipped: Sequence[str] = ()):
        self.pairs, self.class_names, self.transform = list(pairs), list(class_names), transform
        self.skipped = list(skipped)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor] | None:
        image_path, mask_path = self.pairs[index]
        try:
            pixels, mask = image.read_image(image_path), image.read_mask(mask_path)
        except ValueError as e:
            log.warning("skipping %s", e)
            return None
        if mask.shape != pixels.shape[:2]:
            log.warning("skipping %s: mask %s is not the image's size", image_path, mask_path)
            return None
        out = self.transform(image=pixels, mask=mask)
        return out["image"], out["mask"].long()


def segmentation_collate(batch: list) -> tuple[Tensor, Tensor]:
    """Stack images and masks, without the None of files that failed to load (an empty batch has 0 images)."""
    batch = [b for b in batch if b is not None]
    if not batch:
        return torch.zeros(0, 3, 0, 0), torch.zeros(0, 0, 0, dtype=torch.long)
    images, masks = zip(*batch, strict=True)
    return torch.stack(images), torch.stack(masks)


def _cv2_interpolation(preprocess: dict) -> int:
    if preprocess["interpolation"] not in vdata.INTERPOLATIONS:
        raise ValueError(f"preprocess 'interpolation'={preprocess['interpolation']!r} is not one of "
                         f"{sorted(vdata.INTERPOLATIONS)}")
    return vdata.INTERPOLATIONS[preprocess["interpolation"]]


def _finish(preprocess: dict) -> list:
    return [A.Normalize(mean=tuple(preprocess["mean"]), std=tuple(preprocess["std"]), max_pixel_value=255.0),
            ToTensorV2()]


def train_transform(preprocess: dict, augment: dict) -> A.Compose:
    """A random resized crop to the input size (image: preprocess's interpolation, mask: nearest), flip and colour
    jitter (image only), normalisation. augment: the recipe's data.augment (scale, hflip, color_jitter)."""
    h, w = image.input_hw(preprocess)
    steps = [A.RandomResizedCrop(size=(h, w), scale=tuple(float(s) for s in augment["scale"]),
                                 interpolation=_cv2_interpolation(preprocess), mask_interpolation=cv2.INTER_NEAREST)]
    if augment["hflip"]:
        steps.append(A.HorizontalFlip(p=float(augment["hflip"])))
    if augment["color_jitter"]:
        j = float(augment["color_jitter"])
        steps.append(A.ColorJitter(brightness=j, contrast=j, saturation=j, hue=0.0, p=1.0))
    return A.Compose(steps + _finish(preprocess))


class EvalTransform:
    """The whole image resized to the input size with Pillow (mask: nearest), normalised (vislora.image, no
    training stack: what a served segmenter is fed), called as albumentations is: (image=, mask=) -> dict."""

    def __init__(self, preprocess: dict):
        image.check_preprocess(preprocess, ("input_size", "mean", "std", "interpolation"))
        self.preprocess = preprocess
        self.h, self.w = image.input_hw(preprocess)

    def __call__(self, **sample: np.ndarray) -> dict:
        pre, mask = self.preprocess, sample.get("mask")
        pixels = image.resize(sample["image"], self.h, self.w, pre["interpolation"])
        out = {"image": torch.from_numpy(image.normalize(pixels, pre["mean"], pre["std"]))}
        if mask is not None:
            out["mask"] = torch.from_numpy(image.resize(mask, self.h, self.w, "nearest").copy())
        return out


def eval_transform(preprocess: dict) -> EvalTransform:
    """Validation, evaluation and predict: EvalTransform."""
    return EvalTransform(preprocess)


def _val_dir(root: Path) -> Path | None:
    """ROOT's val split folder (vislora.data.val_dir) when it holds images/."""
    folder = vdata.val_dir(root)
    return folder if folder is not None and (folder / "images").is_dir() else None


def split_pairs(root: str | os.PathLike, classes: list[str], val_fraction: float, seed: int
                ) -> tuple[list, list, list[str], list[str]]:
    """(train pairs, val pairs, skipped train paths, skipped val paths) of ROOT/train and ROOT/val, or of ROOT/train
    split by a seeded val_fraction when there is no val folder."""
    root = Path(root)
    train, skipped = scan_pairs(root / "train", len(classes))
    val_dir = _val_dir(root)
    if val_dir is not None:
        val, val_skipped = scan_pairs(val_dir, len(classes))
        return train, val, [p for p, _ in skipped], [p for p, _ in val_skipped]
    if val_fraction == 0 or len(train) < 2:
        return train, [], [p for p, _ in skipped], []
    train, val = train_test_split(train, test_size=val_fraction, random_state=seed)
    return sorted(train), sorted(val), [p for p, _ in skipped], []


def eval_pairs(data: str | os.PathLike | None, recipe: dict | None, classes: list[str]
               ) -> tuple[list[tuple[Path, Path]], list[str]]:
    """The pairs to evaluate and the skipped paths: --data (ROOT/val/{images,masks}, or ROOT/{images,masks}), else
    the run's val split. A classes.txt there must name the run's classes."""
    if data is None:
        if recipe is None:
            raise ValueError("evaluating an exported file needs --data DIR (DIR/val/images + DIR/val/masks, or "
                             "DIR/images + DIR/masks)")
        d = recipe["data"]
        val_dir = _val_dir(Path(d["path"]))
        if val_dir is not None:  # the val folder alone: no need to check every train mask again
            val, skipped = scan_pairs(val_dir, len(classes))
            return val, [p for p, _ in skipped]
        _, val, _, skipped = split_pairs(d["path"], classes, d["val_fraction"], recipe["train"]["seed"])
        if not val:
            raise ValueError(f"the run has no val split under {d['path']}: pass --data DIR")
        return val, skipped
    root = Path(data)
    folder = _val_dir(root) or root
    for place in (root, folder):
        if (place / CLASSES_FILE).is_file() and read_classes(place) != classes:
            raise ValueError(f"the classes of {place / CLASSES_FILE} differ from the run's: {read_classes(place)} "
                             f"vs {classes}")
    pairs, skipped = scan_pairs(folder, len(classes))
    return pairs, [p for p, _ in skipped]


# ---- metrics ----------------------------------------------------------------------------------------
def confusion(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """num_classes x num_classes pixel counts (row: true class, column: predicted), ignore pixels left out."""
    keep = (target != IGNORE) & (target < num_classes)
    index = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(index, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def scores(matrix: np.ndarray) -> dict:
    """IoU per class (nan where a class is neither present nor predicted), their mean over the classes that have
    one (mIoU), and pixel accuracy, from a confusion matrix accumulated over the whole set."""
    m = np.asarray(matrix, dtype=np.float64)
    tp = np.diag(m)
    union = m.sum(0) + m.sum(1) - tp
    iou = np.divide(tp, union, out=np.full_like(tp, np.nan), where=union > 0)
    return {"miou": float(np.nanmean(iou)) if (union > 0).any() else 0.0,
            "pixel_acc": float(tp.sum() / m.sum()) if m.sum() else 0.0, "iou": iou, "support": m.sum(1)}


def segmentation_report(matrix: np.ndarray, classes: list[str]) -> dict:
    """mIoU, pixel accuracy, per-class IoU (None: class absent and never predicted) and pixel support."""
    s = scores(matrix)
    return {"miou": s["miou"], "pixel_acc": s["pixel_acc"],
            "per_class": {name: {"iou": None if math.isnan(s["iou"][i]) else float(s["iou"][i]),
                                 "support": int(s["support"][i])} for i, name in enumerate(classes)},
            "confusion_matrix": np.asarray(matrix, dtype=np.int64).tolist()}


# ---- plots ------------------------------------------------------------------------------------------
def overlay(rgb: np.ndarray, mask: np.ndarray, strength: float = 0.55) -> np.ndarray:
    """The mask's palette colours blended over the image (background, index 0, left as it is)."""
    colours = image.mask_palette()[mask].astype(np.float32)
    shown = (mask != 0)[..., None] * strength
    return (rgb.astype(np.float32) * (1 - shown) + colours * shown).round().astype(np.uint8)


def plot_masks(samples: list[tuple[np.ndarray, np.ndarray, np.ndarray]], classes: list[str], path: Path) -> Path:
    """A PNG grid, one row per (image, true mask, predicted mask): the image, then each mask over it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    rows = max(1, len(samples))
    fig = Figure(figsize=(7.5, 2.5 * rows + 0.8))
    FigureCanvasAgg(fig)
    for r, (rgb, truth, pred) in enumerate(samples):
        for c, (title, shown) in enumerate((("image", rgb), ("true", overlay(rgb, truth)),
                                            ("predicted", overlay(rgb, pred)))):
            ax = fig.add_subplot(rows, 3, 3 * r + c + 1)
            ax.imshow(shown)
            ax.set_axis_off()
            ax.set_title(title, fontsize=8)
    present = sorted({int(k) for _, t, p in samples for k in np.union1d(np.unique(t), np.unique(p))} - {0})
    palette = image.mask_palette() / 255
    handles = [Patch(color=palette[k], label=classes[k] if k < len(classes) else "ignore") for k in present]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=7)
    fig.tight_layout(rect=(0, 0.6 / (2.5 * rows + 0.8) if handles else 0, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


# ---- the task interface (vislora/tasks/__init__.py) -----------------------------------------------
def image_size_of(recipe: dict) -> int | list[int]:
    """data.img_size, else segmenter.img_size."""
    return recipe["data"]["img_size"] or recipe["segmenter"]["img_size"]


def build_model(recipe: dict, classes: Sequence[str]) -> Segmenter:
    """The recipe's segmenter for these classes (seeded: the same decoder every time the run is rebuilt)."""
    return seeded(recipe, lambda: build_segmenter(recipe["model"], recipe["segmenter"], len(classes)))


def adapt(model: Segmenter, recipe: dict) -> Segmenter:
    """LoRA in the backbone with the decoder trained; linear_probe: the decoder only; null: everything (backbone
    BatchNorm statistics stay frozen in all three)."""
    return adapt_segmenter(model, lora_config(recipe), probe=recipe["adapter"] == "linear_probe")


def preprocess_of(model: Segmenter, recipe: dict, class_names: list[str]) -> dict:
    """input_size (data.img_size or segmenter.img_size), mean/std/interpolation (the backbone's pretrained_cfg
    unless the recipe sets them), crop_pct 1.0 (the whole image is resized), the class names and the task."""
    d = recipe["data"]
    if d["crop_pct"] not in (None, 1, 1.0):
        raise ValueError(f"data.crop_pct={d['crop_pct']}: segmentation resizes the whole image (leave it unset)")
    overrides = {"img_size": image_size_of(recipe), "mean": d["mean"], "std": d["std"],
                 "interpolation": d["interpolation"], "crop_pct": 1.0}
    pre = vdata.preprocess_config(model.body.pretrained_cfg, overrides)
    return {**pre, "class_names": list(class_names), "task": NAME}


def check_batch(recipe: dict) -> None:
    """DeepLabV3's image-pooling branch normalises one value per channel and image: BatchNorm cannot train on a
    batch of one (torch: 'Expected more than 1 value per channel'), so that is refused before any work."""
    if recipe["segmenter"]["head"] == "deeplabv3" and recipe["train"]["batch_size"] < 2:
        raise ValueError("train.batch_size=1 cannot train segmenter.head deeplabv3 (the BatchNorm of its image-"
                         "pooling branch needs 2 images a batch): set train.batch_size >= 2, or segmenter.head fpn")


def build(recipe: dict) -> Setup:
    """Scan ROOT/{train,val}/{images,masks} and classes.txt, build the base segmenter and its preprocessing."""
    d = recipe["data"]
    check_batch(recipe)
    classes = read_classes(d["path"])
    train, val, train_skipped, val_skipped = split_pairs(d["path"], classes, d["val_fraction"],
                                                         recipe["train"]["seed"])
    model = build_model(recipe, classes)
    pre = preprocess_of(model, recipe, classes)
    train_set = SegmentationDataset(train, classes, train_transform(pre, d["augment"]), train_skipped)
    val_set = SegmentationDataset(val, classes, eval_transform(pre), val_skipped)
    return Setup(model, train_set, val_set, segmentation_collate, classes, pre)


def loss(model: nn.Module, batch, device: torch.device, recipe: dict) -> tuple[Tensor, dict, int]:
    """Per-pixel cross-entropy (255 ignored, the recipe's label smoothing); logs pixel accuracy."""
    images, masks = batch
    if not len(images):  # every file of the batch failed to load
        return torch.zeros((), device=device, requires_grad=True), {}, 0
    images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
    logits = model(images)
    valid = masks != IGNORE
    if not valid.any():
        return logits.sum() * 0.0, {}, len(images)
    value = F.cross_entropy(logits, masks, ignore_index=IGNORE, label_smoothing=recipe["train"]["label_smoothing"])
    with torch.no_grad():
        acc = (logits.argmax(1)[valid] == masks[valid]).float().mean().item()
    return value, {"acc": acc}, len(images)


@torch.no_grad()
def validate(model: nn.Module, loader, device: torch.device, amp_dtype, world: int) -> dict:
    """Loss per pixel, mIoU and pixel accuracy from one confusion matrix over the whole val set (each rank's shard,
    summed across ranks), and how many classes were predicted anywhere."""
    model.eval()
    n = len(loader.dataset.class_names)
    matrix = torch.zeros(n, n, dtype=torch.int64, device=device)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss, pixels
    for images, masks in loader:
        if not len(images):
            continue
        images, masks = images.to(device), masks.to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images).float()
        sums[0] += F.cross_entropy(logits, masks, ignore_index=IGNORE, reduction="sum").double()
        sums[1] += (masks != IGNORE).sum()
        matrix += confusion(logits.argmax(1), masks, n)
    if world > 1:
        dist.all_reduce(matrix)
        dist.all_reduce(sums)
    s = scores(matrix.cpu().numpy())
    return {"val_loss": sums[0].item() / max(sums[1].item(), 1), "val_miou": s["miou"],
            "val_pixel_acc": s["pixel_acc"], "val_predicted_classes": int((matrix.sum(0) > 0).sum().item())}


def health(row: dict, num_classes: int) -> str | None:
    """A warning when every val pixel still gets the same class after COLLAPSE_EPOCHS epochs (the decoder collapsed
    to the majority class; in the first epochs a dominant background alone is normal)."""
    if row.get("val_predicted_classes", num_classes) > 1 or row["epoch"] < COLLAPSE_EPOCHS:
        return None
    return (f"training looks collapsed at epoch {row['epoch']}: every val pixel gets the same class (val mIoU "
            f"{row.get('val_miou', math.nan):.3f}). Likely causes: too few epochs for a rare foreground, a learning "
            "rate too high (lower train.lr), or masks whose indices do not match classes.txt")


def preview(batch, preprocess: dict, classes: list[str]) -> list[tuple[np.ndarray, str]]:
    """A training batch as the model sees it (augmented crops; normalisation undone), its masks blended over,
    captioned with the classes present."""
    images, masks = batch
    tiles = []
    for x, mask in zip(images.numpy(), masks.numpy(), strict=True):
        shown = np.where(mask == IGNORE, 0, mask).astype(np.uint8)
        present = [classes[k] for k in np.unique(shown) if 0 < k < len(classes)]
        tiles.append((overlay(denormalize(x, preprocess), shown), ", ".join(present)[:40] or "background only"))
    return tiles


def predictor(model: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    """NCHW float32 batch -> N x C x H x W logits, with the PyTorch model (the convention of exported files)."""
    return batch_predictor(model)


def example_inputs(recipe: dict, preprocess: dict, n: int = 8) -> Tensor | None:
    """Up to n val images of the run through the eval transform (None if none can be read)."""
    try:
        pairs, _ = eval_pairs(None, recipe, preprocess["class_names"])
    except (FileNotFoundError, ValueError):
        return None
    dataset = SegmentationDataset(pairs[:n], preprocess["class_names"], eval_transform(preprocess))
    images = [item[0] for item in (dataset[i] for i in range(len(dataset))) if item is not None]
    return torch.stack(images) if images else None


def _mask_at(logits: np.ndarray, height: int, width: int) -> np.ndarray:
    """1 x C x h x w logits upsampled (bilinear) to height x width, argmax: the HxW uint8 class mask."""
    up = F.interpolate(torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32)), size=(height, width),
                       mode="bilinear", align_corners=False)
    return up[0].argmax(0).numpy().astype(np.uint8)


def _mask_path(out_dir: Path, path: Path, taken: set[str], inputs: set[Path]) -> Path:
    """OUT_DIR/<stem>_mask.png, numbered where that name is taken by another mask of this call or by an input
    image (predicting a.png beside an input a_mask.png must never overwrite it)."""
    stem, k = f"{path.stem}_mask", 1
    while stem in taken or (out_dir / f"{stem}.png").resolve() in inputs:
        stem, k = f"{path.stem}_mask_{k}", k + 1
    taken.add(stem)
    return out_dir / f"{stem}.png"


def predict(predictor: Callable[[np.ndarray], np.ndarray], preprocess: dict, image_paths: Sequence[str | os.PathLike],
            topk: int = 5, out_dir: str | os.PathLike | None = None) -> list[dict]:
    """Per image: a palette PNG of the predicted classes at the image's own size (OUT_DIR/<stem>_mask.png) and the
    class pixel shares; all results also go to OUT_DIR/predictions.json. out_dir None = ./predictions.
    An unreadable image gets {"path", "error"}."""
    names = preprocess["class_names"]
    out_dir = Path(out_dir if out_dir is not None else PREDICT_DIR)
    transform = eval_transform(preprocess)
    results, taken, inputs = [], set(), {Path(p).resolve() for p in image_paths}
    for path, rgb, error in image.read_each(image_paths):
        if error:
            results.append({"path": path, "error": error})
            continue
        logits = np.asarray(predictor(transform(image=rgb)["image"][None].numpy()))
        if logits.ndim != 4 or logits.shape[1] != len(names):
            raise ValueError(f"the model outputs {logits.shape}, not 1 x {len(names)} classes x H x W logits")
        mask = _mask_at(logits, *rgb.shape[:2])
        out_dir.mkdir(parents=True, exist_ok=True)
        mask_path = _mask_path(out_dir, Path(path), taken, inputs)
        image.write_mask(mask_path, mask)
        counts = np.bincount(mask.ravel(), minlength=len(names))
        order = np.argsort(-counts, kind="stable")
        shares = {names[k]: float(counts[k] / mask.size) for k in order if counts[k]}
        results.append({"path": str(path), "mask": str(mask_path), "shares": shares,
                        "top": list(shares.items())[:topk]})
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "predictions.json").write_text(json.dumps(results, indent=2))
    return results


def format_prediction(result: dict) -> str:
    return f"{result['path']}: " + ", ".join(f"{name} {share:.1%}" for name, share in result["top"]) + \
        f" -> {result['mask']}"


def evaluate(predictor: Callable[[np.ndarray], np.ndarray], preprocess: dict, recipe: dict | None, data,
             out: Path, batch_size: int, workers: int = 2, run_dir: Path | None = None) -> dict:
    """mIoU, pixel accuracy, per-class IoU and the confusion matrix of `predictor` on --data or the run's val split,
    accumulated over every pixel of every image; OUT_confusion.{csv,png} and OUT_masks.png go beside OUT."""
    classes = preprocess["class_names"]
    pairs, skipped = eval_pairs(data, recipe, classes)
    dataset = SegmentationDataset(pairs, classes, eval_transform(preprocess), skipped)
    loader = vdata.build_loader(dataset, batch_size, False, workers, collate_fn=segmentation_collate)
    matrix = np.zeros((len(classes), len(classes)), dtype=np.int64)
    samples, count = [], 0
    for images, masks in tqdm(loader, desc="eval", leave=False):
        if not len(images):
            continue
        pred = torch.from_numpy(np.asarray(predictor(images.numpy().astype(np.float32))).argmax(1))
        matrix += confusion(pred, masks, len(classes)).numpy()
        count += len(images)
        for x, t, p in zip(images.numpy(), masks.numpy(), pred.numpy(), strict=True):
            if len(samples) < SHOWN:
                samples.append((denormalize(x, preprocess), t.astype(np.uint8), p.astype(np.uint8)))
    report = {**segmentation_report(matrix, classes), "num_images": count, "skipped": list(dataset.skipped)}
    write_confusion(report, out, classes, normalize=True)
    plot_masks(samples, classes, out.with_name(out.stem + "_masks.png"))
    return report


def format_report(report: dict) -> str:
    lines = [f"mIoU {report['miou']:.4f}  pixel accuracy {report['pixel_acc']:.4f}  ({report['num_images']} images)",
             f"  {'class':<20} {'IoU':>6} {'pixels':>10}"]
    for name, m in report["per_class"].items():
        iou = "-" if m["iou"] is None else f"{m['iou']:.3f}"
        lines.append(f"  {name:<20} {iou:>6} {m['support']:10d}")
    return "\n".join(lines)
