"""Object detection on a timm backbone: torchvision FCOS / RetinaNet / Faster R-CNN over an FPN,
LoRA in the body.

The pieces: detection_model.py (the detector on tasks/backbone.py), detection_data.py (COCO / YOLO,
boxes, augmentation), detection_metrics.py (loss, COCO mAP, plots). This file is the task interface
(vislora/tasks/__init__.py).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from vislora import image
from vislora.config import LoraConfig
from vislora.errors import VisloraError
from vislora.tasks.backbone import adapt_backbone
from vislora.tasks.common import Setup, lora_config, seeded
from vislora.tasks.detection_data import build_detection_datasets, detection_collate
from vislora.tasks.detection_metrics import (
    detection_loss,
    draw_box,
    evaluate_detection,
    plot_detections,
    predict_detections,
)
from vislora.tasks.detection_model import build_detector, detection_train_modules

NAME = "detection"
SCORE = "val_map"  # the validation metric that picks the best epoch (higher is better)
EXPORT = {"torchscript": "script", "input": "list",
          "onnx": "ONNX export of torchvision detectors is not supported (list-of-images input, post-processing "
                  "with data-dependent shapes): use --format torchscript",
          "served": "an exported detector is not evaluated or run from its file by vislora: use the run directory "
                    "(vislora eval RUN, vislora predict RUN IMAGE...)"}


def detector_config(recipe: dict) -> dict:
    """The recipe's detector section without unset (None) fields, so each head keeps torchvision's
    defaults."""
    return {k: v for k, v in recipe["detector"].items() if v is not None}


def adapt_detector(detector: nn.Module, lora: LoraConfig | None, probe: bool = False) -> nn.Module:
    """LoRA inside `backbone.body` with neck and head trained; None: full fine-tuning; probe: neck
    and head only."""
    return adapt_backbone(detector, lora, "backbone.body", detection_train_modules(detector), probe)


def build_model(recipe: dict, classes: Sequence[str]) -> nn.Module:
    """The recipe's detector for these classes (seeded: the same neck and head every time the run is
    rebuilt)."""
    return seeded(recipe, lambda: build_detector(recipe["model"], detector_config(recipe), len(classes)))


def adapt(model: nn.Module, recipe: dict) -> nn.Module:
    """LoRA in the backbone with neck and head trained; linear_probe: neck and head only; null:
    everything."""
    return adapt_detector(model, lora_config(recipe), probe=recipe["adapter"] == "linear_probe")


def build(recipe: dict) -> Setup:
    d, det = recipe["data"], recipe["detector"]
    train_set, val_set, names = build_detection_datasets(d, det["min_size"], d["augment"],
                                                         d["interpolation"] or "bilinear")
    model = build_model(recipe, names)
    pre = {"input_size": [3, det["min_size"], det["min_size"]], "class_names": names, "task": NAME}
    return Setup(model, train_set, val_set, detection_collate, names, pre)


def loss(model: nn.Module, batch, device: torch.device, recipe: dict) -> tuple[Tensor, dict, int]:
    images, targets = batch
    value, logs = detection_loss(model, images, targets)
    return value, logs, len(images)


def validate(model: nn.Module, loader, device: torch.device, amp_dtype, world: int) -> dict:
    report = evaluate_detection(model, loader, loader.dataset.class_names, device=device)
    return {"val_map": report["map"], "val_map50": report["map50"]}


def preview(batch, preprocess: dict, classes: list[str]) -> list[tuple[np.ndarray, str]]:
    """A training batch as the detector gets it (augmented), its boxes drawn, captioned with their
    classes."""
    images, targets = batch
    tiles = []
    for x, target in zip(images, targets, strict=True):
        rgb = (x.permute(1, 2, 0).numpy() * 255).clip(0, 255).astype(np.uint8)
        for box in target["boxes"].round().int().tolist():
            draw_box(rgb, box)
        names = sorted({classes[int(k) - 1] for k in target["labels"]})
        tiles.append((rgb, f"{len(target['boxes'])} boxes: {', '.join(names)[:40]}"))
    return tiles

def synthetic_batch(preprocess: dict, n: int, seed: int = 0, boxes: int = 3) -> tuple[list[Tensor], list[dict]]:
    """n random images in [0, 1] at preprocess's input_size, each with `boxes` random boxes (xyxy
    pixels, at least 4 px a side) of random classes 1..len(class_names): the collate's (images,
    targets), to time steps on."""
    g = torch.Generator().manual_seed(seed)
    _, height, width = (int(s) for s in preprocess["input_size"])
    images, targets = [], []
    for _ in range(n):
        images.append(torch.rand(3, height, width, generator=g))
        corner = torch.rand(boxes, 2, generator=g) * torch.tensor([width - 4.0, height - 4.0])
        side = 4 + torch.rand(boxes, 2, generator=g) * (torch.tensor([width, height]) - 4 - corner)
        labels = torch.randint(1, len(preprocess["class_names"]) + 1, (boxes,), generator=g)
        targets.append({"boxes": torch.cat([corner, corner + side], 1), "labels": labels})
    return images, targets


def predictor(model: nn.Module) -> nn.Module:
    """A detector is run as itself: a list of CHW float images in [0, 1] -> boxes, scores, labels
    per image."""
    return model.eval()


def predict(predictor: nn.Module, preprocess: dict, image_paths: Sequence[str | os.PathLike], topk: int = 5,
            out_dir: str | os.PathLike | None = None, score_thresh: float = 0.3) -> list[dict]:
    """Up to topk boxes per image (xyxy pixels of the upright image) scoring at least score_thresh;
    an unreadable image gets {"path", "error"}. Nothing is written (out_dir: the interface's place
    for files)."""
    names = preprocess["class_names"]
    results = []
    for path, pixels, error in image.read_each(image_paths):
        if error:
            results.append({"path": path, "error": error})
            continue
        tensor = torch.from_numpy(pixels).permute(2, 0, 1).float().div_(255)
        pred = predict_detections(predictor, [tensor])[0]
        keep = [i for i in range(len(pred["scores"])) if pred["scores"][i] >= score_thresh][:topk]
        results.append({"path": str(path), "boxes": [
            {"label": names[int(pred["labels"][i]) - 1], "score": float(pred["scores"][i]),
             "box": [round(float(v), 1) for v in pred["boxes"][i]]} for i in keep]})
    return results


def format_prediction(result: dict) -> str:
    boxes = [f"{b['label']} {b['score']:.2f} {b['box']}" for b in result["boxes"]]
    return f"{result['path']}: " + ("; ".join(boxes) if boxes else "no box")


def _eval_data(recipe: dict, data: str | os.PathLike | None) -> dict:
    """The data section to evaluate: the run's own, or --data as a YOLO folder (its val split)."""
    if data is None:
        return recipe["data"]
    root = Path(data)
    if not (root / "data.yaml").is_file():
        raise VisloraError(f"--data {root}: a detection run evaluates a YOLO folder (ROOT/data.yaml with the class "
                         "names); for COCO data, set data.val_ann in a recipe")
    return {**recipe["data"], "format": "yolo", "path": str(root)}


def evaluate(predictor: nn.Module, preprocess: dict, recipe: dict | None, data, out: Path, batch_size: int,
             workers: int = 2, run_dir: Path | None = None) -> dict:
    """COCO mAP of the run's detector on its val split (or --data, a YOLO folder); draws
    OUT_boxes.png beside OUT."""
    _, val_set, names = build_detection_datasets(_eval_data(recipe, data), recipe["detector"]["min_size"])
    if names != preprocess["class_names"]:
        raise VisloraError(f"the classes of {data} differ from the run's: {names} vs {preprocess['class_names']}")
    loader = torch.utils.data.DataLoader(val_set, batch_size, num_workers=workers, collate_fn=detection_collate)
    report = evaluate_detection(predictor, loader, names)
    plot_detections(predictor, val_set, names, out.with_name(out.stem + "_boxes.png"))
    return report


def format_report(report: dict) -> str:
    lines = [f"mAP@[.5:.95] {report['map']:.4f}  mAP@.5 {report['map50']:.4f}  mAP@.75 {report['map75']:.4f}"]
    lines += [f"  {name:<20} AP {ap:.4f}" for name, ap in report["per_class"].items()]
    return "\n".join(lines)
