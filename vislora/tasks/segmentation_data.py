"""Segmentation data: ROOT/{train,val}/images/* with ROOT/{train,val}/masks/<stem>.png (class
indices, 255 = ignore) and ROOT/classes.txt (one name a line, 0 = background); the scan that names
every unusable pair, the dataset (its transforms: vislora.augment's train_pipeline, target "mask",
and EvalTransform, whole=True)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import albumentations as A
import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch import Tensor
from torch.utils.data import Dataset

from vislora import data as vdata
from vislora import image
from vislora.errors import VisloraError
from vislora.files import listing

log = logging.getLogger(__name__)



IGNORE = 255  # mask value of pixels that count for nothing (loss, metrics)
CLASSES_FILE = "classes.txt"


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
        raise VisloraError(f"{path}: line {names.index('') + 1} is empty "
                           f"(every index 0..{len(names) - 1} needs a name)")
    if len(names) < 2:
        raise VisloraError(f"{path} names {len(names)} class(es): segmentation needs background and at least one more")
    if len(set(names)) != len(names):
        raise VisloraError(f"{path}: duplicate class names {sorted({n for n in names if names.count(n) > 1})}")
    if len(names) > IGNORE:
        raise VisloraError(f"{path} names {len(names)} classes: masks are 8-bit and {IGNORE} means ignore")
    return names


def check_pair(image_path: Path, mask_path: Path, num_classes: int) -> tuple[Path, str] | None:
    """(the file at fault, why) when this image and mask cannot be used, None when they can:
    unreadable, sizes differ, or an index outside the class list other than 255."""
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
    """(image, mask) pairs of FOLDER/images/* and FOLDER/masks/<stem>.png, and (path, reason) of
    what is skipped: an image without a mask, a mask without an image, or a pair check_pair rejects.
    Logs every reason."""
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
        raise VisloraError(f"{folder}: none of the {len(images)} images has a usable mask ({skipped[0][1]})")
    return pairs, skipped


class SegmentationDataset(Dataset):
    """(CHW float32 image, HxW int64 mask) per pair; `skipped` lists the paths set aside at scan
    time. A pair that fails to load later gives None (logged), which segmentation_collate drops."""

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
    """Stack images and masks, without the None of files that failed to load (an empty batch has 0
    images)."""
    batch = [b for b in batch if b is not None]
    if not batch:
        return torch.zeros(0, 3, 0, 0), torch.zeros(0, 0, 0, dtype=torch.long)
    images, masks = zip(*batch, strict=True)
    return torch.stack(images), torch.stack(masks)


def _val_dir(root: Path) -> Path | None:
    """ROOT's val split folder (vislora.data.val_dir) when it holds images/."""
    folder = vdata.val_dir(root)
    return folder if folder is not None and (folder / "images").is_dir() else None


def split_pairs(root: str | os.PathLike, classes: list[str], val_fraction: float, seed: int
                ) -> tuple[list, list, list[str], list[str]]:
    """(train pairs, val pairs, skipped train paths, skipped val paths) of ROOT/train and ROOT/val,
    or of ROOT/train split by a seeded val_fraction when there is no val folder."""
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
    """The pairs to evaluate and the skipped paths: --data (ROOT/val/{images,masks}, or
    ROOT/{images,masks}), else the run's val split. A classes.txt there must name the run's
    classes."""
    if data is None:
        if recipe is None:
            raise VisloraError("evaluating an exported file needs --data DIR (DIR/val/images + DIR/val/masks, or "
                             "DIR/images + DIR/masks)")
        d = recipe["data"]
        val_dir = _val_dir(Path(d["path"]))
        if val_dir is not None:  # the val folder alone: no need to check every train mask again
            val, skipped = scan_pairs(val_dir, len(classes))
            return val, [p for p, _ in skipped]
        _, val, _, skipped = split_pairs(d["path"], classes, d["val_fraction"], recipe["train"]["seed"])
        if not val:
            raise VisloraError(f"the run has no val split under {d['path']}: pass --data DIR")
        return val, skipped
    root = Path(data)
    folder = _val_dir(root) or root
    for place in (root, folder):
        if (place / CLASSES_FILE).is_file() and read_classes(place) != classes:
            raise VisloraError(f"the classes of {place / CLASSES_FILE} differ from the run's: {read_classes(place)} "
                             f"vs {classes}")
    pairs, skipped = scan_pairs(folder, len(classes))
    return pairs, [p for p, _ in skipped]

