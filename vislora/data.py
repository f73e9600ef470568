"""Classification data: image folders, stratified splits, preprocessing configs, loaders that skip
bad files.

Layouts: ROOT/train/<class>/* + ROOT/val/<class>/*, or ROOT/<class>/* split into train/val by a
stratified, seeded fraction. Class names are the folder names, sorted. Files Pillow cannot read are
found at scan time (`skipped`); a file that breaks later makes its sample None, which `collate_skip`
drops, so an epoch never crashes.
"""

from __future__ import annotations

import colorsys
import logging
import math
import multiprocessing
import random
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.context import get_spawning_popen
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from sklearn.model_selection import train_test_split
from timm.data import resolve_data_config, resolve_model_data_config
from tqdm import tqdm

from vislora import image
from vislora.augment import INTERPOLATIONS
from vislora.errors import VisloraError
from vislora.files import listing

logger = logging.getLogger(__name__)

VAL_DIRS = ("val", "valid", "validation")
SPLIT_DIRS = ("train", *VAL_DIRS, "test")
OVERRIDE_KEYS = ("img_size", "mean", "std", "interpolation", "crop_pct")


@dataclass
class Split:
    """Image paths with integer labels, and the class names the labels index."""

    items: list[tuple[Path, int]]
    classes: list[str]


# ---- scanning folders ----------------------------------------------------------------------------
def _visible(path: Path) -> bool:
    return not path.name.startswith(".")  # skips .DS_Store, macOS ._x.jpg resource forks, hidden folders


def _class_dirs(root: Path) -> list[Path]:
    return sorted((p for p in root.iterdir() if p.is_dir() and _visible(p)), key=lambda p: p.name)


def _images(folder: Path) -> list[Path]:
    """Image files under folder (any depth, any case of extension), sorted."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in image.EXTENSIONS and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _scan_classes(root: Path, classes: list[str] | None = None) -> Split:
    """One ROOT/<class>/* folder; with `classes`, its folders must be among them and labels index
    them."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    dirs = _class_dirs(root)
    loose = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in image.EXTENSIONS]
    if loose:
        logger.warning("%s: ignoring %d image(s) outside class folders (images go in %s/<class>/)",
                       root, len(loose), root)
    if classes is None:
        if len(dirs) < 2:
            raise VisloraError(f"{root} holds {len(dirs)} class folder(s) ({[d.name for d in dirs]}): "
                             "a classifier needs at least 2 (layout: ROOT/<class>/* or ROOT/train/<class>/*)")
        classes = [d.name for d in dirs]
    elif not dirs:
        raise VisloraError(f"{root} holds no class folders (expected {root}/<class>/* with classes {classes})")
    items = []
    for d in dirs:
        if d.name not in classes:
            raise VisloraError(f"class folder {d} is not one of the training classes {classes}")
        files = _images(d)
        if not files:
            raise VisloraError(f"class folder {d} holds no images (extensions: {', '.join(image.EXTENSIONS)})")
        label = classes.index(d.name)
        items += [(f, label) for f in files]
    return Split(items, list(classes))


def _split_names_only(root: Path) -> bool:
    """Every folder of ROOT is a split name (train, val, valid, validation, test): a ROOT/train +
    ROOT/val layout, not class folders one of which happens to be called `train` or `valid`."""
    return all(d.name in SPLIT_DIRS for d in _class_dirs(root))


def val_dir(root: Path) -> Path | None:
    """ROOT's val split folder, when ROOT is a split layout."""
    if not _split_names_only(root):
        return None
    return next((root / n for n in VAL_DIRS if (root / n).is_dir()), None)


def is_split_layout(root: Path) -> bool:
    """ROOT/train/<class>/* (+ ROOT/val/<class>/*): ROOT holds only split folders and train holds
    class folders."""
    train = root / "train"
    return train.is_dir() and _split_names_only(root) and bool(_class_dirs(train))


def _stratified_split(full: Split, root: Path, val_fraction: float, seed: int) -> tuple[Split, Split]:
    """Seeded, stratified train/val split of one folder (sklearn's train_test_split)."""
    if not 0 <= val_fraction < 1:
        raise VisloraError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0:
        return full, Split([], full.classes)
    labels = [y for _, y in full.items]
    counts = np.bincount(labels, minlength=len(full.classes))
    if counts.min() < 2:
        name = full.classes[int(counts.argmin())]
        raise VisloraError(f"class folder {root / name} holds {counts.min()} image: a stratified train/val split "
                         "needs at least 2 per class (add images, or use ROOT/train + ROOT/val folders)")
    try:
        train, val = train_test_split(full.items, test_size=val_fraction, random_state=seed, stratify=labels)
    except ValueError as e:
        raise VisloraError(f"{root}: cannot split {len(labels)} images of {len(full.classes)} classes with "
                         f"val_fraction={val_fraction}: {e}") from e
    missing = sorted(set(full.classes) - {full.classes[y] for _, y in val})
    if missing:
        logger.warning("%s: val_fraction=%s leaves no val images for class(es) %s", root, val_fraction, missing)
    return Split(sorted(train), full.classes), Split(sorted(val), full.classes)


def scan_folder(root: str | Path, val_fraction: float = 0.2, seed: int = 0) -> tuple[Split, Split]:
    """(train, val) from ROOT/train + ROOT/val, or from ROOT/<class> (or a ROOT/train alone) split
    by a stratified, seeded val_fraction. Empty class folders, < 2 classes or unknown val classes:
    ValueError."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    if is_split_layout(root):
        train = _scan_classes(root / "train")
        val = val_dir(root)
        if val is not None:
            return train, _scan_classes(val, train.classes)
        return _stratified_split(train, root / "train", val_fraction, seed)
    return _stratified_split(_scan_classes(root), root, val_fraction, seed)


def scan_eval_folder(path: str | Path, classes: list[str]) -> Split:
    """Images to evaluate from ROOT/val, a ROOT holding val/, or a plain ROOT/<class> folder,
    labelled by the training `classes` (a class folder unknown to them is a ValueError)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"image folder not found: {path}")
    return _scan_classes(val_dir(path) or path, list(classes))


# ---- checking images -----------------------------------------------------------------------------
def find_unreadable(paths: Sequence[Path], threads: int = 8) -> list[str]:
    """The paths Pillow cannot open and verify (checked in threads; a progress bar for large
    folders)."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        ok = list(tqdm(pool.map(image.verifies, paths), total=len(paths), desc="checking images", leave=False,
                       disable=len(paths) < 5000))
    return [str(p) for p, good in zip(paths, ok, strict=True) if not good]


# ---- preprocessing config and transforms ---------------------------------------------------------
def _fixed_input_size(model: torch.nn.Module) -> tuple[int, int] | None:
    """The size a ViT-like model was built for (timm keeps the pretrained 224 in pretrained_cfg
    after img_size=)."""
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) and len(size) == 2 else None


def _triple(key: str, value) -> tuple[float, float, float]:
    values = [value] if isinstance(value, (int, float)) else list(value)
    if len(values) == 1:
        values *= 3
    if len(values) != 3 or not all(isinstance(v, (int, float)) for v in values):
        raise VisloraError(f"preprocess '{key}' must be 3 numbers (R, G, B) or one, got {value!r}")
    if key == "std" and min(values) <= 0:
        raise VisloraError(f"preprocess 'std' must be positive, got {value!r}")
    return tuple(float(v) for v in values)


def _input_size(value) -> tuple[int, int, int]:
    size = [value] if isinstance(value, int) else list(value)
    if len(size) == 1:
        size *= 2
    size = size[-2:] if len(size) == 3 else size
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise VisloraError(f"preprocess 'img_size' must be S, [H, W] or [3, H, W] positive ints, got {value!r}")
    return (3, size[0], size[1])


def preprocess_config(model_or_pretrained_cfg, overrides: dict | None = None) -> dict:
    """{input_size (3,H,W), mean, std, interpolation, crop_pct} from a timm model (or its
    pretrained_cfg dict), then `overrides` (keys img_size, mean, std, interpolation, crop_pct; None
    values are ignored)."""
    src = model_or_pretrained_cfg
    if isinstance(src, torch.nn.Module):
        cfg = resolve_model_data_config(src)
        fixed = _fixed_input_size(src)
        if fixed:
            cfg["input_size"] = (3, *fixed)
    elif isinstance(src, Mapping):
        cfg = resolve_data_config(pretrained_cfg=dict(src) or {"crop_mode": "center"})  # timm rejects an empty one
    else:
        raise TypeError(f"preprocess_config needs a timm model or a pretrained_cfg dict, got {type(src).__name__}")
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(overrides) - set(OVERRIDE_KEYS))
    if unknown:
        raise VisloraError(f"unknown preprocess override(s) {unknown}; known: {', '.join(OVERRIDE_KEYS)}")
    pre = {"input_size": _input_size(overrides.get("img_size", cfg["input_size"])),
           "mean": _triple("mean", overrides.get("mean", cfg["mean"])),
           "std": _triple("std", overrides.get("std", cfg["std"])),
           "interpolation": str(overrides.get("interpolation", cfg["interpolation"])),
           "crop_pct": float(overrides.get("crop_pct", cfg["crop_pct"]))}
    if pre["interpolation"] not in INTERPOLATIONS:
        raise VisloraError(f"preprocess 'interpolation'={pre['interpolation']!r} is not one of "
                           f"{sorted(INTERPOLATIONS)}")
    if not 0 < pre["crop_pct"] <= 1:
        raise VisloraError(f"preprocess 'crop_pct' must be in (0, 1], got {pre['crop_pct']}")
    return pre


# ---- dataset and loader --------------------------------------------------------------------------
class ImageDataset(torch.utils.data.Dataset):
    """(CHW float32 tensor, label) per image of a Split. Files Pillow cannot verify are dropped at
    construction and listed in `skipped`; a file that still fails to load gives None (logged by
    path, counted in `load_failures` across DataLoader workers)."""

    def __init__(self, split: Split, transform, verify: bool = True):
        self.skipped = find_unreadable([p for p, _ in split.items]) if verify and split.items else []
        bad = set(self.skipped)
        self.items = [(p, y) for p, y in split.items if str(p) not in bad]
        self.classes, self.transform = list(split.classes), transform
        self.targets = [y for _, y in self.items]
        self._failures = multiprocessing.RawValue("i", 0)  # shared memory: workers' failures reach the parent
        if self.skipped:
            logger.warning("skipping %d unreadable image(s) of %d: %s", len(self.skipped), len(split.items),
                           listing(self.skipped, 10))
        if split.items and not self.items:
            raise VisloraError(f"none of the {len(split.items)} images could be read (first: {self.skipped[0]})")

    def __getstate__(self) -> dict:
        """The failure counter travels as shared memory to DataLoader workers, as a plain count
        anywhere else."""
        state = self.__dict__.copy()
        if get_spawning_popen() is None:  # pickle / deepcopy outside process start: shared memory can't go there
            state["_failures"] = self._failures.value
        return state

    def __setstate__(self, state: dict) -> None:
        if isinstance(state["_failures"], int):
            state["_failures"] = multiprocessing.RawValue("i", state["_failures"])
        self.__dict__.update(state)

    @property
    def load_failures(self) -> int:
        """How many loads failed after the scan (every process, every epoch)."""
        return self._failures.value

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        path, label = self.items[index]
        try:
            pixels = image.read_image(path)
        except ValueError as e:
            self._failures.value += 1
            logger.warning("skipping %s", e)
            return None
        if self.transform is None:
            return torch.from_numpy(pixels).permute(2, 0, 1).float().div(255), label
        return self.transform(image=pixels)["image"], label


def collate_skip(batch: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Default collation of (image, label) pairs without the None of unreadable files; an all-None
    batch gives empty tensors (check labels.numel())."""
    batch = [b for b in batch if b is not None]
    if not batch:
        return torch.zeros(0, 3, 0, 0), torch.zeros(0, dtype=torch.long)
    images, labels = torch.utils.data.default_collate(batch)
    return images, labels


def seed_worker(worker_id: int) -> None:
    """DataLoader worker init: random, numpy and the dataset's albumentations pipeline follow
    torch's per-worker seed (albumentations 2 keeps its own generator, which forked workers would
    otherwise share)."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None) if info else None
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(seed)


class Repeated(torch.utils.data.Dataset):
    """`dataset` seen `times` times per epoch (train.min_steps on a small folder); item i is the
    source's item i mod its length, and its augmentation is the source's."""

    def __init__(self, dataset: torch.utils.data.Dataset, times: int):
        self.dataset, self.times = dataset, times

    def __len__(self) -> int:
        return len(self.dataset) * self.times

    def __getitem__(self, index: int):
        return self.dataset[index % len(self.dataset)]

    @property
    def transform(self):
        return getattr(self.dataset, "transform", None)


def optimizer_steps(n: int, batch_size: int, grad_accum: int = 1, world: int = 1) -> int:
    """Optimizer steps in one epoch over n images: each rank's share in batches (the last partial
    one dropped when there is more than one, as build_loader does), grad_accum batches a step."""
    share = math.ceil(n / world)
    return math.ceil((share // batch_size if share > batch_size else 1) / grad_accum)


def passes_for(n: int, t: dict, world: int = 1) -> int:
    """How many times an epoch passes over n train images so that train.epochs epochs make at least
    train.min_steps optimizer steps (at most train.max_steps; 1 when min_steps is None or met)."""
    floor = min(t["min_steps"] or 0, t.get("max_steps") or math.inf)
    passes = 1
    while t["epochs"] * optimizer_steps(n * passes, t["batch_size"], t["grad_accum"], world) < floor:
        passes += 1
    return passes


def build_loader(dataset, batch_size: int, train: bool, workers: int = 2, seed: int = 0, sampler=None,
                 drop_last: bool | None = None, collate_fn=collate_skip, pin_memory: bool | None = None
                 ) -> torch.utils.data.DataLoader:
    """The one DataLoader recipe: seeded shuffling (train, no sampler), seeded workers, pin_memory
    on CUDA.

    drop_last defaults to train when there is more than one batch. Shuffling and the workers'
    augmentation seeds follow `loader.generator` (workers restart each epoch): reseed it, as the
    training loop does per epoch, and an epoch depends only on seed and epoch, which makes resuming
    exact. With a sampler (e.g. DistributedSampler) shuffling is the sampler's: call its set_epoch
    each epoch."""
    n = len(sampler) if sampler is not None else len(dataset)
    if drop_last is None:
        drop_last = train and n > batch_size
    if workers == 0 and hasattr(getattr(dataset, "transform", None), "set_random_seed"):
        dataset.transform.set_random_seed(seed)  # in-process augmentation follows the seed too
    return torch.utils.data.DataLoader(
        dataset, batch_size, shuffle=train and sampler is None, sampler=sampler, num_workers=workers,
        collate_fn=collate_fn, pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        drop_last=drop_last, generator=torch.Generator().manual_seed(seed), worker_init_fn=seed_worker,
        persistent_workers=False)


# ---- synthetic data for tests and smoke runs -----------------------------------------------------
def _draw(cls: int, classes: int, size: int, rng: np.random.Generator) -> Image.Image:
    """Class `cls`'s pattern: its own hue and shape (circle, square, triangle) at a random place and
    scale, on a dark noisy background."""
    im = Image.fromarray(rng.integers(0, 70, (size, size, 3), dtype=np.uint8))
    rgb = np.array(colorsys.hsv_to_rgb(cls / classes, 0.85, 0.95)) * 255 + rng.integers(-20, 21, 3)
    color = tuple(int(c) for c in np.clip(rgb, 0, 255))
    s = int(rng.integers(size * 2 // 5, size * 3 // 5 + 1))
    x, y = (int(v) for v in rng.integers(0, size - s + 1, 2))
    shape = cls % 3
    draw = ImageDraw.Draw(im)
    if shape == 0:
        draw.ellipse([x, y, x + s - 1, y + s - 1], fill=color)
    elif shape == 1:
        draw.rectangle([x, y, x + s - 1, y + s - 1], fill=color)
    else:
        draw.polygon([(x + s // 2, y), (x, y + s - 1), (x + s - 1, y + s - 1)], fill=color)
    return im


def make_synthetic_folder(root: str | Path, classes: int = 3, per_class: int = 20, size: int = 40, seed: int = 0,
                          split: bool = False, oddities: bool = False) -> Path:
    """Write a small learnable folder (class k: its own colour and shape) as ROOT/class_k/*.png, or
    with split ROOT/train/... + ROOT/val/... (every 4th image to val). oddities adds, in train, a
    corrupt .jpg and a grayscale PNG, CMYK JPEG, palette PNG, RGBA PNG, upper-case .JPG and .webp,
    each drawn as its class."""
    if classes < 2 or per_class < 1 or size < 8:
        raise VisloraError(f"make_synthetic_folder needs classes >= 2, per_class >= 1, size >= 8; got "
                         f"{classes}, {per_class}, {size}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    names = [f"class_{c:0{len(str(classes - 1))}d}" for c in range(classes)]
    for c, name in enumerate(names):
        for i in range(per_class):
            part = root / ("val" if i % 4 == 3 else "train") if split else root
            (part / name).mkdir(parents=True, exist_ok=True)
            _draw(c, classes, size, rng).save(part / name / f"{i:04d}.png")
    if oddities:
        train = root / "train" if split else root

        def odd(i: int, stem: str) -> tuple[Image.Image, Path]:
            c = i % classes
            (train / names[c]).mkdir(parents=True, exist_ok=True)
            return _draw(c, classes, size, rng), train / names[c] / stem

        odd(0, "odd_corrupt.jpg")[1].write_bytes(b"these bytes are not an image " * 8)
        im, path = odd(1, "odd_gray.png")
        im.convert("L").save(path)
        im, path = odd(2, "odd_cmyk.jpg")
        im.convert("CMYK").save(path, format="JPEG", quality=95)
        im, path = odd(3, "odd_palette.png")
        im.convert("P", palette=Image.Palette.ADAPTIVE, colors=32).save(path)
        im, path = odd(4, "odd_rgba.png")
        rgba = im.convert("RGBA")
        rgba.putalpha(Image.fromarray(np.where(np.asarray(im).max(2) > 90, 255, 160).astype(np.uint8)))
        rgba.save(path)
        im, path = odd(5, "odd_upper.JPG")
        im.save(path, format="JPEG", quality=95)
        im, path = odd(6, "odd_photo.webp")
        im.save(path, format="WEBP", quality=90)
    return root
