"""Pretrain the small ViT backbone that vislora ships (data/vit_fmnist.safetensors) from scratch on Fashion-MNIST.

Source data: the Debian package dataset-fashion-mnist (`sudo apt-get install dataset-fashion-mnist`), which puts the
four idx .gz files in /usr/share/datasets/fashion-mnist; --data points elsewhere. Writes fp16 safetensors weights that
load strictly into timm.create_model(ARCH, pretrained=False, num_classes=10, **kwargs), and a JSON card beside them.

    .venv/bin/python tools/pretrain.py            # the shipped backbone (see the card for the exact command)
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import shutil
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from torchvision.datasets import FashionMNIST
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
ARCH = "vit_tiny_patch16_224"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
MEAN = STD = (0.5, 0.5, 0.5)  # the pretraining normalisation: x = (pixel / 255 - 0.5) / 0.5, gray copied to R, G, B


def find_idx_dir(data: str | Path | None = None) -> Path:
    """The folder holding the Fashion-MNIST idx files (plain or .gz): --data, else the Debian package's folder."""
    candidates = [Path(data)] if data else [DEBIAN_DIR]
    for folder in candidates:
        if all((folder / n).exists() or (folder / f"{n}.gz").exists() for n in IDX_FILES):
            return folder
    where = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"Fashion-MNIST idx files ({', '.join(n + '[.gz]' for n in IDX_FILES)}) not found in {where}. "
        "Install them with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; files land in "
        f"{DEBIAN_DIR}), or pass --data DIR holding the four files from github.com/zalandoresearch/fashion-mnist.")


def stage_raw(idx_dir: Path, cache: Path) -> Path:
    """Unpack the idx files into cache/FashionMNIST/raw/, the layout torchvision reads with download=False."""
    raw = cache / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in IDX_FILES:
        dst = raw / name
        if dst.exists():
            continue
        src = idx_dir / name
        tmp = dst.with_suffix(".part")
        if src.exists():
            shutil.copyfile(src, tmp)
        else:
            with gzip.open(idx_dir / f"{name}.gz", "rb") as f_in, open(tmp, "wb") as f_out:
                shutil.copyfileobj(f_in, f_out)
        tmp.replace(dst)
    return cache


def load_split(cache: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """One split as in-memory tensors: uint8 images [N, 1, 28, 28], int64 labels [N], and the class names."""
    ds = FashionMNIST(str(cache), train=train, download=False)
    return ds.data.unsqueeze(1).contiguous(), ds.targets.long(), list(ds.classes)


def to_input(x: torch.Tensor) -> torch.Tensor:
    """uint8 gray [B, 1, H, W] -> normalised float RGB [B, 3, H, W] (gray replicated; vislora always feeds RGB)."""
    x = (x.float() / 255 - MEAN[0]) / STD[0]
    return x.expand(-1, 3, -1, -1)


def augment(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Per-sample random crop (zero padding `pad`) and horizontal flip of a uint8 batch [B, 1, H, W]."""
    b, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    rows = (oy[:, None] + torch.arange(h))[:, :, None]  # [B, H, 1]
    cols = (ox[:, None] + torch.arange(w))[:, None, :]  # [B, 1, W]
    flip = torch.rand(b, generator=gen) < 0.5
    cols = torch.where(flip[:, None, None], cols.flip(-1), cols)
    return xp[torch.arange(b)[:, None, None], 0, rows, cols].unsqueeze(1)


def build_model(kwargs: dict, num_classes: int = 10) -> nn.Module:
    """The backbone: timm's ViT-Tiny definition, shrunk by kwargs, untrained."""
    return timm.create_model(ARCH, pretrained=False, num_classes=num_classes, **kwargs)


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warm-up over `warmup` steps, then cosine decay to zero at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    """Top-1 accuracy (%) of `model` on uint8 images x and labels y."""
    model.eval()
    correct = sum((model(to_input(x[i:i + batch])).argmax(1) == y[i:i + batch]).sum().item()
                  for i in range(0, len(x), batch))
    return 100.0 * correct / len(x)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int, lr: float, wd: float,
          warmup_epochs: float, pad: int, smoothing: float, seed: int,
          x_val: torch.Tensor, y_val: torch.Tensor) -> list[float]:
    """AdamW with warm-up + cosine over `epochs` on in-memory uint8 tensors; returns val top-1 after each epoch."""
    gen = torch.Generator().manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "pos_embed" not in n and "cls_token" not in n]
    no_decay = [p for n, p in model.named_parameters() if not any(p is q for q in decay)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    steps_per_epoch = len(x) // batch
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, total, max(1, int(warmup_epochs * steps_per_epoch))))
    bar = tqdm(total=total, desc="pretrain", unit="step", dynamic_ncols=True, mininterval=5)
    history = []
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        for i in range(steps_per_epoch):
            idx = order[i * batch:(i + 1) * batch]
            logits = model(to_input(augment(x[idx], pad, gen)))
            loss = F.cross_entropy(logits, y[idx], label_smoothing=smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", lr=f"{sched.get_last_lr()[0]:.1e}",
                            refresh=False)
        history.append(evaluate(model, x_val, y_val))
        bar.write(f"epoch {epoch + 1}/{epochs}: val top-1 {history[-1]:.2f}%")
    bar.close()
    return history


def save_backbone(model: nn.Module, path: Path) -> str:
    """Write the state dict as fp16 safetensors; returns the file's sha256."""
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"format": "pt", "arch": ARCH})
    path.chmod(0o644)  # safetensors creates the file owner-only
    return hashlib.sha256(path.read_bytes()).hexdigest()


def command_line(args: argparse.Namespace) -> str:
    """The exact command that reproduces this run, every option spelled out (paths relative to the repo)."""
    out = Path(args.out).resolve()
    out = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
    opts = [f"--out {out}", f"--epochs {args.epochs}", f"--seed {args.seed}", f"--threads {args.threads}",
            f"--embed-dim {args.embed_dim}", f"--depth {args.depth}", f"--heads {args.heads}",
            f"--mlp-ratio {args.mlp_ratio}", f"--pool {args.pool}", f"--img-size {args.img_size}",
            f"--patch-size {args.patch_size}",
            f"--batch {args.batch}", f"--lr {args.lr}", f"--wd {args.wd}", f"--warmup {args.warmup}",
            f"--pad {args.pad}", f"--smoothing {args.smoothing}"]
    if args.limit:
        opts.append(f"--limit {args.limit}")
    return ".venv/bin/python tools/pretrain.py " + " ".join(opts)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help=f"folder with the idx files (default {DEBIAN_DIR})")
    p.add_argument("--cache", default=str(ROOT / ".cache"), help="where the unpacked idx files go")
    p.add_argument("--out", default=str(ROOT / "data" / "vit_fmnist.safetensors"))
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 1 is fastest on a shared 2-core machine (results can differ across counts)")
    p.add_argument("--embed-dim", type=int, default=64)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--mlp-ratio", type=float, default=4.0)
    p.add_argument("--pool", default="avg", choices=["avg", "token"],
                   help="avg: mean of patch tokens, no class token (trains faster from scratch); token: class token")
    p.add_argument("--img-size", type=int, default=28)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--wd", type=float, default=0.05)
    p.add_argument("--warmup", type=float, default=0.5, help="warm-up length in epochs")
    p.add_argument("--pad", type=int, default=0,
                   help="random-crop padding in pixels; 0 = flip only (crops slow a short run down)")
    p.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    p.add_argument("--limit", type=int, default=0, help="train on the first N shuffled images only (for trials)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cache = stage_raw(find_idx_dir(args.data), Path(args.cache))
    x_train, y_train, classes = load_split(cache, train=True)
    x_test, y_test, _ = load_split(cache, train=False)
    if args.img_size != x_train.shape[-1]:
        sys.exit(f"--img-size {args.img_size}: Fashion-MNIST images are {x_train.shape[-1]}px; no resizing here")
    if args.limit:
        keep = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(args.seed))[:args.limit]
        x_train, y_train = x_train[keep], y_train[keep]
    kwargs = {"img_size": args.img_size, "patch_size": args.patch_size, "in_chans": 3, "embed_dim": args.embed_dim,
              "depth": args.depth, "num_heads": args.heads, "mlp_ratio": args.mlp_ratio,
              "global_pool": args.pool, "class_token": args.pool == "token"}
    model = build_model(kwargs, num_classes=len(classes))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{ARCH} {kwargs}: {n_params:,} parameters; {len(x_train)} train / {len(x_test)} test images", flush=True)
    start = time.time()
    history = train(model, x_train, y_train, args.epochs, args.batch, args.lr, args.wd, args.warmup, args.pad,
                    args.smoothing, args.seed, x_test, y_test)
    top1 = history[-1]
    wall = time.time() - start
    out = Path(args.out)
    sha = save_backbone(model, out)
    card = {
        "file": out.name,
        "architecture": ARCH,
        "kwargs": kwargs,
        "num_classes": len(classes),
        "parameters": n_params,
        "dtype": "float16",
        "source_task": "Fashion-MNIST (Zalando, MIT licence): 60,000 train images, evaluated on the 10,000 test images",
        "classes": classes,
        "epochs": args.epochs,
        "seed": args.seed,
        "threads": args.threads,
        "train_images": len(x_train),
        "source_val_top1": round(top1, 2),
        "source_val_split": "Fashion-MNIST test (10,000 images)",
        "val_top1_per_epoch": [round(h, 2) for h in history],
        "wall_time_s": round(wall, 1),
        "input_size": [3, args.img_size, args.img_size],
        "mean": list(MEAN),
        "std": list(STD),
        "preprocessing": "gray 28x28 replicated to RGB, scaled to [0, 1], normalised with mean=std=(0.5, 0.5, 0.5)",
        "recipe": {"optimizer": "AdamW", "lr": args.lr, "weight_decay": args.wd, "batch": args.batch,
                   "schedule": f"linear warm-up {args.warmup} epoch, cosine to 0", "label_smoothing": args.smoothing,
                   "augmentation": f"random crop (zero pad {args.pad}), horizontal flip" if args.pad
                   else "horizontal flip"},
        "sha256": sha,
        "command": command_line(args),
        "versions": {"torch": torch.__version__, "timm": timm.__version__},
    }
    out.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    print(f"test top-1 {top1:.2f}%  wall {wall:.0f}s  -> {out} ({out.stat().st_size / 1e6:.2f} MB), sha256 {sha}")
    return card


if __name__ == "__main__":
    main()
