"""Run directories: what training writes, checkpoints and the per-epoch log, and rebuilding a
trained run. The folder's names and the rules of `--out` (what `train --force` may remove, the lock,
data folders that outputs must stay out of) are vislora.runpaths', which the CLI checks before torch
is imported.

A run directory holds recipe.yaml (resolved, absolute paths), classes.json, preprocess.json,
adapter/ (LoRA, PEFT layout) or weights.safetensors (full fine-tuning / linear probe: the trained
tensors), checkpoints/{last,best}.pt (training state, written then renamed), metrics.jsonl,
curves.png, train_summary.json and the marker .vislora_run; `eval`, `export` and `spectrum` add
eval/, export/ and spectrum.{png,json}.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from vislora import tasks
from vislora.adapters import load_adapter, save_adapter
from vislora.errors import VisloraError
from vislora.files import atomic_write, read_json, to_json, write_json
from vislora.layers import upgrade_state_dict
from vislora.recipe import save_recipe
from vislora.runpaths import (
    ADAPTER,
    CHECKPOINTS,
    CLASSES,
    CURVES,
    METRICS,
    PREPROCESS,
    RECIPE,
    SPLIT,
    WEIGHTS,
    mark,
    read_recipe,
)
from vislora.targets import lora_layers
from vislora.tasks.common import read_card


# ---- starting ------------------------------------------------------------------------------------
def start(run_dir: Path, recipe: dict, class_names: list[str], preprocess: dict, split: dict | None = None) -> None:
    """Write what defines the run before the first epoch: recipe.yaml, classes.json, preprocess.json
    and, when the task records it, split.json (which images were train and which val)."""
    (run_dir / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    mark(run_dir)
    save_recipe(recipe, run_dir / RECIPE)
    write_json(run_dir / CLASSES, class_names, indent=None)
    write_json(run_dir / PREPROCESS, preprocess)
    if split is not None:
        write_json(run_dir / SPLIT, split, indent=None)


# ---- checkpoints and the per-epoch log -----------------------------------------------------------
def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary name, then rename: a crash or Ctrl-C leaves the previous file
    loadable."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_epoch(run_dir: Path, model: nn.Module, state: dict, improved: bool, curves: dict | None = None) -> None:
    """An epoch's files, last.pt last: the kept model (and best.pt) when it improved, metrics.jsonl
    and curves.png, then checkpoints/last.pt. Whenever training stops, last.pt's epoch has its model
    and log row written, and --resume continues from it with the history the checkpoint holds (each
    epoch logged once)."""
    if improved:
        save_trained(model, run_dir)
        if (run_dir / ADAPTER).is_dir():
            write_card(run_dir, model, state["history"][-1])
        atomic_save(state, run_dir / CHECKPOINTS / "best.pt")
    log_epoch(run_dir, state["history"], curves)
    atomic_save(state, run_dir / CHECKPOINTS / "last.pt")


def load_checkpoint(run_dir: Path, name: str = "last.pt", why: str = "--resume") -> dict:
    """The training state of checkpoints/NAME (last.pt: --resume; best.pt: a collapse's recovery), tensors
    and plain data only (weights_only). A file that is not such a checkpoint (truncated, or a pickle with
    code in it) is a VisloraError naming it, with `why` it was read."""
    path = run_dir / CHECKPOINTS / name
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError (bad zip), EOFError ...: the file, not vislora
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VisloraError(f"{why}: {path} is not a training checkpoint vislora can read ({reason[:160]}); "
                         "start the run again with --force") from None
    if not isinstance(state, dict) or not {"epoch", "model", "optimizer"} <= set(state):
        raise VisloraError(f"{why}: {path} is not a vislora training checkpoint (no epoch / model / optimizer)")
    state["model"] = upgrade_state_dict(state["model"])  # factor keys of checkpoints before the variant seam
    return state


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / METRICS
    if not path.is_file():
        return []
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise VisloraError(f"{path} is not JSON lines: {e}") from None


def shown_metrics(row: dict, num_classes: int | None) -> list[str]:
    """The validation curves worth drawing: train_acc and val_* but the loss and the class count,
    and no top-k with k >= the number of classes (always 1.0 there)."""
    keys = [k for k in row if k == "train_acc" or (k.startswith("val_") and k not in ("val_loss",
                                                                                      "val_predicted_classes"))]
    topk = [k for k in keys if k.startswith("val_top") and k[7:].isdigit() and k != "val_top1"]
    return [k for k in keys if not (k in topk and num_classes is not None and int(k[7:]) >= num_classes)]


def plot_curves(history: list[dict], path: Path, score: str | None = None, num_classes: int | None = None) -> None:
    """Loss and the validation metrics per epoch as a PNG: whole epochs on the x axis, the kept
    (best `score`) epoch marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [m["epoch"] for m in history]
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(epochs, [m["train_loss"] for m in history], marker=".", label="train")
    if "val_loss" in history[0]:
        ax1.plot(epochs, [m["val_loss"] for m in history], marker=".", label="val")
    ax1.set(xlabel="epoch", ylabel="loss", title="loss")
    ax1.legend()
    keys = shown_metrics(history[0], num_classes)
    for key in keys:
        ax2.plot(epochs, [m.get(key) for m in history], marker=".", label=key)
    mark_best(ax2, history, score)
    ax2.set(xlabel="epoch", title="validation")
    if keys:
        ax2.legend()
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")


def mark_best(ax, history: list[dict], score: str | None) -> None:
    """A dotted line and a star at the epoch with the best `score` (the kept model), labelled with
    its value."""
    rows = [m for m in history if isinstance(m.get(score), (int, float))] if score else []
    if not rows:
        return
    best = max(rows, key=lambda m: m[score])  # the first of equal scores: the one training kept
    ax.axvline(best["epoch"], color="grey", ls=":", lw=1)
    ax.plot([best["epoch"]], [best[score]], marker="*", ms=12, color="tab:red", ls="none",
            label=f"kept: epoch {best['epoch']}, {score} {best[score]:.3f}")


def log_epoch(run_dir: Path, history: list[dict], curves: dict | None = None) -> None:
    """metrics.jsonl (standard JSON lines, written then renamed) and curves.png after every epoch;
    curves: the plot's {"score", "num_classes"}."""
    text = "".join(to_json(row, indent=None) + "\n" for row in history)
    atomic_write(run_dir / METRICS, lambda tmp: tmp.write_text(text))
    atomic_write(run_dir / CURVES, lambda tmp: plot_curves(history, tmp, **(curves or {})))


# ---- the adapter's card (README.md, as PEFT's save_pretrained writes one) ------------------------
def base_licence(model_cfg: dict, model: nn.Module) -> str:
    """The licence of the base weights: the card beside model.checkpoint, timm's pretrained_cfg for
    hub weights."""
    if model_cfg["checkpoint"]:
        card = read_card(model_cfg["checkpoint"])
        found = card.get("licence") or card.get("license")
        where = Path(model_cfg["checkpoint"]).with_suffix(".json").name
        return f"{found} (from {where})" if found else f"not stated: see {where} and the weights' source"
    if model_cfg["pretrained"]:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        found = cfg.get("license")
        return f"{found} (timm's pretrained_cfg of {cfg.get('hf_hub_id') or model_cfg['name']})" if found else \
            f"not stated by timm: see the model page of {model_cfg['name']}"
    return "none: the base starts from random weights (model.pretrained false, no model.checkpoint)"


def adapter_card(run_dir: Path, model: nn.Module, row: dict) -> str:
    """README.md of adapter/: base model, classes, recipe, val metrics of the kept epoch, licence,
    how to load."""
    recipe, classes = read_recipe(run_dir), read_json(run_dir / CLASSES, "run's classes")
    m, adapter = recipe["model"], recipe["adapter"]
    metrics = ", ".join(f"{k} {row[k]:.4f}" for k in ["val_loss", *shown_metrics(row, len(classes))]
                        if k.startswith("val_") and isinstance(row.get(k), float))
    cfg = getattr(model, "pretrained_cfg", None) or {}
    base = cfg.get("hf_hub_id") if m["pretrained"] and cfg.get("hf_hub_id") else m["name"]
    weights = (f"model.checkpoint {m['checkpoint']}" if m["checkpoint"] else
               "timm's hub weights" if m["pretrained"] else "none (random init)")
    shown = ", ".join(classes[:20]) + (f" ... and {len(classes) - 20} more" if len(classes) > 20 else "")
    return "\n".join([
        "---", f"base_model: {base}", "library_name: peft", f"tags: [vislora, lora, {recipe['task']}]", "---", "",
        f"# LoRA adapter: {run_dir.resolve().name}", "",
        f"A LoRA adapter in PEFT's layout (adapter_config.json, adapter_model.safetensors; vislora's exact layers in "
        f"vislora.json) for the timm model `{m['name']}`, trained by vislora.", "",
        f"- **Base model**: `{m['name']}` (timm), kwargs {m['kwargs'] or '{}'}; weights: {weights}",
        f"- **Licence of the base weights**: {base_licence(m, model)}",
        f"- **Task**: {recipe['task']}, {len(classes)} classes: {shown}",
        f"- **Adapter**: r={adapter['r']}, alpha={adapter['alpha']}, targets {adapter['targets']}, trained fully: "
        f"{adapter['train']}",
        f"- **Recipe**: {run_dir.resolve() / RECIPE}",
        f"- **Val metrics** (epoch {row['epoch']}, the kept one): {metrics or 'no val split'}", "",
        "Load it:", "", "```python", "import timm, vislora",
        f"model = timm.create_model({m['name']!r}, num_classes={len(classes)}{_kwargs_text(m['kwargs'])})",
        'vislora.load_adapter(model, "adapter/")   # or peft.PeftModel.from_pretrained(model, "adapter/")',
        "```", "", *([f"The base has no pretrained weights: call torch.manual_seed({recipe['train']['seed']}) before "
                      "create_model to rebuild it (as `vislora eval RUN` does)."] if weights.startswith("none") else
                     [])])


def _kwargs_text(kwargs: dict) -> str:
    return "".join(f", {k}={v!r}" for k, v in kwargs.items())


def write_card(run_dir: Path, model: nn.Module, row: dict) -> None:
    text = adapter_card(run_dir, model, row)
    atomic_write(run_dir / ADAPTER / "README.md", lambda tmp: tmp.write_text(text))


# ---- the trained model ---------------------------------------------------------------------------
def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What training changes: parameters that require grad, and every buffer (running
    statistics)."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n for n, _ in model.named_buffers()}
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k in trainable | buffers}


def save_trained(model: nn.Module, run_dir: Path) -> None:
    """The deliverable of a run: adapter/ for LoRA (PEFT layout), else weights.safetensors (trained
    tensors)."""
    if any(True for _ in lora_layers(model)):
        save_adapter(model, run_dir / ADAPTER)
    else:
        state = trained_state(model)
        atomic_write(run_dir / WEIGHTS, lambda tmp: save_file(state, str(tmp)))


def load_run(run_dir: str | Path) -> tuple[nn.Module, dict, dict]:
    """Rebuild the trained model of a run: (model in eval mode, recipe, preprocess). The base is
    built as training built it (same recipe, same seed), then the run's adapter or trained weights
    go in."""
    run_dir = Path(run_dir)
    recipe = read_recipe(run_dir)
    preprocess = read_json(run_dir / PREPROCESS, "run's preprocessing")
    with torch.random.fork_rng(devices=[]):
        model = tasks.get(recipe["task"]).build_model(recipe, preprocess["class_names"])
    if (run_dir / ADAPTER).is_dir():
        load_adapter(model, run_dir / ADAPTER)
    elif (run_dir / WEIGHTS).is_file():
        state = load_file(str(run_dir / WEIGHTS))
        unknown = sorted(set(state) - set(model.state_dict()))
        if unknown:
            raise VisloraError(f"{run_dir / WEIGHTS} has keys the model lacks: {unknown[:5]}")
        model.load_state_dict(state, strict=False)
    else:
        raise FileNotFoundError(f"{run_dir} holds no trained weights ({ADAPTER}/ or {WEIGHTS}): did training finish "
                                "an epoch?")
    return model.eval(), recipe, preprocess
