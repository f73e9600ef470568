"""Classification data: image folders, splits, albumentations pipelines, loaders that skip unreadable files."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from PIL import Image, ImageDraw
from sklearn.model_selection import train_test_split

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
INTERPOLATION = {"nearest": 0, "bilinear": 1, "bicubic": 2, "area": 3, "box": 3, "lanczos": 4}


@dataclass
class Split:
    """Image paths with integer labels, and the class names the labels index."""

    items: list[tuple[Path, int]]
    classes: list[str]


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _scan_classes(root: Path, classes: list[str] | None = None) -> Split:
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    dirs = _class_dirs(root)
    names = [d.name for d in dirs]
    if classes is None:
        if len(dirs) < 2:
            raise ValueError(f"{root} holds {len(dirs)} class folder(s): a classifier needs at least 2")
        classes = names
    unknown = [n for n in names if n not in classes]
    if unknown:
        raise ValueError(f"{root}: class folder(s) {unknown} are unknown to the training classes {classes}")
    items = []
    for d in dirs:
        files = _images(d)
        if not files:
            raise ValueError(f"class folder {d} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        items += [(f, classes.index(d.name)) for f in files]
    return Split(items, list(classes))


def scan_folder(root: str | Path, val_fraction: float = 0.2, seed: int = 0) -> tuple[Split, Split]:
    """(train, val) from ROOT/train + ROOT/val, or ROOT/<class> split by a stratified, seeded fraction."""
    root = Path(root)
    if (root / "train").is_dir():
        train = _scan_classes(root / "train")
        val = _scan_classes(root / "val", train.classes) if (root / "val").is_dir() else Split([], train.classes)
        return train, val
    full = _scan_classes(root)
    labels = [y for _, y in full.items]
    if not 0 < val_fraction < 1:
        return full, Split([], full.classes)
    tr, va = train_test_split(full.items, test_size=val_fraction, random_state=seed, stratify=labels)
    return Split(sorted(tr), full.classes), Split(sorted(va), full.classes)


def scan_eval_folder(path: str | Path, classes: list[str]) -> Split:
    """ROOT/val, a ROOT holding val/, or a plain ROOT/<class> folder, labelled with the training classes."""
    path = Path(path)
    if (path / "val").is_dir():
        path = path / "val"
    return _scan_classes(path, classes)


def load_rgb(path: str | Path) -> np.ndarray:
    """HxWx3 uint8 from any mode Pillow reads (grayscale, palette, RGBA, CMYK ...); ValueError names the file."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "P") and ("transparency" in im.info or im.mode != "P"):
                im = im.convert("RGBA")
                background = Image.new("RGBA", im.size, (0, 0, 0, 255))
                im = Image.alpha_composite(background, im)
            return np.asarray(im.convert("RGB"))
    except Exception as e:  # PIL raises many types for broken files
        raise ValueError(f"unreadable image {path}: {e}") from e


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except Exception:
        return False


def preprocess_config(model_or_cfg, overrides: dict | None = None) -> dict:
    """Input size, mean, std, interpolation and crop_pct from a timm model's pretrained_cfg, then overrides."""
    cfg = getattr(model_or_cfg, "pretrained_cfg", model_or_cfg) or {}
    pre = {
        "input_size": tuple(cfg.get("input_size", (3, 224, 224))),
        "mean": tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
        "std": tuple(cfg.get("std", (0.229, 0.224, 0.225))),
        "interpolation": cfg.get("interpolation", "bilinear"),
        "crop_pct": float(cfg.get("crop_pct", 0.875)),
    }
    overrides = overrides or {}
    if overrides.get("img_size"):
        pre["input_size"] = (3, int(overrides["img_size"]), int(overrides["img_size"]))
    for key in ("mean", "std"):
        if overrides.get(key) is not None:
            pre[key] = tuple(overrides[key])
    for key in ("interpolation", "crop_pct"):
        if overrides.get(key) is not None:
            pre[key] = overrides[key]
    pre["input_size"] = list(pre["input_size"])
    pre["mean"], pre["std"] = list(pre["mean"]), list(pre["std"])
    return pre


def build_transform(pre: dict, train: bool, augment: dict | None = None) -> A.Compose:
    """Train: random resized crop, flip, colour jitter. Eval: resize + center crop (timm's crop_pct).
    Both normalize with the preprocess mean/std; the same geometry as vislora.export.eval_transform."""
    if not train:
        from vislora.export import eval_transform

        return A.Compose([*eval_transform(pre).transforms, ToTensorV2()])
    augment = augment or {}
    h, w = pre["input_size"][1:]
    interp = INTERPOLATION.get(pre.get("interpolation", "bilinear"), 1)
    steps = [A.RandomResizedCrop(size=(h, w), scale=tuple(augment.get("scale", (0.08, 1.0))),
                                 ratio=tuple(augment.get("ratio", (3 / 4, 4 / 3))), interpolation=interp)]
    if augment.get("hflip", 0.5):
        steps.append(A.HorizontalFlip(p=augment.get("hflip", 0.5)))
    jitter = augment.get("color_jitter", 0.4)
    if jitter:
        steps.append(A.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter, hue=0.0, p=0.8))
    steps += [A.Normalize(mean=pre["mean"], std=pre["std"], max_pixel_value=255.0), ToTensorV2()]
    return A.Compose(steps)


class ImageDataset(torch.utils.data.Dataset):
    """(image tensor, label) pairs; unreadable files are found at construction (`skipped`) or return None."""

    def __init__(self, split: Split, transform):
        ok = [_readable(p) for p, _ in split.items]
        good = [item for item, keep in zip(split.items, ok, strict=True) if keep]
        self.skipped = [str(p) for (p, _), keep in zip(split.items, ok, strict=True) if not keep]
        for path in self.skipped:
            warnings.warn(f"skipping unreadable image {path}", stacklevel=2)
        self.items, self.classes, self.transform = good, split.classes, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        path, label = self.items[index]
        try:
            image = load_rgb(path)
        except ValueError as e:
            warnings.warn(str(e), stacklevel=2)
            return None
        return self.transform(image=image)["image"], label


def collate_skip(batch):
    """Default collation without the None items of unreadable images."""
    batch = [b for b in batch if b is not None]
    if not batch:
        return torch.zeros(0, 3, 1, 1), torch.zeros(0, dtype=torch.long)
    return torch.utils.data.default_collate(batch)


def build_loader(dataset, batch_size: int, train: bool, workers: int = 2, seed: int = 0, sampler=None):
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size, shuffle=train and sampler is None, sampler=sampler,
                                       num_workers=workers, pin_memory=torch.cuda.is_available(),
                                       collate_fn=collate_skip, drop_last=train, generator=generator)


def _draw(cls: int, size: int, rng: np.random.Generator) -> Image.Image:
    """A class-specific pattern (shape, colour) at a random place and scale, on a noisy background."""
    bg = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    im = Image.fromarray(bg)
    draw = ImageDraw.Draw(im)
    palette = [(230, 40, 40), (40, 200, 60), (50, 80, 240), (230, 200, 30), (200, 50, 200), (30, 200, 200)]
    color = tuple(int(c) for c in np.clip(np.array(palette[cls % 6]) + rng.integers(-25, 25, 3), 0, 255))
    s = int(rng.integers(size // 3, size // 2 + 2))
    x, y = (int(v) for v in rng.integers(0, size - s, 2))
    shape = cls % 3 if cls < 6 else (cls + 1) % 3
    if shape == 0:
        draw.ellipse([x, y, x + s, y + s], fill=color)
    elif shape == 1:
        draw.rectangle([x, y, x + s, y + s], fill=color)
    else:
        draw.polygon([(x + s // 2, y), (x, y + s), (x + s, y + s)], fill=color)
    return im


def make_synthetic_folder(root: str | Path, classes: int = 3, per_class: int = 20, size: int = 40, seed: int = 0,
                          split: bool = False, oddities: bool = False) -> Path:
    """A small learnable classification folder (ROOT/<class>/ or ROOT/{train,val}/<class>/) for smoke tests.

    oddities adds a corrupt .jpg, a grayscale PNG, a CMYK JPEG, a palette PNG, an RGBA PNG, a .JPG and a .webp.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for c in range(classes):
        for i in range(per_class):
            sub = ("val" if i % 4 == 0 else "train") if split else None
            folder = (root / sub if sub else root) / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            _draw(c, size, rng).save(folder / f"{i:04d}.png")
    if oddities:
        folder = (root / "train" if split else root) / "class_0"
        (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg" + bytes(64))
        _draw(0, size, rng).convert("L").save(folder / "gray.png")
        _draw(0, size, rng).convert("CMYK").save(folder / "cmyk.jpg")
        _draw(0, size, rng).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
        _draw(0, size, rng).convert("RGBA").save(folder / "rgba.png")
        _draw(0, size, rng).save(folder / "upper.JPG", format="JPEG")
        _draw(0, size, rng).save(folder / "photo.webp")
    return root
