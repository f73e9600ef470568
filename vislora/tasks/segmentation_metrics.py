"""Segmentation metrics and pictures: the pixel confusion matrix, IoU / mIoU / pixel accuracy, mask
overlays."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vislora import image
from vislora.tasks.segmentation_data import IGNORE


def confusion(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """num_classes x num_classes pixel counts (row: true class, column: predicted), ignore pixels
    left out."""
    keep = (target != IGNORE) & (target < num_classes)
    index = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(index, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def scores(matrix: np.ndarray) -> dict:
    """IoU per class (nan where a class is neither present nor predicted), their mean over the
    classes that have one (mIoU), and pixel accuracy, from a confusion matrix accumulated over the
    whole set."""
    m = np.asarray(matrix, dtype=np.float64)
    tp = np.diag(m)
    union = m.sum(0) + m.sum(1) - tp
    iou = np.divide(tp, union, out=np.full_like(tp, np.nan), where=union > 0)
    return {"miou": float(np.nanmean(iou)) if (union > 0).any() else 0.0,
            "pixel_acc": float(tp.sum() / m.sum()) if m.sum() else 0.0, "iou": iou, "support": m.sum(1)}


def segmentation_report(matrix: np.ndarray, classes: list[str]) -> dict:
    """mIoU, pixel accuracy, per-class IoU (None: class absent and never predicted) and pixel
    support."""
    s = scores(matrix)
    return {"miou": s["miou"], "pixel_acc": s["pixel_acc"],
            "per_class": {name: {"iou": None if math.isnan(s["iou"][i]) else float(s["iou"][i]),
                                 "support": int(s["support"][i])} for i, name in enumerate(classes)},
            "confusion_matrix": np.asarray(matrix, dtype=np.int64).tolist()}


# ---- plots ---------------------------------------------------------------------------------------
def overlay(rgb: np.ndarray, mask: np.ndarray, strength: float = 0.55) -> np.ndarray:
    """The mask's palette colours blended over the image (background, index 0, left as it is)."""
    colours = image.mask_palette()[mask].astype(np.float32)
    shown = (mask != 0)[..., None] * strength
    return (rgb.astype(np.float32) * (1 - shown) + colours * shown).round().astype(np.uint8)


def plot_masks(samples: list[tuple[np.ndarray, np.ndarray, np.ndarray]], classes: list[str], path: Path) -> Path:
    """A PNG grid, one row per (image, true mask, predicted mask): the image, then each mask over
    it."""
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

