"""Detection data: COCO JSON and Ultralytics YOLO folders read into records with clean boxes, the
dataset, the train augmentation (vislora.augment's train_pipeline, target "bboxes": the boxes move
with the pixels) and the collate."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import albumentations as A
import numpy as np
import torch
import yaml
from torch import Tensor
from torch.utils.data import Dataset

from vislora import image
from vislora.augment import train_pipeline
from vislora.errors import VisloraError
from vislora.files import listing, read_json

log = logging.getLogger(__name__)



def clean_boxes(boxes: np.ndarray, labels: np.ndarray, width: float, height: float
                ) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Clip xyxy boxes to the image, drop non-finite and empty ones; returns boxes, labels, clipped,
    dropped."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    finite = np.isfinite(boxes).all(axis=1)
    clipped = boxes.copy()
    clipped[:, 0::2] = np.clip(np.nan_to_num(clipped[:, 0::2]), 0, width)
    clipped[:, 1::2] = np.clip(np.nan_to_num(clipped[:, 1::2]), 0, height)
    keep = finite & (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    moved = (np.abs(clipped - np.nan_to_num(boxes)) > 0.01).any(axis=1)  # rounding of saved coordinates is no news
    n_clipped = int((keep & moved).sum())
    return clipped[keep].astype(np.float32), labels[keep], n_clipped, int((~keep).sum())


def _report(source, clipped: int, dropped: int) -> None:
    if clipped or dropped:
        log.warning("%s: dropped %d degenerate box(es) (zero/negative area, NaN/inf or outside the image), "
                    "clipped %d to the image", source, dropped, clipped)


class DetectionDataset(Dataset):
    """Images with boxes; item = (CHW float image in [0, 1], {boxes [N,4] xyxy pixels, labels [N] in
    1..K, image_id}). An albumentations pipeline (with BboxParams pascal_voc,
    label_fields=['labels']) moves boxes."""

    def __init__(self, records: list[dict], class_names: list[str], transform: A.Compose | None = None,
                 skipped: Sequence[str] = ()):
        self.records, self.class_names, self.transform = records, list(class_names), transform
        self.skipped = list(skipped)  # image files set aside as unreadable when the records were read

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[Tensor, dict] | None:
        rec = self.records[index]
        try:
            pixels = image.read_image(rec["path"])
        except ValueError as e:  # a file that broke after the scan: skipped, as classification does
            log.warning("skipping %s", e)
            return None
        boxes, labels = rec["boxes"], rec["labels"]
        if self.transform is not None:  # CHW float in [0, 1] out
            out = self.transform(image=pixels, bboxes=boxes, labels=labels)
            tensor, boxes, labels = out["image"], out["bboxes"], out["labels"]
        else:
            tensor = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float().div_(255)
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # rounding in a resize can empty a box
        return tensor, {"boxes": torch.from_numpy(boxes[keep]), "labels": torch.from_numpy(labels[keep]),
                        "image_id": int(rec["image_id"])}


def _size(path: Path) -> tuple[int, int] | None:
    """(width, height) of an image, None for a file that cannot be read (it is skipped, not
    fatal)."""
    try:
        return image.image_size(path)
    except ValueError:
        return None


def usable_records(records: list[dict], source: str) -> tuple[list[dict], list[str]]:
    """The records whose image Pillow can read, and the paths of the others (reported once, by
    name)."""
    skipped = [str(r["path"]) for r in records if r.get("size") is None or not image.verifies(r["path"])]
    if skipped:
        log.warning("%s: skipping %d unreadable image(s): %s", source, len(skipped), listing(skipped))
    bad = set(skipped)
    return [r for r in records if str(r["path"]) not in bad], skipped



def coco_categories(data: dict, path: Path) -> tuple[dict[int, int], list[str]]:
    """Category id -> label 1..K (in id order) and the class names."""
    try:
        cats = sorted(data["categories"], key=lambda c: c["id"])
        return {c["id"]: i + 1 for i, c in enumerate(cats)}, [str(c["name"]) for c in cats]
    except (KeyError, TypeError) as e:
        raise VisloraError(f"{path}: 'categories' must be a list of {{id, name}} entries ({e!r})") from e


def coco_records(ann_path: str | os.PathLike, images_dir: str | os.PathLike, label_of: dict[int, int] | None = None
                 ) -> tuple[list[dict], list[str], dict[int, int]]:
    """Records of one COCO file, its class names and category id -> label map (label_of: use another
    file's). Crowd boxes are skipped; missing image files are an error at once."""
    ann_path, images_dir = Path(ann_path), Path(images_dir)
    data = read_json(ann_path, "COCO annotation file")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise VisloraError(f"{ann_path}: COCO key '{key}' is missing")
    own_labels, names = coco_categories(data, ann_path)
    label_of = label_of or own_labels
    images = {}
    for img in data["images"]:
        if "id" not in img or "file_name" not in img:
            raise VisloraError(f"{ann_path}: image entry {img} needs 'id' and 'file_name'")
        images[img["id"]] = img
    missing = [img["file_name"] for img in images.values() if not (images_dir / img["file_name"]).is_file()]
    if missing:
        raise FileNotFoundError(f"{ann_path}: {len(missing)} image file(s) named in the annotations are missing "
                                f"under {images_dir}, e.g. {missing[:5]}")
    boxes: dict = {i: [] for i in images}
    for ann in data["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        if ann.get("image_id") not in images:
            raise VisloraError(f"{ann_path}: annotation {ann.get('id')} refers to unknown image_id "
                               f"{ann.get('image_id')}")
        if ann.get("category_id") not in label_of:
            raise VisloraError(f"{ann_path}: annotation {ann.get('id')} has unknown category_id "
                             f"{ann.get('category_id')}")
        bbox = ann.get("bbox")
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            raise VisloraError(f"{ann_path}: annotation {ann.get('id')} needs a bbox [x, y, w, h], got {bbox!r}")
        try:
            x, y, w, h = (float(v) if v is not None else math.nan for v in bbox)
        except (TypeError, ValueError) as e:
            raise VisloraError(f"{ann_path}: annotation {ann.get('id')} has a non-numeric bbox {bbox!r}") from e
        boxes[ann["image_id"]].append(([x, y, x + w, y + h], label_of[ann["category_id"]]))
    records, clipped, dropped = [], 0, 0
    for position, (image_id, img) in enumerate(images.items()):
        path = images_dir / img["file_name"]
        size = (img["width"], img["height"]) if img.get("width") and img.get("height") else _size(path)
        if size is None:  # unreadable: usable_records sets it aside
            records.append({"path": path, "boxes": np.zeros((0, 4)), "labels": np.zeros(0, dtype=np.int64),
                            "size": None, "image_id": position})
            continue
        width, height = size
        b = np.array([x for x, _ in boxes[image_id]], dtype=np.float64).reshape(-1, 4)
        lab = np.array([c for _, c in boxes[image_id]], dtype=np.int64)
        b, lab, c, d = clean_boxes(b, lab, width, height)
        clipped, dropped = clipped + c, dropped + d
        records.append({"path": path, "boxes": b, "labels": lab, "size": size,
                        "image_id": image_id if isinstance(image_id, int) else position})
    _report(ann_path, clipped, dropped)
    return records, names, label_of


def yolo_names(root: Path) -> tuple[list[str], dict]:
    path = root / "data.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"YOLO dataset {root} has no data.yaml (it must list the class 'names')")
    data = yaml.safe_load(path.read_text()) or {}
    names = data.get("names")
    if isinstance(names, dict):
        keys = sorted(int(k) for k in names)
        if keys != list(range(len(keys))):
            raise VisloraError(f"{path}: 'names' keys must be 0..{len(keys) - 1}, got {keys}")
        names = [str(names[k]) if k in names else str(names[str(k)]) for k in keys]
    if not isinstance(names, list) or not names:
        raise VisloraError(f"{path}: 'names' must be a non-empty list or a dict {{index: name}}")
    return [str(n) for n in names], data


def _label_path(image: Path) -> Path:
    """Ultralytics' rule: the last /images/ of the path becomes /labels/, the suffix .txt."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return Path(sb.join(str(image).rsplit(sa, 1))).with_suffix(".txt")


def _yolo_boxes(label_file: Path, width: int, height: int, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    boxes, labels = [], []
    for lineno, line in enumerate(label_file.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            cls, values = float(parts[0]), [float(v) for v in parts[1:]]
        except ValueError as e:
            raise VisloraError(f"{label_file}:{lineno}: not numbers: {line!r}") from e
        if not (math.isfinite(cls) and cls == int(cls)):
            raise VisloraError(f"{label_file}:{lineno}: class {parts[0]!r} is not a whole number (0..{n_classes - 1})")
        cls = int(cls)
        if not 0 <= cls < n_classes:
            raise VisloraError(f"{label_file}:{lineno}: class {cls} is outside 0..{n_classes - 1} (data.yaml names)")
        if len(values) == 4:
            cx, cy, w, h = values
            box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
        elif len(values) >= 6 and len(values) % 2 == 0:  # a segment polygon: its bounding box
            xs, ys = values[0::2], values[1::2]
            box = [min(xs), min(ys), max(xs), max(ys)]
        else:
            raise VisloraError(f"{label_file}:{lineno}: expected 'class cx cy w h' (or a polygon), got {line!r}")
        boxes.append([box[0] * width, box[1] * height, box[2] * width, box[3] * height])
        labels.append(cls + 1)
    return np.array(boxes, dtype=np.float64).reshape(-1, 4), np.array(labels, dtype=np.int64)


def yolo_records(root: str | os.PathLike, split: str, names: list[str], data: dict) -> list[dict]:
    """Records of one split: images under data.yaml's `train`/`val` dir (default images/<split>); an
    image without a label file has no boxes."""
    root = Path(root)
    folder = data.get(split) or f"images/{split}"
    if not isinstance(folder, str):
        raise VisloraError(f"{root / 'data.yaml'}: '{split}' must be one folder (relative to {root}), got {folder!r}")
    image_dir = root / folder
    if not image_dir.is_dir():
        raise FileNotFoundError(f"YOLO dataset {root}: image folder {image_dir} for split '{split}' not found")
    files = sorted(p for p in image_dir.rglob("*") if p.suffix.lower() in image.EXTENSIONS)
    records, clipped, dropped = [], 0, 0
    bad_files = []
    for i, path in enumerate(files):
        size = _size(path)
        if size is None:  # unreadable: usable_records sets it aside
            records.append({"path": path, "boxes": np.zeros((0, 4)), "labels": np.zeros(0, dtype=np.int64),
                            "size": None, "image_id": i})
            continue
        width, height = size
        label_file = _label_path(path)
        if label_file.is_file():
            b, lab = _yolo_boxes(label_file, width, height, len(names))
        else:
            b, lab = np.zeros((0, 4)), np.zeros(0, dtype=np.int64)
        b, lab, c, d = clean_boxes(b, lab, width, height)
        if c or d:
            bad_files.append(label_file.name)
        clipped, dropped = clipped + c, dropped + d
        records.append({"path": path, "boxes": b, "labels": lab, "size": size, "image_id": i})
    if bad_files:
        _report(f"{image_dir} labels {bad_files[:5]}{' ...' if len(bad_files) > 5 else ''}", clipped, dropped)
    return records


def _need(cfg: dict, *keys: str) -> None:
    missing = [k for k in keys if not cfg.get(k)]
    if missing:
        raise VisloraError(f"data config (format {cfg.get('format')!r}) needs key(s) {missing}")


def build_detection_datasets(data_cfg: dict, img_size: int, augment: dict | None = None,
                             interpolation: str = "bilinear"
                             ) -> tuple[DetectionDataset, DetectionDataset, list[str]]:
    """Train (augmented) and val (untouched: the detector resizes) datasets and the class names. The
    train crops are img_size x img_size, resized with `interpolation`; augment: the recipe's
    data.augment (None = defaults).

    {format: coco, images: DIR, train_ann: FILE, val_ann: FILE} (file_name relative to images) or
    {format: yolo, path: ROOT} (ROOT/images/{train,val}, ROOT/labels/{train,val}, ROOT/data.yaml
    names)."""
    fmt = data_cfg.get("format")
    if fmt == "coco":
        _need(data_cfg, "images", "train_ann", "val_ann")
        train, names, label_of = coco_records(data_cfg["train_ann"], data_cfg["images"])
        val, val_names, _ = coco_records(data_cfg["val_ann"], data_cfg["images"], label_of)
        if val_names != names:
            raise VisloraError(f"{data_cfg['val_ann']}: categories {val_names} differ from {data_cfg['train_ann']}: "
                             f"{names}")
    elif fmt == "yolo":
        _need(data_cfg, "path")
        names, meta = yolo_names(Path(data_cfg["path"]))
        train = yolo_records(data_cfg["path"], "train", names, meta)
        val = yolo_records(data_cfg["path"], "val", names, meta)
    else:
        raise VisloraError(f"data format {fmt!r} is not supported: use 'coco' or 'yolo'")
    (train, train_skipped), (val, val_skipped) = usable_records(train, "train"), usable_records(val, "val")
    crop = {"input_size": (3, img_size, img_size), "interpolation": interpolation}  # no mean/std: [0, 1] pixels
    return (DetectionDataset(train, names, train_pipeline(crop, augment, "bboxes"), train_skipped),
            DetectionDataset(val, names, None, val_skipped), names)


def detection_collate(batch: list) -> tuple[list[Tensor], list[dict]]:
    """Images differ in size: keep lists (torchvision's transform batches and pads them)."""
    batch = [b for b in batch if b is not None]  # unreadable files
    images, targets = zip(*batch, strict=True) if batch else ((), ())
    return list(images), list(targets)
