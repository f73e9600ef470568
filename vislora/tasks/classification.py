"""Classification: a timm classifier on an image folder, cross-entropy, top-k accuracy and per-class
metrics.

The task interface (see vislora/tasks/__init__.py), with the optional health, example_inputs,
confusion, recipe_classes and KSHOT; its training batch, (images, class indices), is the default
synthetic_batch.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support
from timm.loss import SoftTargetCrossEntropy
from tqdm import tqdm

from vislora import data as vdata
from vislora import image, runpaths
from vislora.augment import EvalTransform, train_pipeline
from vislora.errors import VisloraError
from vislora.files import read_json
from vislora.inject import inject, set_trainable
from vislora.targets import classifier_names
from vislora.tasks.backbone import create_timm, load_weights
from vislora.tasks.common import (
    Setup,
    batch_predictor,
    card_classes,
    card_pretrained_cfg,
    denormalize,
    lora_config,
    plot_confusion,
    plot_image_grid,
    seeded,
    write_confusion,
)

NAME = "classification"
PREDICTIONS = "predictions.csv"  # predict's rows, in its out_dir
SCORE = "val_top1"  # the validation metric that picks the best epoch (higher is better)
EXPORT = {"torchscript": "trace", "onnx": None, "input": "batch", "served": None}  # None: supported
KSHOT = True  # one class per image, in class folders: vislora fewshot samples k images per class


# ---- model and data ------------------------------------------------------------------------------
def build_model(recipe: dict, classes: Sequence[str]) -> nn.Module:
    """The recipe's timm classifier with one output per class and its local checkpoint weights, if
    any (seeded: the same base every time the run is rebuilt)."""
    m = recipe["model"]

    def build() -> nn.Module:
        model = create_timm(m, num_classes=len(classes))
        heads = classifier_names(model)
        loaded = set()
        if m["checkpoint"]:
            fits = checkpoint_head_fits(m["checkpoint"], classes)
            loaded = load_weights(model, m["checkpoint"], skip=[] if fits else heads)
            model.pretrained_cfg = {**(model.pretrained_cfg or {}), **card_pretrained_cfg(m["checkpoint"])}
        pretrained_head = m["pretrained"] and (model.pretrained_cfg or {}).get("num_classes") == len(classes)
        new_heads = [h for h in heads if not pretrained_head and f"{h}.weight" not in loaded]
        init_heads(model, new_heads, m["head_init"])
        return model

    return seeded(recipe, build)


def checkpoint_head_fits(path: str | Path, classes: Sequence[str]) -> bool:
    """A checkpoint's classifier is kept only when its card names the folder's classes, in order: a
    head of the right size trained for other classes (the shipped Fashion-MNIST ViT on digits) is as
    wrong as a random one, and confidently so (issue #13)."""
    return card_classes(path) == list(classes)


def init_heads(model: nn.Module, names: list[str], how: str) -> None:
    """Zero a new classifier (`how` "zero"): its logits start equal, the loss at ln C, and the first
    gradients reach the head alone, so they cannot wreck the features (LoRA on MobileNetV2 collapsed
    to chance with timm's random head, issue #13); "timm" keeps timm's init."""
    if how not in ("zero", "timm"):
        raise VisloraError(f"model.head_init must be zero or timm, not {how!r}")
    if how == "timm":
        return
    with torch.no_grad():
        for name in names:
            for p in model.get_submodule(name).parameters():
                p.zero_()


def adapt(model: nn.Module, recipe: dict) -> nn.Module:
    """LoRA (recipe.adapter is a mapping), linear probe (only the classifier trains) or full
    fine-tuning."""
    adapter = recipe["adapter"]
    if isinstance(adapter, dict):
        return inject(model, lora_config(recipe))
    if adapter == "linear_probe":
        heads = classifier_names(model)
        if not heads:
            raise VisloraError(f"adapter: linear_probe needs a classifier, and {type(model).__name__} has none")
        set_trainable(model, heads)
        model.vislora_train = list(heads)
    return model


def build(recipe: dict) -> Setup:
    """Scan the folder, build the base classifier, read its preprocessing, wrap both splits as
    datasets."""
    d = recipe["data"]
    train_split, val_split = vdata.scan_folder(d["path"], d["val_fraction"], recipe["train"]["seed"])
    model = build_model(recipe, train_split.classes)
    overrides = {k: d[k] for k in vdata.OVERRIDE_KEYS if d[k] is not None}
    pre = {**vdata.preprocess_config(model, overrides), "class_names": train_split.classes, "task": NAME}
    train_set = vdata.ImageDataset(train_split, train_pipeline(pre, d["augment"], "image"))
    val_set = vdata.ImageDataset(val_split, EvalTransform(pre))
    return Setup(model, train_set, val_set, vdata.collate_skip, train_split.classes, pre,
                 head_notes(recipe["model"], train_split.classes), split_record(recipe, train_split, val_split))


def recipe_classes(recipe: dict) -> list[str] | None:
    """The class folders of the recipe's data.path (ROOT/train/<class> or ROOT/<class>), None
    without any: what footprint builds a recipe's classifier for, without scanning the images."""
    root = Path(recipe["data"]["path"]) if recipe["data"]["path"] else None
    split = root / "train" if root is not None and (root / "train").is_dir() else root
    if split is None or not split.is_dir():
        return None
    return sorted(d.name for d in split.iterdir() if d.is_dir() and not d.name.startswith(".")) or None


def split_record(recipe: dict, train: vdata.Split, val: vdata.Split) -> dict:
    """The run's split.json: which images were train and which val (by path, label index into
    `classes`), so an exported file of the run is scored on the run's own val split, whatever the
    folder holds later."""
    d = recipe["data"]
    root = Path(d["path"])
    layout = (f"{root}/train and its val folder" if vdata.is_split_layout(root) and vdata.val_dir(root) else
              f"{root} split by data.val_fraction={d['val_fraction']} (stratified, seed {recipe['train']['seed']})")
    return {"layout": layout, "classes": list(train.classes), "train": [[str(p), y] for p, y in train.items],
            "val": [[str(p), y] for p, y in val.items]}


def head_notes(model_cfg: dict, classes: Sequence[str]) -> list[str]:
    """One line when the checkpoint's classifier is replaced, saying why."""
    path = model_cfg["checkpoint"]
    named = card_classes(path) if path else None
    if not path or named == list(classes):  # checkpoint_head_fits, with the card read once
        return []
    why = f"its card names {len(named)} other classes" if named else "its card names no classes"
    return [f"{Path(path).name}'s classifier is not used ({why}): a new head for the folder's {len(classes)} "
            f"classes starts from model.head_init={model_cfg['head_init']}"]


# ---- training ------------------------------------------------------------------------------------
def loss(model: nn.Module, batch, device: torch.device, recipe: dict) -> tuple[torch.Tensor, dict, int]:
    """Cross-entropy (with the recipe's label smoothing), or timm's SoftTargetCrossEntropy on the
    soft targets of Mixup / CutMix (vislora.knobs); logs accuracy and the logits' spread over the
    batch."""
    images, labels = (t.to(device, non_blocking=True) for t in batch)
    logits = model(images)
    soft = labels.is_floating_point()
    value = SoftTargetCrossEntropy()(logits, labels) if soft else \
        F.cross_entropy(logits, labels, label_smoothing=recipe["train"]["label_smoothing"])
    with torch.no_grad():
        acc = (logits.argmax(1) == (labels.argmax(1) if soft else labels)).float().mean().item()
        spread = logits.float().std(0).mean().item() if len(labels) > 1 else math.nan
    return value, {"acc": acc, "logit_std": spread}, len(labels)


@torch.no_grad()
def validate(model: nn.Module, loader, device: torch.device, amp_dtype, world: int) -> dict:
    """Loss, top-1 and top-5 over the validation loader (each rank's shard, sums reduced across
    ranks), and how many distinct classes were predicted."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
    predicted = torch.zeros(0, dtype=torch.bool, device=device)
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images).float()
        if not len(predicted):
            predicted = torch.zeros(logits.shape[1], dtype=torch.bool, device=device)
        predicted[logits.argmax(1)] = True
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == labels[:, None]
        sums += torch.tensor([F.cross_entropy(logits, labels, reduction="sum").item(), hit[:, 0].sum().item(),
                              hit.any(1).sum().item(), len(labels)], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(sums)
    n = max(sums[3].item(), 1)
    return {"val_loss": sums[0].item() / n, "val_top1": sums[1].item() / n, "val_top5": sums[2].item() / n,
            "val_predicted_classes": int(predicted.sum().item())}


@torch.no_grad()
def confusion(model: nn.Module, loader, device: torch.device, amp_dtype, world: int) -> list[list[int]]:
    """The val confusion matrix (true x predicted counts, every rank's shard): the image the loggers
    end with."""
    model.eval()
    counts = None
    for images, labels in loader:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images.to(device)).float()
        c = logits.shape[1]
        pairs = labels.to(device) * c + logits.argmax(1)
        counts = torch.bincount(pairs, minlength=c * c) + (0 if counts is None else counts)
    if world > 1:
        dist.all_reduce(counts)
    return counts.reshape(c, c).tolist()


def health(row: dict, num_classes: int) -> str | None:
    """A warning when training has collapsed: the train loss sits at chance (ln C) while the logits
    no longer vary over the batch (the features went constant), or every val image gets the same
    class at chance accuracy."""
    chance_loss, chance_top1 = math.log(num_classes), 1.0 / num_classes
    flat = abs(row["train_loss"] - chance_loss) < 0.05 * chance_loss and row.get("train_logit_std", 1.0) < 1e-2
    one_class = row.get("val_predicted_classes", num_classes) <= 1 and row.get("val_top1", 1.0) <= chance_top1 + 0.05
    if not (flat or one_class):
        return None
    what = (f"train loss {row['train_loss']:.3f} is at chance (ln {num_classes} = {chance_loss:.3f}) and the logits "
            f"no longer vary across images" if flat else
            f"every val image gets the same class (val top-1 {row['val_top1']:.3f}, chance {chance_top1:.3f})")
    return (f"training looks collapsed at epoch {row['epoch']}: {what}. Likely causes: a learning rate too high "
            "for this model (lower train.lr), a head or adapters that wiped out the pretrained features, or "
            "augmentation too strong for the images (data.augment.scale closer to [0.5, 1], hflip 0 for text)")


def preview(batch, preprocess: dict, classes: list[str]) -> list[tuple[np.ndarray, str]]:
    """A training batch as the model sees it (augmented, resized; normalisation undone), each image
    captioned with its class: train_batch.png."""
    images, labels = batch
    return [(denormalize(x, preprocess), classes[y]) for x, y in zip(images.numpy(), labels.tolist(), strict=True)]


# ---- running a trained model ---------------------------------------------------------------------
def predictor(model: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    """NCHW float32 batch -> logits (vislora.tasks.common.batch_predictor)."""
    return batch_predictor(model)


def example_inputs(recipe: dict, preprocess: dict, n: int = 8) -> torch.Tensor | None:
    """Up to n real images of the run's val split through the eval transform (None if none can be
    read)."""
    try:
        val, _ = eval_split(None, recipe, preprocess["class_names"])
    except (FileNotFoundError, ValueError):
        return None
    dataset = vdata.ImageDataset(vdata.Split(val.items[:n], val.classes), EvalTransform(preprocess))
    images = [item[0] for item in (dataset[i] for i in range(len(dataset))) if item is not None]
    return torch.stack(images) if images else None


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def predict(predictor: Callable[[np.ndarray], np.ndarray], preprocess: dict,
            image_paths: Sequence[str | os.PathLike], topk: int = 5, out_dir: str | os.PathLike | None = None,
            batch_size: int = 16) -> list[dict]:
    """Top-k (class_name, probability) per image, in input order; an unreadable image gets {"path",
    "error"}. The same rows go to OUT_DIR/predictions.csv (out_dir None: nothing is written)."""
    results: list[dict] = [{"path": str(p)} for p in image_paths]
    ready: list[tuple[int, np.ndarray]] = []
    transform = image.eval_transform(preprocess)
    for i, (_, rgb, error) in enumerate(image.read_each(image_paths)):
        if error:
            results[i]["error"] = error
        else:
            ready.append((i, transform(rgb)))
    names = preprocess.get("class_names")
    for start in range(0, len(ready), batch_size):
        chunk = ready[start:start + batch_size]
        probs = _softmax(np.asarray(predictor(np.stack([x for _, x in chunk]))))
        if names is not None and len(names) != probs.shape[1]:
            raise VisloraError(f"preprocess has {len(names)} class_names but the model outputs {probs.shape[1]} "
                             "classes")
        for (i, _), row in zip(chunk, probs, strict=True):
            order = np.argsort(-row, kind="stable")[:topk]
            results[i]["top"] = [(names[k] if names is not None else str(k), float(row[k])) for k in order]
    if out_dir is not None:
        write_predictions(results, Path(out_dir) / PREDICTIONS, topk)
    return results


def write_predictions(results: list[dict], path: Path, topk: int) -> Path:
    """predict's rows as CSV: path, predicted, p, the top-k as 'class p; ...', and the error of an
    unreadable file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    k = max((len(r["top"]) for r in results if "top" in r), default=topk)  # at most the number of classes
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "predicted", "p", f"top{k}", "error"])
        for r in results:
            top = r.get("top") or [("", math.nan)]
            writer.writerow([r["path"], top[0][0], f"{top[0][1]:.4f}" if r.get("top") else "",
                             "; ".join(f"{name} {p:.4f}" for name, p in r.get("top", [])), r.get("error", "")])
    return path


def format_prediction(result: dict) -> str:
    return f"{result['path']}: " + ", ".join(f"{name} {p:.3f}" for name, p in result["top"])


# ---- evaluation ----------------------------------------------------------------------------------
def classification_report(logits: np.ndarray, labels: np.ndarray, classes: list[str], topk: int = 5) -> dict:
    """top1/top-k fractions, per-class precision/recall/F1 (scikit-learn), macro-F1 and the
    confusion matrix."""
    pred = logits.argmax(1)
    k = min(topk, logits.shape[1])
    hits = (np.argsort(-logits, axis=1, kind="stable")[:, :k] == labels[:, None]).any(1)
    ids = list(range(len(classes)))
    p, r, f, s = precision_recall_fscore_support(labels, pred, labels=ids, zero_division=0)
    return {
        "top1": float((pred == labels).mean()) if len(labels) else 0.0,
        f"top{topk}": float(hits.mean()) if len(labels) else 0.0,
        "macro_f1": float(f1_score(labels, pred, labels=ids, average="macro", zero_division=0)),
        "per_class": {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                      for i, c in enumerate(classes)},
        "confusion_matrix": confusion_matrix(labels, pred, labels=ids).tolist(),
        "num_images": int(len(labels)),
    }


def eval_split(data: str | Path | None, recipe: dict | None, classes: list[str], run_dir: Path | None = None
               ) -> tuple[vdata.Split, str]:
    """The images to evaluate and what they are: `--data` (ROOT/val, a ROOT holding val/, or
    ROOT/<class>), else the run's val split (from its split.json, else recomputed from the recipe as
    training split it)."""
    if data is not None:
        return data_split(Path(data), classes)
    if recipe is None:
        raise VisloraError("this exported file is not inside a run's export/ folder and its export.json names no run, "
                         "so there is no val split to score: pass --data DIR")
    recorded = Path(run_dir) / runpaths.SPLIT if run_dir else None
    if recorded is not None and recorded.is_file():
        split = read_json(recorded, "run's split")
        if split["classes"] != classes:
            raise VisloraError(f"{recorded} names other classes than the model: {split['classes']} vs {classes}")
        val = vdata.Split([(Path(p), y) for p, y in split["val"]], classes)
        what = f"the run's val split ({len(val.items)} images of {split['layout']}; {recorded})"
    else:
        d = recipe["data"]
        _, val = vdata.scan_folder(d["path"], d["val_fraction"], recipe["train"]["seed"])
        if val.classes != classes:
            raise VisloraError(f"the classes under {d['path']} differ from the run's: {val.classes} vs {classes}")
        what = f"the run's val split ({len(val.items)} images of {d['path']}, recomputed from the recipe)"
    if not val.items:
        raise VisloraError(f"the run has no val split (data.val_fraction={recipe['data']['val_fraction']}): pass "
                         "--data DIR")
    return val, what


def data_split(path: Path, classes: list[str]) -> tuple[vdata.Split, str]:
    """--data's images, and what they are: a flat ROOT/<class> folder is all of it, train images
    included."""
    split = vdata.scan_eval_folder(path, classes)
    if vdata.val_dir(path) is not None or path.name.lower() in vdata.SPLIT_DIRS:
        return split, f"{len(split.items)} images of {vdata.val_dir(path) or path}"
    return split, (f"all {len(split.items)} images of {path}: a ROOT/<class> folder is scored whole, so if the run "
                   "trained on it its train images count too (without --data, the run's own val split is scored)")


class Indexed(torch.utils.data.Dataset):
    """A dataset whose items carry their index (None stays None): eval rows map back to their files
    even when a file fails to load and its sample is dropped."""

    def __init__(self, dataset: vdata.ImageDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        return None if item is None else (*item, index)


def collate_indexed(batch: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch = [b for b in batch if b is not None]
    if not batch:
        return torch.zeros(0, 3, 0, 0), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.utils.data.default_collate(batch)


def run_eval(predictor: Callable[[np.ndarray], np.ndarray], dataset: vdata.ImageDataset, batch_size: int,
             workers: int, num_classes: int) -> tuple[np.ndarray, np.ndarray, list[Path]]:
    """(logits, labels, paths) of every image that loaded, in the dataset's order."""
    loader = vdata.build_loader(Indexed(dataset), batch_size, False, workers, collate_fn=collate_indexed)
    logits, labels, indices = [], [], []
    for images, y, i in tqdm(loader, desc="eval", leave=False):
        if len(y):
            logits.append(predictor(images.numpy().astype(np.float32)))
            labels.append(y.numpy())
            indices += i.tolist()
    if not logits:
        return np.zeros((0, num_classes)), np.zeros(0, dtype=int), []
    return np.concatenate(logits), np.concatenate(labels), [dataset.items[i][0] for i in indices]


def evaluate(predictor: Callable[[np.ndarray], np.ndarray], preprocess: dict, recipe: dict | None,
             data: str | Path | None, out: Path, batch_size: int, workers: int = 2, run_dir: Path | None = None
             ) -> dict:
    """Top-1/top-k, per-class metrics and the confusion matrix of `predictor` on --data or the run's
    val split (run_dir/split.json). Beside OUT: the confusion matrix (CSV, PNG of counts and of row
    fractions), per-class recall (PNG), every image's prediction (OUT_predictions.csv) and the worst
    mistakes (OUT_errors.png)."""
    classes = preprocess["class_names"]
    topk = recipe["eval"]["topk"] if recipe else 5
    split, scored = eval_split(data, recipe, classes, run_dir)
    dataset = vdata.ImageDataset(split, EvalTransform(preprocess))
    logits, labels, paths = run_eval(predictor, dataset, batch_size, workers, len(classes))
    report = classification_report(logits, labels, classes, topk)
    report["skipped"], report["scored"] = [str(p) for p in dataset.skipped], scored
    write_confusion(report, out, classes)
    plot_confusion(report["confusion_matrix"], classes, beside(out, "_confusion_norm.png"), normalize=True)
    plot_recall(report, beside(out, "_recall.png"))
    probs = _softmax(logits) if len(logits) else logits
    write_eval_predictions(paths, labels, probs, classes, min(topk, len(classes)), beside(out, "_predictions.csv"))
    report["errors_shown"] = plot_errors(paths, labels, probs, classes, beside(out, "_errors.png"))
    return report


def beside(out: Path, suffix: str) -> Path:
    """OUT_<suffix>: a file that goes with the report OUT (report.json -> report_errors.png)."""
    return out.with_name(out.stem + suffix)


def write_eval_predictions(paths: list[Path], labels: np.ndarray, probs: np.ndarray, classes: list[str], k: int,
                           path: Path) -> Path:
    """One row per evaluated image: path, true, predicted, p (of the predicted class), the top-k
    'class p; ...'."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "true", "predicted", "p", f"top{k}"])
        for file, y, row in zip(paths, labels, probs, strict=True):
            order = np.argsort(-row, kind="stable")[:k]
            writer.writerow([str(file), classes[y], classes[order[0]], f"{row[order[0]]:.4f}",
                             "; ".join(f"{classes[j]} {row[j]:.4f}" for j in order)])
    return path


def plot_errors(paths: list[Path], labels: np.ndarray, probs: np.ndarray, classes: list[str], path: Path,
                shown: int = 16) -> int:
    """A grid of the most confident mistakes (true -> predicted, p), as the images are on disk;
    returns how many."""
    pred = probs.argmax(1) if len(probs) else np.zeros(0, dtype=int)
    wrong = [i for i in np.argsort(-probs.max(1), kind="stable") if pred[i] != labels[i]] if len(probs) else []
    tiles = []
    for i in wrong[:shown]:
        with contextlib.suppress(ValueError):  # a file that changed since it was scored: left out
            tiles.append((image.read_image(paths[i]),
                          f"{classes[labels[i]]} → {classes[pred[i]]} {probs[i, pred[i]]:.2f}"))
    plot_image_grid(tiles, path, f"worst mistakes: {len(tiles)} of {len(wrong)} misclassified, of {len(labels)} "
                    "images (true → predicted, p)", empty=f"no misclassified image among {len(labels)}")
    return len(tiles)


def plot_recall(report: dict, path: Path, most: int = 60) -> Path:
    """Per-class recall as horizontal bars, worst first (at most `most` classes), each with its
    image count."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = sorted(report["per_class"].items(), key=lambda kv: (kv[1]["recall"], kv[0]))[:most]
    fig = Figure(figsize=(7, 1 + 0.28 * len(rows)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    names = [name for name, _ in rows][::-1]
    ax.barh(names, [m["recall"] for _, m in rows][::-1], color="tab:blue")
    for y, (_, m) in enumerate(rows[::-1]):
        ax.text(min(m["recall"], 0.98), y, f" {m['recall']:.2f} (n={m['support']})", va="center",
                ha="right" if m["recall"] > 0.8 else "left", fontsize=7, color="white" if m["recall"] > 0.8 else "k")
    ax.set(xlim=(0, 1), xlabel="recall (share of the class's images predicted as it)",
           title=f"per-class recall, worst first (top-1 {report['top1']:.3f})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def format_report(report: dict) -> str:
    k = next((key for key in report if key.startswith("top") and key != "top1"), "top5")
    lines = [f"top-1 {report['top1']:.4f}  {k[:3]}-{k[3:]} {report[k]:.4f}  macro-F1 {report['macro_f1']:.4f}  "
             f"({report['num_images']} images)", f"  {'class':<20} {'prec':>6} {'recall':>6} {'f1':>6} {'n':>5}"]
    for name, m in report["per_class"].items():
        lines.append(f"  {name:<20} {m['precision']:6.3f} {m['recall']:6.3f} {m['f1']:6.3f} {m['support']:5d}")
    return "\n".join(lines)
