"""Evaluation of a run directory or of an exported .pt / .onnx file: accuracy, per-class metrics, confusion matrix."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import yaml
from safetensors.torch import load_file
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support
from tqdm import tqdm

from vislora import data as vdata
from vislora.adapters import load_adapter
from vislora.recipe import resolve

EXPORTED_SUFFIXES = (".pt", ".onnx")


def load_run(run_dir: str | Path) -> tuple[nn.Module, dict, dict]:
    """Rebuild the trained model of a run: (model in eval mode, recipe, preprocess)."""
    from vislora.train import build_classifier

    run_dir = Path(run_dir)
    recipe_path = run_dir / "recipe.yaml"
    if not recipe_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a vislora run directory: no recipe.yaml")
    recipe = resolve(yaml.safe_load(recipe_path.read_text()), str(recipe_path))
    preprocess = json.loads((run_dir / "preprocess.json").read_text())
    classes = preprocess["class_names"]
    if recipe["task"] == "detection":
        from vislora.detection import adapt_detector, build_detector

        model = build_detector(recipe["model"], recipe["detector"], len(classes))
        if recipe["adapter"] is None:
            adapt_detector(model, None)
    else:
        model = build_classifier(recipe, len(classes))
    if (run_dir / "adapter").is_dir():
        load_adapter(model, run_dir / "adapter")
    elif (run_dir / "weights.safetensors").is_file():
        state = load_file(str(run_dir / "weights.safetensors"))
        unknown = sorted(set(state) - set(model.state_dict()))
        if unknown:
            raise ValueError(f"{run_dir / 'weights.safetensors'} has keys the model lacks: {unknown[:5]}")
        model.load_state_dict(state, strict=False)
    else:
        raise FileNotFoundError(f"{run_dir} holds no trained weights (adapter/ or weights.safetensors): "
                                "did training finish an epoch?")
    return model.eval(), recipe, preprocess


def classification_report(logits: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict:
    """top1/top5 fractions, per-class precision/recall/F1 (scikit-learn), macro-F1 and the confusion matrix."""
    pred = logits.argmax(1)
    k = min(5, logits.shape[1])
    top5 = (np.argsort(-logits, axis=1)[:, :k] == labels[:, None]).any(1)
    ids = list(range(len(classes)))
    p, r, f, s = precision_recall_fscore_support(labels, pred, labels=ids, zero_division=0)
    return {
        "top1": float((pred == labels).mean()) if len(labels) else 0.0,
        "top5": float(top5.mean()) if len(labels) else 0.0,
        "macro_f1": float(f1_score(labels, pred, labels=ids, average="macro", zero_division=0)),
        "per_class": {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                      for i, c in enumerate(classes)},
        "confusion_matrix": confusion_matrix(labels, pred, labels=ids).tolist(),
        "num_images": int(len(labels)),
    }


def plot_confusion(matrix: list[list[int]], classes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(matrix)
    size = max(4, 0.5 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(m, cmap="Blues")
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted", ylabel="true",
           title="confusion matrix")
    ax.set_xticklabels(classes, rotation=90)
    ax.set_yticklabels(classes)
    if len(classes) <= 30:
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if m[i, j] > m.max() / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(report: dict, out: Path, classes: list[str]) -> Path:
    """REPORT.json, plus confusion matrix CSV and PNG beside it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    if "confusion_matrix" in report:
        with open(out.with_name(out.stem + "_confusion.csv"), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["true\\predicted", *classes])
            for name, row in zip(classes, report["confusion_matrix"], strict=True):
                writer.writerow([name, *row])
        plot_confusion(report["confusion_matrix"], classes, out.with_name(out.stem + "_confusion.png"))
    return out


def format_report(report: dict) -> str:
    if "map" in report:
        lines = [f"mAP@[.5:.95] {report['map']:.4f}  mAP@.5 {report['map50']:.4f}  mAP@.75 {report['map75']:.4f}"]
        lines += [f"  {name:<20} AP {ap:.4f}" for name, ap in report["per_class"].items()]
        return "\n".join(lines)
    lines = [f"top-1 {report['top1']:.4f}  top-5 {report['top5']:.4f}  macro-F1 {report['macro_f1']:.4f}  "
             f"({report['num_images']} images)", f"  {'class':<20} {'prec':>6} {'recall':>6} {'f1':>6} {'n':>5}"]
    for name, m in report["per_class"].items():
        lines.append(f"  {name:<20} {m['precision']:6.3f} {m['recall']:6.3f} {m['f1']:6.3f} {m['support']:5d}")
    return "\n".join(lines)


def eval_split(data: str | Path | None, recipe: dict | None, classes: list[str]) -> vdata.Split:
    """The images to evaluate: `--data` (ROOT/val, a ROOT holding val/, or ROOT/<class>), else the run's val split."""
    if data is not None:
        return vdata.scan_eval_folder(data, classes)
    if recipe is None:
        raise ValueError("evaluating an exported file needs --data DIR")
    d = recipe["data"]
    _, val = vdata.scan_folder(d["path"], d["val_fraction"], recipe["train"]["seed"])
    if val.classes != classes:
        raise ValueError(f"the classes under {d['path']} differ from the run's: {val.classes} vs {classes}")
    return val


def evaluate(target: str | Path, data: str | Path | None = None, out: str | Path | None = None,
             batch_size: int = 64, workers: int = 2) -> dict:
    """Evaluate a run directory or an exported .pt/.onnx file; writes the JSON report (+ CSV, PNG)."""
    target = Path(target)
    if target.suffix in EXPORTED_SUFFIXES:
        from vislora.export import load_exported

        predictor, pre = load_exported(target)
        recipe, model = None, None
        default_out = target.parent / f"eval_{target.stem}{target.suffix.replace('.', '_')}.json"
    else:
        model, recipe, pre = load_run(target)
        default_out = target / "eval" / "report.json"
        if recipe["task"] == "detection":
            return _evaluate_detection(model, recipe, pre, Path(out) if out else default_out)
        batch_size = recipe["eval"]["batch_size"] or recipe["train"]["batch_size"]

        def predictor(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return model(torch.from_numpy(x)).float().numpy()

    classes = pre["class_names"]
    split = eval_split(data, recipe, classes)
    dataset = vdata.ImageDataset(split, vdata.build_transform(pre, False))
    loader = vdata.build_loader(dataset, batch_size, False, workers)
    logits, labels = [], []
    for images, y in tqdm(loader, desc="eval", leave=False):
        logits.append(predictor(images.numpy().astype(np.float32)))
        labels.append(y.numpy())
    report = classification_report(np.concatenate(logits) if logits else np.zeros((0, len(classes))),
                                   np.concatenate(labels) if labels else np.zeros(0, dtype=int), classes)
    report["skipped"] = [str(p) for p in dataset.skipped]
    report["source"] = str(target)
    write_report(report, Path(out) if out else default_out, classes)
    return report


def _evaluate_detection(model, recipe: dict, pre: dict, out: Path) -> dict:
    from vislora.detection import build_detection_datasets, detection_collate, evaluate_detection, plot_detections

    _, val_set, names = build_detection_datasets(recipe["data"], recipe["detector"]["min_size"])
    loader = vdata.build_loader(val_set, recipe["eval"]["batch_size"] or recipe["train"]["batch_size"], False,
                                workers=0, collate_fn=detection_collate)
    report = evaluate_detection(model, loader, names)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    plot_detections(model, val_set, names, out.with_name(out.stem + "_boxes.png"))
    return report
