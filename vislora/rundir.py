"""Run directories: what training writes, checkpoints and the per-epoch log, rebuilding a trained run, and the
rules of `--out`: what `train --force` may remove, the lock, and data folders that outputs must stay out of.

A run directory holds recipe.yaml (resolved, absolute paths), classes.json, preprocess.json, adapter/ (LoRA, PEFT
layout) or weights.safetensors (full fine-tuning / linear probe: the trained tensors), checkpoints/{last,best}.pt
(training state, written then renamed), metrics.jsonl, curves.png, train_summary.json and the marker
.vislora_run; `eval`, `export` and `spectrum` add eval/, export/ and spectrum.{png,json}.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from vislora import tasks
from vislora.adapters import load_adapter, save_adapter
from vislora.files import atomic_write, read_json, to_json, write_json
from vislora.inject import lora_layers
from vislora.layers import upgrade_state_dict
from vislora.recipe import differences, read_yaml, resolve, save_recipe

RECIPE, CLASSES, PREPROCESS, SUMMARY = "recipe.yaml", "classes.json", "preprocess.json", "train_summary.json"
ADAPTER, WEIGHTS, CHECKPOINTS = "adapter", "weights.safetensors", "checkpoints"
METRICS, CURVES = "metrics.jsonl", "curves.png"
MARKER, LOCK = ".vislora_run", ".vislora.lock"  # "vislora wrote this run"; "a training is writing it now"
# everything vislora writes into a run directory: `train --force` removes these, in a run (MARKER) and nowhere else
ARTIFACTS = (RECIPE, CLASSES, PREPROCESS, SUMMARY, ADAPTER, WEIGHTS, CHECKPOINTS, METRICS, CURVES, "eval", "export",
             "spectrum.png", "spectrum.json", "predictions", "shrink_report.json", METRICS + ".tmp", WEIGHTS + ".tmp",
             MARKER)
# recipe fields a resumed run may change: they do not change what is trained (data.workers does: each worker
# count gives other augmentation streams)
RESUMABLE_CHANGES = ("train.device", "eval.", "export.")


# ---- the rules of --out ---------------------------------------------------------------------------
def is_run(path: Path) -> bool:
    """A folder vislora wrote a run into: its marker, or (runs before the marker) recipe.yaml + preprocess.json."""
    return (path / MARKER).is_file() or ((path / RECIPE).is_file() and (path / PREPROCESS).is_file())


def holds_files(path: Path) -> bool:
    """Anything in the folder besides a training's lock."""
    return path.is_dir() and any(p.name != LOCK for p in path.iterdir())


def within(path: Path, folder: Path) -> bool:
    """`path` is `folder` or lies inside it (both resolved, so `.` and links count)."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def keep_apart(out: Path, data: Sequence[str | Path | None], replaced: Sequence[Path] = (),
               flag: str = "--out") -> None:
    """No command writes into its data: `out` must not be a data folder or lie inside one, and no folder the
    command replaces (`replaced`, e.g. fewshot's OUT/data) may hold the data."""
    for folder in (Path(d) for d in data if d):
        if not folder.is_dir():
            continue
        if within(out, folder) or any(within(folder, r) for r in replaced):
            raise ValueError(f"{flag} {out} would write into the data folder {folder}: vislora never writes into "
                             "its data (nor trains on its own outputs); choose an --out outside it")


def check_out(run_dir: Path, data: Sequence[str | Path | None], resume: bool, force: bool) -> None:
    """train's --out: a folder (not a file), apart from the data; a folder with files is refused unless --resume
    continues it or --force replaces it, and --force replaces only a run (it never deletes a user's files)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"--out {run_dir} is a file, not a folder: choose a folder for the run")
    keep_apart(run_dir, data, [run_dir / name for name in ARTIFACTS])
    if resume or not holds_files(run_dir):
        return
    if not is_run(run_dir):
        raise ValueError(f"--out {run_dir} holds files and is not a vislora run: choose an empty or new folder "
                         "(--force replaces only a run vislora wrote, never other files)")
    if not force:
        raise ValueError(f"{run_dir} already holds a run: pass --resume to continue it, --force to replace it "
                         "(vislora's files there are removed first), or --out DIR")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(holder: str) -> bool:
    """A lock left by a process of this machine that no longer runs (killed before it could remove it)."""
    pid, _, host = holder.partition("@")
    return host == socket.gethostname() and pid.isdigit() and not _alive(int(pid))


@contextlib.contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """Hold RUN/.vislora.lock (created atomically, O_EXCL) while training writes the run: a second training into
    the same folder is refused naming the lock. Re-entrant in one process; a dead process's lock is taken over."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path, mine = run_dir / LOCK, f"{os.getpid()}@{socket.gethostname()}"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            holder = path.read_text().strip() if path.is_file() else ""
            if holder == mine:
                yield
                return
            if not _stale(holder):
                raise ValueError(f"{path} is held by process {holder or '?'}: another training is writing "
                                 f"{run_dir}; wait for it, or remove {path} if no such process runs") from None
            path.unlink(missing_ok=True)
    else:
        raise ValueError(f"{path}: could not take the lock")
    with os.fdopen(fd, "w") as f:
        f.write(mine)
    try:
        yield
    finally:
        if path.is_file() and path.read_text().strip() == mine:
            path.unlink()


# ---- starting, clearing, resuming -----------------------------------------------------------------
def clear(run_dir: Path) -> list[str]:
    """Remove a previous run's artifacts (only the names vislora writes, and only in a run); returns them."""
    if not is_run(run_dir):
        return []
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
    mark(run_dir)
    save_recipe(recipe, run_dir / RECIPE)
    write_json(run_dir / CLASSES, class_names, indent=None)
    write_json(run_dir / PREPROCESS, preprocess)


def mark(run_dir: Path) -> None:
    """The marker that says vislora wrote this run (what lets --force replace it)."""
    write_json(run_dir / MARKER, {"written_by": "vislora", "artifacts": list(ARTIFACTS)})


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
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_epoch(run_dir: Path, model: nn.Module, state: dict, improved: bool) -> None:
    """An epoch's files, last.pt last: the kept model (and best.pt) when it improved, metrics.jsonl and curves.png,
    then checkpoints/last.pt. Whenever training stops, last.pt's epoch has its model and log row written, and
    --resume continues from it with the history the checkpoint holds (each epoch logged once)."""
    if improved:
        save_trained(model, run_dir)
        atomic_save(state, run_dir / CHECKPOINTS / "best.pt")
    log_epoch(run_dir, state["history"])
    atomic_save(state, run_dir / CHECKPOINTS / "last.pt")


def load_checkpoint(run_dir: Path) -> dict:
    """The training state of checkpoints/last.pt (tensors and plain data only: weights_only). A file that is not
    such a checkpoint (truncated, or a pickle with code in it) is a ValueError naming it."""
    path = run_dir / CHECKPOINTS / "last.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError (bad zip), EOFError ...: the file, not vislora
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"--resume: {path} is not a training checkpoint vislora can read ({reason[:160]}); "
                         "start the run again with --force") from None
    if not isinstance(state, dict) or not {"epoch", "model", "optimizer"} <= set(state):
        raise ValueError(f"--resume: {path} is not a vislora training checkpoint (no epoch / model / optimizer)")
    state["model"] = upgrade_state_dict(state["model"])  # factor keys of checkpoints before the variant seam
    return state


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / METRICS
    if not path.is_file():
        return []
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON lines: {e}") from None


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
    fig.savefig(path, dpi=100, format="png")


def log_epoch(run_dir: Path, history: list[dict]) -> None:
    """metrics.jsonl (standard JSON lines, written then renamed) and curves.png after every epoch."""
    text = "".join(to_json(row, indent=None) + "\n" for row in history)
    atomic_write(run_dir / METRICS, lambda tmp: tmp.write_text(text))
    atomic_write(run_dir / CURVES, lambda tmp: plot_curves(history, tmp))


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
        state = trained_state(model)
        atomic_write(run_dir / WEIGHTS, lambda tmp: save_file(state, str(tmp)))


def load_run(run_dir: str | Path) -> tuple[nn.Module, dict, dict]:
    """Rebuild the trained model of a run: (model in eval mode, recipe, preprocess). The base is built as training
    built it (same recipe, same seed), then the run's adapter or trained weights go in."""
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
            raise ValueError(f"{run_dir / WEIGHTS} has keys the model lacks: {unknown[:5]}")
        model.load_state_dict(state, strict=False)
    else:
        raise FileNotFoundError(f"{run_dir} holds no trained weights ({ADAPTER}/ or {WEIGHTS}): did training finish "
                                "an epoch?")
    return model.eval(), recipe, preprocess
