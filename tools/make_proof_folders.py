"""The defaults' proof set (issue #30): small image folders from sources the defaults were never chosen on.

The defaults (vislora/defaults.py) were chosen on the selection set: the demo digits, Fashion-MNIST and scikit-learn's
digits (tools/bench_accuracy.py --mode defaults). These folders differ from it in size (120-250 images), resolution
(16-64 px), colour, class count (2-5) and kind (photos, textures, drawings), and are made only from real images
that packages ship; none played a part in choosing a default. Each is ROOT/train/<class>/*.png +
ROOT/val/<class>/*.png. Crops of one photo never cross the split: train crops come from the left 60% of the
photo, val crops from the right 40%.

| folder | source | classes | px | colour | train + val per class |
| --- | --- | ---: | ---: | --- | --- |
| scenes | scikit-image's photos: astronaut, coffee, chelsea (cat), rocket, motorcycle | 5 | 48 | RGB | 30 + 20 |
| gray16 | scikit-image's grey photos: camera, moon, coins, page | 4 | 16 | grey | 30 + 20 |
| emoji | Noto Color Emoji (Debian fonts-noto-color-emoji): animals, food, transport | 3 | 32 | RGB | about 36 + 24 |
| tissue_sky | scikit-image's IHC stain, retina, Hubble deep field (textures) | 3 | 32 | RGB | 30 + 20 |
| pair | scikit-learn's two sample photos: china, flower | 2 | 64 | RGB | 30 + 30 |
| mpl_pair | matplotlib's two sample photos: grace_hopper, Minduka_Present_Blue_Pack | 2 | 32 | RGB | 40 + 25 |
| stamps | Tux Paint stamps (tuxpaint-stamps-default): birds, mammals, fruit, flowers | 4 | 48 | RGB | 60% / 40% |
| town | Tux Paint stamps: houses, road signs, money | 3 | 20 | RGB | 60% / 40% |
| clipart | Open Clip Art (openclipart-png): animals, food, people, plants, transport | 5 | 24 | grey | 24 + 16 |
| papers | MyPaint papers (Debian mypaint-data-extras): canvas, cork (crops) | 2 | 40 | grey | 40 + 25 |

The last four are the second proof set (2026-12-03): built before the step floor (train.min_steps) was run on them,
because the first six had been seen when it was chosen.

mpl_pair was added after the first five had been measured, because the collapse rule changed then (one failed
health check no longer counts: two epochs in a row must fail); it played no part in choosing anything.

Set-up (benchmarks only, never dependencies):
    .venv/bin/pip install scikit-image
    sudo apt-get install fonts-noto-color-emoji tuxpaint-stamps-default openclipart-png mypaint-data-extras
Run: .venv/bin/python tools/make_proof_folders.py --out .cache/proof    # or import folders() from here
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_CLASSES = {  # Unicode ranges of the emoji drawings per class
    "animals": [(0x1F400, 0x1F43E)],
    "food": [(0x1F345, 0x1F37F)],
    "transport": [(0x1F680, 0x1F6C5)],
}
STAMPS = Path("/usr/share/tuxpaint/stamps")  # Debian tuxpaint-stamps-default
CLIPART = Path("/usr/share/openclipart/png")  # Debian openclipart-png
PAPERS = Path("/usr/share/mypaint/backgrounds/ramon")  # Debian mypaint-data-extras
VERSION = 1  # bump when a folder's construction changes


def skimage_photo(name: str) -> np.ndarray:
    """One of scikit-image's bundled photos as an HxWx3 or HxW uint8 array (no download)."""
    from skimage import data

    return np.asarray(getattr(data, name)()) if name != "motorcycle" else np.asarray(data.stereo_motorcycle()[0])


def sklearn_photo(name: str) -> np.ndarray:
    from sklearn.datasets import load_sample_image

    return load_sample_image(f"{name}.jpg")


def crops(photo: np.ndarray, n: int, size: int, part: tuple[float, float], window: tuple[int, int],
          rng: np.random.Generator) -> list[Image.Image]:
    """n square crops of `photo` from the column band `part` (fractions of its width), each side drawn from
    `window` pixels (at most the photo's height and the band's width), resized to `size`."""
    height, width = photo.shape[:2]
    left, right = int(part[0] * width), int(part[1] * width)
    out = []
    for _ in range(n):
        side = int(rng.integers(window[0], min(window[1], height, right - left) + 1))
        y, x = int(rng.integers(0, height - side + 1)), int(rng.integers(left, right - side + 1))
        out.append(Image.fromarray(photo[y:y + side, x:x + side]).resize((size, size), Image.BILINEAR))
    return out


def photo_folder(out: Path, photos: dict[str, np.ndarray], size: int, n_train: int, n_val: int,
                 window: tuple[int, int], seed: int) -> None:
    """One class per photo: train crops from its left 60%, val crops from its right 40%."""
    rng = np.random.default_rng(seed)
    for name, photo in photos.items():
        for split, n, part in (("train", n_train, (0.0, 0.6)), ("val", n_val, (0.6, 1.0))):
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i, im in enumerate(crops(photo, n, size, part, window, rng)):
                im.save(folder / f"{name}_{i:03d}.png")


def emoji_drawings(ranges: list[tuple[int, int]], size: int) -> list[Image.Image]:
    """Every emoji of the ranges that the font draws, on white, cropped to its drawing, resized to `size`."""
    font = ImageFont.truetype(str(EMOJI_FONT), 109)  # the font's one bitmap size
    out = []
    for start, stop in ranges:
        for code in range(start, stop + 1):
            canvas = Image.new("RGB", (160, 160), "white")
            ImageDraw.Draw(canvas).text((10, 10), chr(code), font=font, embedded_color=True)
            box = Image.eval(canvas.convert("L"), lambda v: 255 - v).getbbox()
            if box is None or box[2] - box[0] < 40:  # not in the font (nothing, or a narrow fallback glyph)
                continue
            out.append(canvas.crop(box).resize((size, size), Image.BILINEAR))
    return out


def emoji_folder(out: Path, size: int, seed: int) -> None:
    """One class per Unicode range; 60% of each class's drawings train, 40% val (seeded)."""
    if not EMOJI_FONT.is_file():
        raise SystemExit(f"{EMOJI_FONT} is missing: `sudo apt-get install fonts-noto-color-emoji`")
    rng = np.random.default_rng(seed)
    for name, ranges in EMOJI_CLASSES.items():
        drawings = emoji_drawings(ranges, size)
        order = rng.permutation(len(drawings))
        cut = int(round(0.6 * len(drawings)))
        for split, ids in (("train", order[:cut]), ("val", order[cut:])):
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in ids:
                drawings[i].save(folder / f"{name}_{i:03d}.png")


def matplotlib_photo(name: str) -> np.ndarray:
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data(name) as f:
        return np.asarray(Image.open(f).convert("RGB"))


def grey(photo: np.ndarray) -> np.ndarray:
    return photo if photo.ndim == 2 else np.asarray(Image.fromarray(photo).convert("L"))


def picture(path: Path, size: int, mode: str) -> Image.Image:
    """A cut-out picture (RGBA stamp or clip art) on white, cropped to what it draws, padded to a square
    and resized to `size`, in `mode` (RGB or L)."""
    im = Image.open(path).convert("RGBA")
    canvas = Image.new("RGBA", im.size, "white")
    canvas.alpha_composite(im)
    box = im.getchannel("A").getbbox() or (0, 0, *im.size)
    drawn = canvas.convert("RGB").crop(box)
    side = max(drawn.size)
    square = Image.new("RGB", (side, side), "white")
    square.paste(drawn, ((side - drawn.width) // 2, (side - drawn.height) // 2))
    return square.resize((size, size), Image.BILINEAR).convert(mode)


def picture_folder(out: Path, classes: dict[str, list[Path]], size: int, mode: str, cap: int, seed: int) -> None:
    """One class per list of picture files: at most `cap` of them (seeded), 60% train, 40% val."""
    rng = np.random.default_rng(seed)
    for name, paths in classes.items():
        paths = [paths[i] for i in rng.permutation(len(paths))[:cap]]
        cut = int(round(0.6 * len(paths)))
        for split, part in (("train", paths[:cut]), ("val", paths[cut:])):
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i, path in enumerate(part):
                picture(path, size, mode).save(folder / f"{name}_{i:03d}.png")


def package_files(root: Path, package: str, *folders: str) -> list[Path]:
    """The PNG files under root/<folder>/ of a Debian package (sorted), or exit naming the package."""
    files = sorted(f for folder in folders for f in (root / folder).rglob("*.png"))
    if not files:
        raise SystemExit(f"no images under {root}/{folders[0]}: `sudo apt-get install {package}`")
    return files


def stamps(*folders: str) -> list[Path]:
    return package_files(STAMPS, "tuxpaint-stamps-default", *folders)


def clipart(*folders: str) -> list[Path]:
    return package_files(CLIPART, "openclipart-png", *folders)


def paper(name: str) -> np.ndarray:
    path = PAPERS / f"{name}.png"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: `sudo apt-get install mypaint-data-extras`")
    return grey(np.asarray(Image.open(path).convert("RGB")))


BUILDERS: dict[str, Callable[[Path], None]] = {
    "scenes": lambda out: photo_folder(out, {n: skimage_photo(n) for n in ("astronaut", "coffee", "chelsea",
                                                                            "rocket", "motorcycle")},
                                       48, 30, 20, (64, 160), seed=1),
    "gray16": lambda out: photo_folder(out, {n: grey(skimage_photo(n)) for n in ("camera", "moon", "coins", "page")},
                                       16, 30, 20, (24, 64), seed=2),
    "emoji": lambda out: emoji_folder(out, 32, seed=3),
    "tissue_sky": lambda out: photo_folder(out, {"ihc": skimage_photo("immunohistochemistry"),
                                                 "retina": skimage_photo("retina"),
                                                 "hubble": skimage_photo("hubble_deep_field")},
                                           32, 30, 20, (32, 96), seed=4),
    "pair": lambda out: photo_folder(out, {n: sklearn_photo(n) for n in ("china", "flower")}, 64, 30, 30,
                                     (64, 192), seed=5),
    "mpl_pair": lambda out: photo_folder(out, {"hopper": matplotlib_photo("grace_hopper.jpg"),
                                               "pack": matplotlib_photo("Minduka_Present_Blue_Pack.png")},
                                         32, 40, 25, (48, 160), seed=6),
    # the second proof set (issue #30, 2026-12-03): built before the step floor (train.min_steps) was
    # measured anywhere, measured only after it was fixed
    "stamps": lambda out: picture_folder(out, {"birds": stamps("animals/birds"), "mammals": stamps("animals/mammals"),
                                               "fruit": stamps("food/fruit"), "flowers": stamps("plants/flowers")},
                                         48, "RGB", 70, seed=7),
    "town": lambda out: picture_folder(out, {"houses": stamps("town/houses"), "roadsigns": stamps("town/roadsigns"),
                                             "money": stamps("symbols/money")}, 20, "RGB", 40, seed=8),
    "clipart": lambda out: picture_folder(out, {n: clipart(n) for n in ("animals", "food", "people", "plants",
                                                                        "transportation")}, 24, "L", 40, seed=9),
    "papers": lambda out: photo_folder(out, {"canvas": paper("HR_Canvas 01"), "cork": paper("HR_Cork")},
                                       40, 40, 25, (48, 160), seed=10),
}


def folders(root: Path, names: list[str] | None = None) -> dict[str, Path]:
    """Build (once; rebuilt when VERSION changes) and return {name: folder} under root."""
    out = {}
    for name in names or list(BUILDERS):
        folder = root / name
        stamp = folder / "done.json"
        if not (stamp.is_file() and json.loads(stamp.read_text()) == {"version": VERSION}):
            shutil.rmtree(folder, ignore_errors=True)
            BUILDERS[name](folder)
            stamp.write_text(json.dumps({"version": VERSION}))
        out[name] = folder
    return out


def describe(folder: Path) -> str:
    counts = {split: {c.name: len(list(c.glob("*.png"))) for c in sorted((folder / split).iterdir())}
              for split in ("train", "val")}
    return f"{folder.name}: " + "; ".join(f"{s} {sum(v.values())} ({', '.join(f'{k} {n}' for k, n in v.items())})"
                                          for s, v in counts.items())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / ".cache" / "proof"))
    p.add_argument("--only", nargs="+", choices=list(BUILDERS), default=None)
    args = p.parse_args()
    for folder in folders(Path(args.out), args.only).values():
        print(describe(folder))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
