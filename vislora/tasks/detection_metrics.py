"""Detection metrics and pictures: the summed torchvision loss, predictions, COCO mAP via
pycocotools (over every rank's images), the grid of predicted and true boxes."""

from __future__ import annotations

import contextlib
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor
from torch.utils.data import Dataset


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def detection_loss(model: nn.Module, images: list[Tensor], targets: list[dict]) -> tuple[Tensor, dict[str, float]]:
    """The summed torchvision losses of a detector in train mode, and each part as a float for
    logging."""
    if not model.training:
        raise ValueError("detection_loss needs model.train(): in eval mode torchvision detectors return boxes")
    device = _device(model)
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets]
    losses = model(images, targets)
    total = sum(losses.values())
    return total, {k: float(v.detach()) for k, v in losses.items()}


@torch.no_grad()
def predict_detections(model: nn.Module, images: list[Tensor]) -> list[dict]:
    """Boxes (xyxy, input pixels), scores and labels per image, on the CPU; the train/eval mode is
    restored."""
    was_training = model.training
    model.eval()
    try:
        out = model([im.to(_device(model)) for im in images])
    finally:
        model.train(was_training)
    return [{k: v.detach().cpu() for k, v in o.items()} for o in out]


def _xywh(boxes: Tensor) -> list[list[float]]:
    b = boxes.double()
    return torch.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], dim=1).tolist()


def coco_eval(gt: dict, dets: list[dict], num_classes: int) -> dict:
    """COCOeval bbox metrics of in-memory ground truth and detections; -1 (no ground truth) becomes
    nan."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    nan = float("nan")
    has_gt = {a["category_id"] for a in gt["annotations"]}
    if not dets or not gt["annotations"]:
        zero = 0.0 if gt["annotations"] else nan
        return {"map": zero, "map50": zero, "map75": zero,
                "per_class": {k: (0.0 if k in has_gt else nan) for k in range(1, num_classes + 1)}}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dets)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stat = lambda v: float(v) if v >= 0 else nan  # noqa: E731
    precision = ev.eval["precision"][:, :, :, 0, -1]  # IoU x recall x class, area "all", 100 detections
    per_class = {}
    for k, cat in enumerate(ev.params.catIds):
        p = precision[:, :, k]
        per_class[cat] = float(p[p > -1].mean()) if (p > -1).any() else nan
    return {"map": stat(ev.stats[0]), "map50": stat(ev.stats[1]), "map75": stat(ev.stats[2]), "per_class": per_class}


def _gathered(items: list) -> list:
    """Every rank's items, in rank order (the items themselves when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return items
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, items)
    return [item for part in everyone for item in part]


@torch.no_grad()
def evaluate_detection(model: nn.Module, loader, class_names: list[str], device=None,
                       max_images: int | None = None) -> dict:
    """COCO mAP (IoU .50:.95), mAP50, mAP75 as fractions and AP per class (nan for a class without
    ground truth in the evaluated images), via pycocotools on ground truth built in memory from the
    loader. device: move the model there first (None: run where the model is); the train/eval mode
    is restored. Under torch.distributed every rank evaluates its shard and the metrics cover all of
    them."""
    if device is not None:
        model.to(device)
    seen: list[tuple[tuple[int, int], dict, dict]] = []  # ((height, width), target, prediction) per image
    for images, targets in loader:
        if max_images is not None:
            images, targets = images[:max_images - len(seen)], targets[:max_images - len(seen)]
        for image_, target, pred in zip(images, targets, predict_detections(model, images), strict=True):
            seen.append(((int(image_.shape[-2]), int(image_.shape[-1])), target, pred))
        if max_images is not None and len(seen) >= max_images:
            break
    gt = {"images": [], "annotations": [], "categories": [{"id": i + 1, "name": n} for i, n in
                                                          enumerate(class_names)]}
    dets: list[dict] = []
    for n, ((height, width), target, pred) in enumerate(_gathered(seen), 1):
        gt["images"].append({"id": n, "width": width, "height": height})
        for box, label in zip(_xywh(target["boxes"]), target["labels"].tolist(), strict=True):
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": n, "category_id": int(label),
                                      "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
        for box, score, label in zip(_xywh(pred["boxes"]), pred["scores"].tolist(), pred["labels"].tolist(),
                                     strict=True):
            dets.append({"image_id": n, "category_id": int(label), "bbox": box, "score": float(score)})
    result = coco_eval(gt, dets, len(class_names))
    result["per_class"] = {name: result["per_class"][i + 1] for i, name in enumerate(class_names)}
    result["num_images"] = len(gt["images"])
    return result


@torch.no_grad()
def plot_detections(model: nn.Module, dataset: Dataset, class_names: list[str], path: str | os.PathLike,
                    n: int = 8, score_thresh: float = 0.3) -> Path:
    """A PNG grid of the first n images: ground truth (green, dashed) and predictions with scores
    (red)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    items = [dataset[i] for i in range(min(n, len(dataset)))]
    preds = predict_detections(model, [im for im, _ in items]) if items else []
    cols = max(1, min(4, len(items)))
    rows = max(1, math.ceil(len(items) / cols))
    fig = Figure(figsize=(3 * cols, 3 * rows + 0.4))
    FigureCanvasAgg(fig)
    name = lambda label: class_names[label - 1] if 0 < label <= len(class_names) else str(label)  # noqa: E731
    for k, ((pixels, target), pred) in enumerate(zip(items, preds, strict=True)):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.imshow(pixels.permute(1, 2, 0).clamp(0, 1).numpy())
        ax.set_axis_off()
        ax.set_title(f"image {target['image_id']}", fontsize=8)
        for (x0, y0, x1, y1), label in zip(target["boxes"].tolist(), target["labels"].tolist(), strict=True):
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="lime", linestyle="--", lw=1))
            ax.text(x0, y1, name(label), color="lime", fontsize=6, va="top")
        for (x0, y0, x1, y1), label, score in zip(pred["boxes"].tolist(), pred["labels"].tolist(),
                                                  pred["scores"].tolist(), strict=True):
            if score >= score_thresh:
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="red", lw=1))
                ax.text(x0, y0, f"{name(label)} {score:.2f}", color="red", fontsize=6, va="bottom")
    fig.suptitle(f"green dashed: ground truth, red: predicted (score >= {score_thresh})", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path



def draw_box(rgb: np.ndarray, box: Sequence[int], colour=(255, 0, 0)) -> None:
    """Draw a 1-pixel xyxy rectangle into an HxWx3 image, in place (clipped to the image)."""
    h, w = rgb.shape[:2]
    x0, y0, x1, y1 = (max(0, min(v, limit - 1)) for v, limit in zip(box, (w, h, w, h), strict=True))
    rgb[y0, x0:x1 + 1] = rgb[y1, x0:x1 + 1] = colour
    rgb[y0:y1 + 1, x0] = rgb[y0:y1 + 1, x1] = colour

