"""Semantic segmentation: a timm backbone under a light decoder, per-pixel cross-entropy, mIoU over
the val set.

The timm model sits at `body` of the Segmenter, so `inject(segmenter, cfg, within="body")` adapts
only the backbone (the presets leave its stem alone) while the decoder trains fully. CNNs use timm's
features_only mode; a plain ViT gives its last token map, and for the FPN head detection's simple
pyramid. Decoders: torchvision's FeaturePyramidNetwork with every level convolved, upsampled and
summed (Panoptic FPN's semantic branch), or torchvision's DeepLabV3 head on the last map. Logits are
upsampled (bilinear) to the input size: the model maps an NCHW batch to N x C x H x W logits, so it
traces and exports to ONNX like a classifier. The pieces: segmentation_model.py (the segmenter),
segmentation_data.py (folders, masks, dataset), segmentation_metrics.py (IoU, overlays); this file
is the task interface (vislora/tasks/__init__.py).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from vislora import data as vdata
from vislora import image
from vislora.augment import EvalTransform, train_pipeline
from vislora.errors import VisloraError
from vislora.files import write_json
from vislora.tasks.common import (
    Setup,
    batch_predictor,
    denormalize,
    lora_config,
    seeded,
    write_confusion,
)
from vislora.tasks.segmentation_data import (
    CLASSES_FILE,
    IGNORE,
    SegmentationDataset,
    eval_pairs,
    read_classes,
    segmentation_collate,
    split_pairs,
)
from vislora.tasks.segmentation_metrics import confusion as pixel_confusion
from vislora.tasks.segmentation_metrics import overlay, plot_masks, scores, segmentation_report
from vislora.tasks.segmentation_model import Segmenter, adapt_segmenter, build_segmenter

NAME = "segmentation"
SCORE = "val_miou"  # the validation metric that picks the best epoch (higher is better)
EXPORT = {"torchscript": "trace", "input": "batch", "onnx": None, "served": None}  # None: supported
PREDICT_DIR = "predictions"  # where `predict` writes masks and predictions.json without out_dir (vislora.evaluate
# passes predictions/ beside the model)
SHOWN = 6  # images in OUT_masks.png
COLLAPSE_EPOCHS = 3  # health() warns from this epoch on


def image_size_of(recipe: dict) -> int | list[int]:
    """data.img_size, else segmenter.img_size."""
    return recipe["data"]["img_size"] or recipe["segmenter"]["img_size"]


def build_model(recipe: dict, classes: Sequence[str]) -> Segmenter:
    """The recipe's segmenter for these classes (seeded: the same decoder every time the run is
    rebuilt)."""
    return seeded(recipe, lambda: build_segmenter(recipe["model"], recipe["segmenter"], len(classes)))


def adapt(model: Segmenter, recipe: dict) -> Segmenter:
    """LoRA in the backbone with the decoder trained; linear_probe: the decoder only; null:
    everything (backbone BatchNorm statistics stay frozen in all three)."""
    return adapt_segmenter(model, lora_config(recipe), probe=recipe["adapter"] == "linear_probe")


def preprocess_of(model: Segmenter, recipe: dict, class_names: list[str]) -> dict:
    """input_size (data.img_size or segmenter.img_size), mean/std/interpolation (the backbone's
    pretrained_cfg unless the recipe sets them), crop_pct 1.0 (the whole image is resized), the
    class names and the task."""
    d = recipe["data"]
    if d["crop_pct"] not in (None, 1, 1.0):
        raise VisloraError(f"data.crop_pct={d['crop_pct']}: segmentation resizes the whole image (leave it unset)")
    overrides = {"img_size": image_size_of(recipe), "mean": d["mean"], "std": d["std"],
                 "interpolation": d["interpolation"], "crop_pct": 1.0}
    pre = vdata.preprocess_config(model.body.pretrained_cfg, overrides)
    return {**pre, "class_names": list(class_names), "task": NAME}


def check_batch(recipe: dict) -> None:
    """DeepLabV3's image-pooling branch normalises one value per channel and image: BatchNorm cannot
    train on a batch of one (torch: 'Expected more than 1 value per channel'), so that is refused
    before any work."""
    if recipe["segmenter"]["head"] == "deeplabv3" and recipe["train"]["batch_size"] < 2:
        raise VisloraError("train.batch_size=1 cannot train segmenter.head deeplabv3 (the BatchNorm of its image-"
                         "pooling branch needs 2 images a batch): set train.batch_size >= 2, or segmenter.head fpn")


def build(recipe: dict) -> Setup:
    """Scan ROOT/{train,val}/{images,masks} and classes.txt, build the base segmenter and its
    preprocessing."""
    d = recipe["data"]
    check_batch(recipe)
    classes = read_classes(d["path"])
    train, val, train_skipped, val_skipped = split_pairs(d["path"], classes, d["val_fraction"],
                                                         recipe["train"]["seed"])
    model = build_model(recipe, classes)
    pre = preprocess_of(model, recipe, classes)
    train_set = SegmentationDataset(train, classes, train_pipeline(pre, d["augment"], "mask"), train_skipped)
    val_set = SegmentationDataset(val, classes, EvalTransform(pre, whole=True), val_skipped)
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
    """Loss per pixel, mIoU and pixel accuracy from one confusion matrix over the whole val set
    (each rank's shard, summed across ranks), and how many classes were predicted anywhere."""
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
        matrix += pixel_confusion(logits.argmax(1), masks, n)
    if world > 1:
        dist.all_reduce(matrix)
        dist.all_reduce(sums)
    s = scores(matrix.cpu().numpy())
    return {"val_loss": sums[0].item() / max(sums[1].item(), 1), "val_miou": s["miou"],
            "val_pixel_acc": s["pixel_acc"], "val_predicted_classes": int((matrix.sum(0) > 0).sum().item())}


def health(row: dict, num_classes: int) -> str | None:
    """A warning when every val pixel still gets the same class after COLLAPSE_EPOCHS epochs (the
    decoder collapsed to the majority class; in the first epochs a dominant background alone is
    normal)."""
    if row.get("val_predicted_classes", num_classes) > 1 or row["epoch"] < COLLAPSE_EPOCHS:
        return None
    return (f"training looks collapsed at epoch {row['epoch']}: every val pixel gets the same class (val mIoU "
            f"{row.get('val_miou', math.nan):.3f}). Likely causes: too few epochs for a rare foreground, a learning "
            "rate too high (lower train.lr), or masks whose indices do not match classes.txt")


def synthetic_batch(preprocess: dict, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """n random images at preprocess's input_size (standard normal, as normalised pixels are) and a
    random class per pixel: the collate's (images, masks), to time training steps on."""
    g = torch.Generator().manual_seed(seed)
    size = [int(s) for s in preprocess["input_size"]]
    images = torch.randn(n, *size, generator=g)
    return images, torch.randint(0, len(preprocess["class_names"]), (n, *size[1:]), generator=g)


def recipe_classes(recipe: dict) -> list[str] | None:
    """The classes.txt of the recipe's data.path, None where there is none yet."""
    path = recipe["data"]["path"]
    return read_classes(path) if path and (Path(path) / CLASSES_FILE).is_file() else None


def preview(batch, preprocess: dict, classes: list[str]) -> list[tuple[np.ndarray, str]]:
    """A training batch as the model sees it (augmented crops; normalisation undone), its masks
    blended over, captioned with the classes present."""
    images, masks = batch
    tiles = []
    for x, mask in zip(images.numpy(), masks.numpy(), strict=True):
        shown = np.where(mask == IGNORE, 0, mask).astype(np.uint8)
        present = [classes[k] for k in np.unique(shown) if 0 < k < len(classes)]
        tiles.append((overlay(denormalize(x, preprocess), shown), ", ".join(present)[:40] or "background only"))
    return tiles


def predictor(model: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    """NCHW float32 batch -> N x C x H x W logits, with the PyTorch model (the convention of
    exported files)."""
    return batch_predictor(model)


def example_inputs(recipe: dict, preprocess: dict, n: int = 8) -> Tensor | None:
    """Up to n val images of the run through the eval transform (None if none can be read)."""
    try:
        pairs, _ = eval_pairs(None, recipe, preprocess["class_names"])
    except (FileNotFoundError, ValueError):
        return None
    dataset = SegmentationDataset(pairs[:n], preprocess["class_names"], EvalTransform(preprocess, whole=True))
    images = [item[0] for item in (dataset[i] for i in range(len(dataset))) if item is not None]
    return torch.stack(images) if images else None


def _mask_at(logits: np.ndarray, height: int, width: int) -> np.ndarray:
    """1 x C x h x w logits upsampled (bilinear) to height x width, argmax: the HxW uint8 class
    mask."""
    up = F.interpolate(torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32)), size=(height, width),
                       mode="bilinear", align_corners=False)
    return up[0].argmax(0).numpy().astype(np.uint8)


def _mask_path(out_dir: Path, path: Path, taken: set[str], inputs: set[Path]) -> Path:
    """OUT_DIR/<stem>_mask.png, numbered where that name is taken by another mask of this call or by
    an input image (predicting a.png beside an input a_mask.png must never overwrite it)."""
    stem, k = f"{path.stem}_mask", 1
    while stem in taken or (out_dir / f"{stem}.png").resolve() in inputs:
        stem, k = f"{path.stem}_mask_{k}", k + 1
    taken.add(stem)
    return out_dir / f"{stem}.png"


def predict(predictor: Callable[[np.ndarray], np.ndarray], preprocess: dict, image_paths: Sequence[str | os.PathLike],
            topk: int = 5, out_dir: str | os.PathLike | None = None) -> list[dict]:
    """Per image: a palette PNG of the predicted classes at the image's own size
    (OUT_DIR/<stem>_mask.png) and the class pixel shares; all results also go to
    OUT_DIR/predictions.json. out_dir None = ./predictions. An unreadable image gets {"path",
    "error"}."""
    names = preprocess["class_names"]
    out_dir = Path(out_dir if out_dir is not None else PREDICT_DIR)
    transform = EvalTransform(preprocess, whole=True)
    results, taken, inputs = [], set(), {Path(p).resolve() for p in image_paths}
    for path, rgb, error in image.read_each(image_paths):
        if error:
            results.append({"path": path, "error": error})
            continue
        logits = np.asarray(predictor(transform(image=rgb)["image"][None].numpy()))
        if logits.ndim != 4 or logits.shape[1] != len(names):
            raise VisloraError(f"the model outputs {logits.shape}, not 1 x {len(names)} classes x H x W logits")
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
    write_json(out_dir / "predictions.json", results)
    return results


def format_prediction(result: dict) -> str:
    return f"{result['path']}: " + ", ".join(f"{name} {share:.1%}" for name, share in result["top"]) + \
        f" -> {result['mask']}"


def evaluate(predictor: Callable[[np.ndarray], np.ndarray], preprocess: dict, recipe: dict | None, data,
             out: Path, batch_size: int, workers: int = 2, run_dir: Path | None = None) -> dict:
    """mIoU, pixel accuracy, per-class IoU and the confusion matrix of `predictor` on --data or the
    run's val split, accumulated over every pixel of every image; OUT_confusion.{csv,png} and
    OUT_masks.png go beside OUT."""
    classes = preprocess["class_names"]
    pairs, skipped = eval_pairs(data, recipe, classes)
    dataset = SegmentationDataset(pairs, classes, EvalTransform(preprocess, whole=True), skipped)
    loader = vdata.build_loader(dataset, batch_size, False, workers, collate_fn=segmentation_collate)
    matrix = np.zeros((len(classes), len(classes)), dtype=np.int64)
    samples, count = [], 0
    for images, masks in tqdm(loader, desc="eval", leave=False):
        if not len(images):
            continue
        pred = torch.from_numpy(np.asarray(predictor(images.numpy().astype(np.float32))).argmax(1))
        matrix += pixel_confusion(pred, masks, len(classes)).numpy()
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
