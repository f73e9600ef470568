"""Run directories: what training writes, checkpoints and the per-epoch log, rebuilding a trained run, and what
`train --force` may remove.

A run directory holds recipe.yaml (resolved, absolute paths), classes.json, preprocess.json, adapter/ (LoRA, PEFT
layout) or weights.safetensors (full fine-tuning / linear probe: the trained tensors), checkpoints/{last,best}.pt
(training state, written then renamed), metrics.jsonl, curves.png and train_summary.json; `eval`, `export` and
`spectrum` add eval/, export/ and spectrum.{png,json}.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from vislora import tasks
from vislora.adapters import load_adapter, save_adapter
from vislora.inject import lora_layers
from vislora.recipe import differences, read_yaml, resolve, save_recipe

RECIPE, CLASSES, PREPROCESS, SUMMARY = "recipe.yaml", "classes.json", "preprocess.json", "train_summary.json"
ADAPTER, WEIGHTS, CHECKPOINTS = "adapter", "weights.safetensors", "checkpoints"
METRICS, CURVES = "metrics.jsonl", "curves.png"
# everything vislora writes into a run directory: `train --force` removes these and nothing else
ARTIFACTS = (RECIPE, CLASSES, PREPROCESS, SUMMARY, ADAPTER, WEIGHTS, CHECKPOINTS, METRICS, CURVES, "eval", "export",
             "spectrum.png", "spectrum.json", "predictions", "shrink_report.json", METRICS + ".tmp", WEIGHTS + ".tmp")
# recipe fields a resumed run may change: they do not change what is trained
RESUMABLE_CHANGES = ("data.workers", "train.device", "eval.", "export.")


# ---- starting, clearing, resuming -----------------------------------------------------------------
def clear(run_dir: Path) -> list[str]:
    """Remove a previous run's artifacts (only the names vislora writes); returns what was removed."""
    removed = []
    for name in ARTIFACTS:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def start(run_dir: Path, recipe: dict, class_names: list[str], preprocess: dict) -> None:
    """Write what defines the run before the first epoch: recipe.yaml, classes.json, preprocess.json."""
    (run_dir / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    save_recipe(recipe, run_dir / RECIPE)
    (run_dir / CLASSES).write_text(json.dumps(class_names))
    (run_dir / PREPROCESS).write_text(json.dumps(preprocess, indent=2))


def read_recipe(run_dir: str | Path) -> dict:
    path = Path(run_dir) / RECIPE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a vislora run directory: no {RECIPE}")
    return resolve(read_yaml(path), str(path))


def check_resumable(run_dir: Path, recipe: dict) -> None:
    """--resume needs the run's checkpoint and the run's own recipe: a field that changes what is trained
    (the adapter's rank, the data, the model ...) is an error naming every such field."""
    if not (run_dir / CHECKPOINTS / "last.pt").is_file():
        raise FileNotFoundError(f"--resume: {run_dir / CHECKPOINTS / 'last.pt'} does not exist, so there is "
                                "nothing to resume (train without --resume to start the run)")
    changed = [d for d in differences(read_recipe(run_dir), recipe) if not d.startswith(RESUMABLE_CHANGES)]
    if changed:
        raise ValueError(f"--resume: the recipe differs from {run_dir / RECIPE} in {'; '.join(changed)}. Resume with "
                         "the run's own recipe (vislora train --resume --out RUN), or train into a new --out")


# ---- checkpoints and the per-epoch log ------------------------------------------------------------
def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary name, then rename: a crash or Ctrl-C leaves the previous file loadable."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, state: dict, best: bool) -> None:
    atomic_save(state, run_dir / CHECKPOINTS / "last.pt")
    if best:
        atomic_save(state, run_dir / CHECKPOINTS / "best.pt")


def load_checkpoint(run_dir: Path) -> dict:
    """The training state of checkpoints/last.pt (tensors and plain data only: weights_only)."""
    return torch.load(run_dir / CHECKPOINTS / "last.pt", map_location="cpu", weights_only=True)


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / METRICS
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def plot_curves(history: list[dict], path: Path) -> None:
    """Loss and every validation metric per epoch as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [m["epoch"] for m in history]
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(epochs, [m["train_loss"] for m in history], label="train")
    if "val_loss" in history[0]:
        ax1.plot(epochs, [m["val_loss"] for m in history], label="val")
    ax1.set(xlabel="epoch", ylabel="loss", title="loss")
    ax1.legend()
    keys = [k for k in history[0] if k == "train_acc" or (k.startswith("val_") and k not in
                                                          ("val_loss", "val_predicted_classes"))]
    for key in keys:
        ax2.plot(epochs, [m.get(key) for m in history], label=key)
    ax2.set(xlabel="epoch", title="validation")
    if keys:
        ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def log_epoch(run_dir: Path, history: list[dict]) -> None:
    """metrics.jsonl (written then renamed) and curves.png after every epoch."""
    tmp = run_dir / (METRICS + ".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in history))
    os.replace(tmp, run_dir / METRICS)
    plot_curves(history, run_dir / CURVES)


# ---- the trained model ----------------------------------------------------------------------------
def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What training changes: parameters that require grad, and every buffer (running statistics)."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n for n, _ in model.named_buffers()}
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k in trainable | buffers}


def save_trained(model: nn.Module, run_dir: Path) -> None:
    """The deliverable of a run: adapter/ for LoRA (PEFT layout), else weights.safetensors (trained tensors)."""
    if any(True for _ in lora_layers(model)):
        save_adapter(model, run_dir / ADAPTER)
    else:
        tmp = run_dir / (WEIGHTS + ".tmp")
        save_file(trained_state(model), str(tmp))
        os.replace(tmp, run_dir / WEIGHTS)


def load_run(run_dir: str | Path) -> tuple[nn.Module, dict, dict]:
    """Rebuild the trained model of a run: (model in eval mode, recipe, preprocess). The base is built as training
    built it (same recipe, same seed), then the run's adapter or trained weights go in."""
    run_dir = Path(run_dir)
    recipe = read_recipe(run_dir)
    preprocess = json.loads((run_dir / PREPROCESS).read_text())
    with torch.random.fork_rng(devices=[]):
        model = tasks.get(recipe["task"]).build_model(recipe, preprocess["class_names"])
    if (run_dir / ADAPTER).is_dir():
        load_adapter(model, run_dir / ADAPTER)
    elif (run_dir / WEIGHTS).is_file():
        state = load_file(str(run_dir / WEIGHTS))
        unknown = sorted(set(state) - set(model.state_dict()))
        if unknown:
            raise ValueError(f"{run_dir / WEIGHTS} has keys the model lacks: {unknown[:5]}")
        model.load_state_dict(state, strict=False)
    else:
        raise FileNotFoundError(f"{run_dir} holds no trained weights ({ADAPTER}/ or {WEIGHTS}): did training finish "
                                "an epoch?")
    return model.eval(), recipe, preprocess
