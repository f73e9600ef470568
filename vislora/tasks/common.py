"""What every task shares: the Setup the loop receives, seeded model building, the cards of local
weight files, the numpy predictor convention, the confusion-matrix files and image grids."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from vislora import image
from vislora.config import LoraConfig
from vislora.errors import VisloraError
from vislora.files import read_json


@dataclass
class Setup:
    """Everything the loop needs, built once from the recipe by a task's build(): the base model
    (not yet adapted), the datasets, the collate function, the class names and the preprocessing
    written beside the run."""

    model: nn.Module
    train_set: torch.utils.data.Dataset
    val_set: torch.utils.data.Dataset
    collate: Callable
    class_names: list[str]
    preprocess: dict
    notes: list[str] = field(default_factory=list)  # what the user should know before training starts
    split: dict | None = None  # the images of each split, written as the run's split.json (None: not recorded)


def lora_config(recipe: dict) -> LoraConfig | None:
    """The recipe's LoraConfig (its adapter section holds exactly LoraConfig's fields, as plain
    data: recipes are read and checked without torch), or None for full fine-tuning and linear
    probing."""
    adapter = recipe["adapter"]
    return LoraConfig(**adapter) if isinstance(adapter, dict) else None


def batch_predictor(model: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    """NCHW float32 numpy batch -> numpy output of the PyTorch model, in eval mode: the convention
    of exported files (vislora.exported), so evaluation and predict run a run directory and an
    exported file the same way."""
    model.eval()
    device = next(model.parameters()).device

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)).float().cpu().numpy()

    return run


def class_batch(preprocess: dict, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n random images at preprocess's input_size (standard normal, as normalised pixels are) and
    one class index per image among its class_names: a synthetic (images, labels) batch to time a
    training step on."""
    g = torch.Generator().manual_seed(seed)
    size = [int(s) for s in preprocess["input_size"]]
    images = torch.randn(n, *size, generator=g)
    return images, torch.randint(0, len(preprocess["class_names"]), (n,), generator=g)


def seeded(recipe: dict, build: Callable[[], nn.Module]) -> nn.Module:
    """build() right after torch.manual_seed(train.seed): a base without pretrained weights (and a
    new head) comes out the same in training and in every later `eval`, `export` or `extract` of the
    run."""
    torch.manual_seed(recipe["train"]["seed"])
    return build()


CARD_KEYS = ("input_size", "mean", "std", "crop_pct", "interpolation")


def read_card(path: str | Path) -> dict:
    """The card beside a local weights file (WEIGHTS.json, as tools/import_weights.py and
    tools/pretrain.py write them), or {} when there is none."""
    card = Path(path).with_suffix(".json")
    if not card.is_file():
        return {}
    content = read_json(card, f"card of {Path(path).name}")
    if not isinstance(content, dict):
        raise VisloraError(f"{card} (the card of {Path(path).name}) is not a JSON object")
    return content


def card_pretrained_cfg(path: str | Path) -> dict:
    """The preprocessing a local weights file was trained with: its card's "pretrained_cfg" entries
    among CARD_KEYS. timm's pretrained_cfg describes the hub weights, not these; the recipe's data
    fields still win."""
    cfg = read_card(path).get("pretrained_cfg") or {}
    return {k: v for k, v in cfg.items() if k in CARD_KEYS} if isinstance(cfg, dict) else {}


def card_classes(path: str | Path) -> list[str] | None:
    """The class names a local weights file's classifier was trained for, from its card ("classes"),
    or None."""
    classes = read_card(path).get("classes")
    return [str(c) for c in classes] if isinstance(classes, list) else None


def plot_confusion(matrix: list[list[int]], classes: list[str], path: Path, normalize: bool = False) -> None:
    """The confusion matrix as a PNG; normalize: each true-class row as fractions (pixel counts of
    segmentation are too large to read), shown with two decimals."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = np.asarray(matrix)
    if normalize:
        m = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    size = max(4, 0.5 * len(classes) + 2)
    fig = Figure(figsize=(size, size))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(m, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted", ylabel="true",
           title="confusion matrix" + (" (row fractions)" if normalize else ""))
    ax.set_xticklabels(classes, rotation=90)
    ax.set_yticklabels(classes)
    if len(classes) <= 30:
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(j, i, f"{m[i, j]:.2f}" if normalize else str(m[i, j]), ha="center", va="center",
                        fontsize=7 if not normalize or len(classes) <= 12 else 5,
                        color="white" if m[i, j] > m.max() / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def denormalize(x: np.ndarray, preprocess: dict) -> np.ndarray:
    """A normalised 3xHxW model input back to HxWx3 uint8 for display."""
    mean, std = np.asarray(preprocess["mean"])[:, None, None], np.asarray(preprocess["std"])[:, None, None]
    return np.clip((x * std + mean) * 255, 0, 255).round().astype(np.uint8).transpose(1, 2, 0)


def fit(rgb: np.ndarray, side: int) -> np.ndarray:
    """An image scaled (aspect kept) into a white side x side square, centred: one cell of a
    grid."""
    h, w = rgb.shape[:2]
    scale = side / max(h, w)
    small = image.resize(rgb, max(1, round(h * scale)), max(1, round(w * scale)))
    cell = np.full((side, side, 3), 255, dtype=np.uint8)
    top, left = (side - small.shape[0]) // 2, (side - small.shape[1]) // 2
    cell[top:top + small.shape[0], left:left + small.shape[1]] = small
    return cell


def plot_image_grid(tiles: Sequence[tuple[np.ndarray, str]], path: Path, title: str, empty: str = "no images",
                    columns: int = 4, side: int = 160) -> Path:
    """A PNG grid of (HxWx3 uint8 image, caption) tiles under a title; `empty` is written when there
    is none. The tiles are one mosaic drawn at one pixel per pixel (a subplot per tile took a second
    for 16)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, top, gap = max(1, math.ceil(len(tiles) / columns)), 16, 6  # top: room for a caption above each cell
    cell_w, cell_h = side + gap, side + top
    mosaic = np.full((rows * cell_h, columns * cell_w, 3), 255, dtype=np.uint8)
    for i, (rgb, _) in enumerate(tiles):
        r, c = divmod(i, columns)
        mosaic[r * cell_h + top:(r + 1) * cell_h, c * cell_w:c * cell_w + side] = fit(rgb, side)
    title_px = 30
    fig = Figure(figsize=(mosaic.shape[1] / 100, (mosaic.shape[0] + title_px) / 100), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, mosaic.shape[0] / (mosaic.shape[0] + title_px)))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_axis_off()
    for i, (_, caption) in enumerate(tiles):
        r, c = divmod(i, columns)
        ax.text(c * cell_w + side / 2, r * cell_h + top - 3, caption, ha="center", va="bottom", fontsize=6.5)
    if not tiles:
        ax.text(mosaic.shape[1] / 2, cell_h / 2, empty, ha="center", va="center")
    fig.suptitle(title, fontsize=9, y=1 - 8 / (mosaic.shape[0] + title_px), va="top")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def write_confusion(report: dict, out: Path, classes: list[str], normalize: bool = False) -> None:
    """The confusion matrix as OUT_confusion.csv (counts) and OUT_confusion.png (normalize: row
    fractions) beside the report."""
    with open(out.with_name(out.stem + "_confusion.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true\\predicted", *classes])
        for name, row in zip(classes, report["confusion_matrix"], strict=True):
            writer.writerow([name, *row])
    plot_confusion(report["confusion_matrix"], classes, out.with_name(out.stem + "_confusion.png"), normalize)
