"""Images: read any file as the RGB picture a viewer shows, masks of class indices, and the eval
transform.

This module is the one image reader of vislora (training, evaluation, export verification and
predict all use it) and imports nothing else of vislora, nor albumentations or timm: an exported
model can be served with numpy, Pillow and this file. The eval transform is timm's (resize the
shorter side to size / crop_pct with Pillow, center crop, normalise), written in plain numpy so that
its numbers do not depend on a training stack.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps

from vislora.errors import VisloraError

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
RESAMPLING = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
              "bicubic": Image.Resampling.BICUBIC, "box": Image.Resampling.BOX, "area": Image.Resampling.BOX,
              "hamming": Image.Resampling.HAMMING, "lanczos": Image.Resampling.LANCZOS}
PREPROCESS_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct")
MASK_MODES = ("L", "P", "1", "I", "I;16", "I;16B", "I;16L")  # single-channel modes a mask may be stored in


# ---- reading -------------------------------------------------------------------------------------
def _wide_to_uint8(im: Image.Image) -> np.ndarray:
    """16/32-bit integer or float grayscale (mode I;16, I, F) -> uint8, scaled by its nominal
    range."""
    a = np.asarray(im).astype(np.float64)
    top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
    if a.max() > 65535 or a.min() < 0:  # no nominal range: stretch what is there
        a, top = a - a.min(), max(a.max() - a.min(), 1e-12)
    return np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8)


def _to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode.startswith("I") or im.mode == "F":
        return np.repeat(_wide_to_uint8(im)[:, :, None], 3, axis=2)
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")  # transparent pixels -> black, whatever colour they store
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    return np.array(im.convert("RGB"), dtype=np.uint8)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """HxWx3 uint8 of any image Pillow reads, as a viewer shows it: upright per EXIF orientation,
    16-bit and float scaled to 8 bits, grayscale / palette / CMYK to RGB, transparent pixels on
    black. Raises ValueError naming the file when it is missing, unreadable or a decompression
    bomb."""
    try:
        with Image.open(path) as im:
            im.load()
            return _to_rgb(ImageOps.exif_transpose(im))
    except Exception as e:  # Pillow raises many types (OSError, SyntaxError, DecompressionBombError ...)
        raise VisloraError(f"unreadable image {path}: {type(e).__name__}: {e}") from e


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """HxW uint8 class indices of a single-channel mask file (mode L, 1, P: the palette indices,
    16/32-bit integer up to 255), upright per EXIF orientation like read_image. Raises ValueError
    naming the file when it is missing, unreadable, has colour channels or holds values above
    255."""
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            mode, values = im.mode, np.asarray(im)
    except Exception as e:  # Pillow raises many types (OSError, SyntaxError, DecompressionBombError ...)
        raise VisloraError(f"unreadable mask {path}: {type(e).__name__}: {e}") from e
    if mode not in MASK_MODES:
        raise VisloraError(f"mask {path} is mode {mode}: a mask is one channel of class indices (mode L or P)")
    if values.dtype != np.uint8 and values.size and (values.min() < 0 or values.max() > 255):
        raise VisloraError(f"mask {path} holds values outside 0..255 ({values.min()}..{values.max()})")
    return values.astype(np.uint8)


def mask_palette(n: int = 256) -> np.ndarray:
    """n x 3 uint8 colours of class indices, PASCAL VOC's (0 black, 1 dark red, 2 green ..., 255
    cream for ignore)."""
    colours = np.zeros((n, 3), dtype=np.uint8)
    for k in range(n):
        c, r, g, b = k, 0, 0, 0
        for shift in range(7, -1, -1):
            r, g, b = r | ((c & 1) << shift), g | (((c >> 1) & 1) << shift), b | (((c >> 2) & 1) << shift)
            c >>= 3
        colours[k] = (r, g, b)
    return colours


def write_mask(path: str | os.PathLike, mask: np.ndarray) -> None:
    """A HxW uint8 class-index mask as a palette PNG: viewers show mask_palette() colours, read_mask
    gets the indices back."""
    im = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8))
    im.putpalette(mask_palette().tobytes())
    im.save(path, format="PNG")


def read_each(paths: Sequence[str | os.PathLike]) -> Iterator[tuple[str, np.ndarray | None, str | None]]:
    """(path, HxWx3 uint8, None) for each readable file and (path, None, why not) for the others, in
    order: predict reports a bad file and goes on with the rest."""
    for path in paths:
        if not os.path.isfile(path):
            yield str(path), None, f"no image at {path}"
            continue
        try:
            yield str(path), read_image(path), None
        except ValueError as e:
            yield str(path), None, str(e)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of the picture read_image returns (EXIF rotations swap them), without
    decoding pixels."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except Exception as e:
        raise VisloraError(f"unreadable image {path}: {type(e).__name__}: {e}") from e
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def verifies(path: str | os.PathLike) -> bool:
    """Cheap check that Pillow identifies the file and its structure verifies (no full decode)."""
    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except Exception:
        return False


# ---- the eval transform --------------------------------------------------------------------------
def input_hw(preprocess: dict) -> tuple[int, int]:
    """(H, W) of preprocess['input_size'] given as S, [H, W] or [C, H, W]."""
    size = preprocess["input_size"]
    size = [size] if isinstance(size, (int, float)) else list(size)
    if len(size) not in (1, 2, 3):
        raise VisloraError(f"preprocess 'input_size' must be S, [H, W] or [C, H, W], not {preprocess['input_size']}")
    return int(size[-2] if len(size) > 1 else size[0]), int(size[-1])


def check_preprocess(preprocess: dict, keys: Sequence[str] = PREPROCESS_KEYS) -> None:
    missing = [k for k in keys if k not in preprocess]
    if missing:
        raise VisloraError(f"preprocess dict is missing {missing} (has {sorted(preprocess)})")
    if "interpolation" in keys and preprocess["interpolation"] not in RESAMPLING:
        raise VisloraError(f"preprocess 'interpolation'={preprocess['interpolation']!r} is not one of "
                         f"{sorted(RESAMPLING)}")


def resize(pixels: np.ndarray, height: int, width: int, interpolation: str = "bilinear") -> np.ndarray:
    """An HxW(xC) uint8 array resized to height x width with Pillow (aspect ratio not kept): the
    resize of the eval geometries; interpolation "nearest" for masks of class indices."""
    if pixels.shape[:2] == (height, width):
        return pixels
    return np.asarray(Image.fromarray(pixels).resize((width, height), RESAMPLING[interpolation]))


def resize_center_crop(rgb: np.ndarray, height: int, width: int, crop_pct: float = 1.0,
                       interpolation: str = "bilinear") -> np.ndarray:
    """timm's eval geometry on an HxWxC uint8 array: scale so that the image covers floor(size /
    crop_pct) (the shorter side, keeping the aspect ratio), then cut the center height x width."""
    h, w = rgb.shape[:2]
    scale_h, scale_w = math.floor(height / crop_pct), math.floor(width / crop_pct)
    if scale_h == scale_w:  # torchvision's Resize(int): the shorter side to the size, the longer in proportion
        short, long = (h, w) if h <= w else (w, h)
        new_short, new_long = scale_h, int(scale_h * long / short)
        new_h, new_w = (new_short, new_long) if h <= w else (new_long, new_short)
    else:  # timm's ResizeKeepRatio: the smaller ratio of the two sides
        ratio = min(h / scale_h, w / scale_w)
        new_h, new_w = round(h / ratio), round(w / ratio)
    rgb = resize(rgb, new_h, new_w, interpolation)
    top, left = int(round((new_h - height) / 2.0)), int(round((new_w - width) / 2.0))
    if top < 0 or left < 0:
        raise VisloraError(f"image of {new_h}x{new_w} is smaller than the {height}x{width} crop")
    return rgb[top:top + height, left:left + width]


def normalize(rgb: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """HxWx3 uint8 -> 3xHxW float32, (x / 255 - mean) / std per channel."""
    x = rgb.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def eval_transform(preprocess: dict, whole: bool = False) -> Callable[[np.ndarray], np.ndarray]:
    """HxWx3 uint8 -> 3xHxW float32 model input: timm's eval transform for preprocess's input_size,
    crop_pct, interpolation, mean and std (the same geometry training validates with and exported
    models are fed). whole: the whole image resized to the input size, aspect not kept
    (segmentation's geometry; no crop)."""
    check_preprocess(preprocess, ("input_size", "mean", "std", "interpolation") if whole else PREPROCESS_KEYS)
    h, w = input_hw(preprocess)
    crop_pct = float(preprocess.get("crop_pct") or 1.0)
    mean, std, interpolation = tuple(preprocess["mean"]), tuple(preprocess["std"]), preprocess["interpolation"]

    def transform(rgb: np.ndarray) -> np.ndarray:
        shaped = resize(rgb, h, w, interpolation) if whole else resize_center_crop(rgb, h, w, crop_pct, interpolation)
        return normalize(shaped, mean, std)

    return transform


def load_input(path: str | os.PathLike, preprocess: dict) -> np.ndarray:
    """One image file as the model's 3xHxW float32 input (read_image, then eval_transform)."""
    return eval_transform(preprocess)(read_image(path))
