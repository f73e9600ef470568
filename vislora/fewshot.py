"""`vislora fewshot`: LoRA against a linear probe and full fine-tuning with k labelled images per
class.

The protocol behind every number in fewshot.json:
- k-shot sets: for each seed (0 .. seeds-1), each class's images of the recipe's train split are
  shuffled once (numpy, seeded by (seed, class index)) and the first k are taken. So the sets are
  stratified, nested across k (the 2-shot set holds the 1-shot set) and the same images for every
  contender at a given seed.
- Every (k, seed, contender) cell trains through the one loop (vislora.train.train), from the recipe
  with these overrides: the adapter (lora: the recipe's LoRA, or the default LoRA of
  vislora.recipe.DEFAULTS when the recipe is a probe or full recipe; probe: linear_probe; full:
  null), train.seed = seed, and train.lr = the recipe's lr times LR_SCALE[contender] / LR_SCALE[the
  recipe's own mode] (probe 5x and full 0.5x LoRA's lr: the ratios the few-shot grids in
  BENCHMARKS.md were measured with), unless --lr names it.
- Fixed step budget, not epochs: every run takes the same S optimizer steps of the recipe's batch B,
  whatever k. S = --steps, by default max(100, recipe epochs x batches per epoch at the largest k),
  i.e. the recipe's own schedule at the largest k, at least 100 steps. The run's train folder
  repeats its k-shot images (symlinks, in a seeded order) to exactly S x B x grad_accum samples, so
  the run is one epoch of S steps: the recipe's warm-up share (warmup_epochs / epochs) of S, then
  cosine. Every run sees S x B augmented samples.
- Evaluation: the model after the last step (no val split during training, so nothing is picked on
  the numbers reported) on the recipe's full val split, by vislora.evaluate.evaluate.

Outputs in --out: fewshot.json (settings + one row per cell), fewshot.md (mean +- std of val top-1,
shots by contender), fewshot.png (top-1 against shots with error bars), subsets.json (the sampled
images), runs/<cell>/ (each a run directory, its checkpoints removed; fewshot.log holds the loop's
output) and data/ (the val split as links; the k-shot folders are removed once their cells are
done). A rerun resumes the grid: finished cells are read back from fewshot.json, not retrained; a
grid made with other settings (recipe, steps, learning rates) is refused.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vislora import data as vdata
from vislora import runpaths, tasks
from vislora.errors import VisloraError
from vislora.evaluate import evaluate
from vislora.files import read_json, write_json
from vislora.recipe import DEFAULTS, differences, mode, resolve
from vislora.train import train

CONTENDERS = ("lora", "probe", "full")
MODES = {"lora": "lora", "probe": "linear_probe", "full": "full"}  # contender -> vislora.recipe.mode()
# relative learning rates, fixed so the published grids rerun the same: those of the mode defaults
# when they were measured (issue #15: LoRA 2e-3, probe 1e-2, full 1e-3)
LR_SCALE = {"lora": 1.0, "probe": 5.0, "full": 0.5}
MIN_STEPS = 100
RESULTS, TABLE, PLOT, SUBSETS = "fewshot.json", "fewshot.md", "fewshot.png", "subsets.json"


# ---- the grid's settings -------------------------------------------------------------------------
def recipe_mode(recipe: dict) -> str:
    """Which contender a recipe is: lora (an adapter mapping), probe (linear_probe) or full
    (null)."""
    return {m: c for c, m in MODES.items()}[mode(recipe)]


def contender_adapter(recipe: dict, contender: str) -> dict | str | None:
    """The adapter section of a contender: the recipe's LoRA (else the default LoRA), linear_probe
    or null."""
    if contender == "lora":
        return copy.deepcopy(recipe["adapter"] if recipe_mode(recipe) == "lora" else DEFAULTS["adapter"])
    return "linear_probe" if contender == "probe" else None


def contender_lrs(recipe: dict, overrides: dict[str, float] | None = None) -> dict[str, float]:
    """Learning rate per contender: the recipe's lr rescaled by LR_SCALE from the recipe's own mode;
    `overrides` win."""
    base = recipe["train"]["lr"] / LR_SCALE[recipe_mode(recipe)]
    lrs = {c: base * LR_SCALE[c] for c in CONTENDERS}
    unknown = sorted(set(overrides or {}) - set(CONTENDERS))
    if unknown:
        raise VisloraError(f"--lr names unknown contender(s) {unknown}: use {', '.join(CONTENDERS)}")
    return {**lrs, **(overrides or {})}


def default_steps(recipe: dict, max_shots: int, num_classes: int) -> int:
    """max(MIN_STEPS, the recipe's epochs x optimizer steps per epoch on the largest k-shot set)."""
    t = recipe["train"]
    batches = max(1, max_shots * num_classes // t["batch_size"])
    return max(MIN_STEPS, t["epochs"] * math.ceil(batches / t["grad_accum"]))


def _check_grid(shots: Sequence[int], seeds: int, contenders: Sequence[str]) -> None:
    if not shots or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in shots):
        raise VisloraError(f"--shots must be whole numbers >= 1, got {list(shots)}")
    if seeds < 1:
        raise VisloraError(f"--seeds must be >= 1, got {seeds}")
    unknown = [c for c in contenders if c not in CONTENDERS]
    if unknown or not contenders:
        raise VisloraError(f"--contenders {list(contenders)}: choose among {', '.join(CONTENDERS)}")


def check_task(recipe: dict) -> None:
    """The recipe's task must have k-shot sampling per class (its KSHOT, vislora.tasks.OPTIONAL):
    the grid samples class folders and scores val top-1."""
    task = tasks.get(recipe["task"])
    if not task.KSHOT:
        raise VisloraError(f"fewshot samples k images per class, which task {task.NAME} has no sampling for (its "
                           f"KSHOT is false): use a recipe of task {' or '.join(tasks.having('KSHOT'))}")


# ---- sampling and the data folders ---------------------------------------------------------------
def sample_shots(split: vdata.Split, shots: Sequence[int], seed: int) -> dict[int, list[tuple[Path, int]]]:
    """k images per class for every k in `shots`: each class's images shuffled once by (seed, class
    index), the first k taken. Stratified, nested across k, and a function of (split, seed) only."""
    by_class: dict[int, list[Path]] = {y: [] for y in range(len(split.classes))}
    for path, y in sorted(split.items):
        by_class[y].append(path)
    most = max(shots)
    order = {}
    for y, paths in by_class.items():
        if len(paths) < most:
            raise VisloraError(f"class '{split.classes[y]}' has {len(paths)} training images, "
                               f"fewer than --shots {most}")
        order[y] = [paths[i] for i in np.random.default_rng([seed, y]).permutation(len(paths))]
    return {k: [(p, y) for y in by_class for p in order[y][:k]] for k in sorted(set(shots))}


def _link(source: Path, target: Path) -> None:
    """A symlink to the image (a copy where the file system has no symlinks)."""
    try:
        os.symlink(source.resolve(), target)
    except OSError:
        shutil.copyfile(source, target)


def write_folder(items: Sequence[tuple[Path, int]], classes: list[str], folder: Path, count: int | None = None,
                 seed: int = 0) -> Path:
    """FOLDER/<class>/<links>: every item once, or with `count` exactly `count` links cycling over
    the items in a seeded order (how a k-shot set fills a fixed number of samples)."""
    if folder.exists():
        shutil.rmtree(folder)
    for name in sorted({classes[y] for _, y in items}):  # a class without images gets no folder
        (folder / name).mkdir(parents=True)
    order = np.random.default_rng(seed).permutation(len(items)) if count else np.arange(len(items))
    for i in range(count or len(items)):
        path, y = items[order[i % len(items)]]
        _link(path, folder / classes[y] / f"{i:06d}_{path.name}")
    return folder


# ---- one cell ------------------------------------------------------------------------------------
def cell_recipe(recipe: dict, contender: str, seed: int, train_dir: Path, steps: int, lr: float) -> dict:
    """The recipe of one cell: its adapter, seed and lr, the k-shot folder as data, one epoch of
    `steps` steps."""
    r = copy.deepcopy(recipe)
    t = r["train"]
    r["adapter"] = contender_adapter(recipe, contender)
    r["data"].update(path=str(train_dir), val_fraction=0.0)
    t.update(seed=seed, lr=lr, max_steps=steps, warmup_epochs=t["warmup_epochs"] / t["epochs"],
             head_epochs=t["head_epochs"] / t["epochs"], epochs=1)  # the recipe's shares of the one epoch
    return resolve(r, f"fewshot {contender} seed {seed}")


def run_cell(recipe: dict, run_dir: Path, val_dir: Path) -> dict:
    """Train one cell through the loop and evaluate its last model on the val folder; the loop's
    output goes to run_dir/fewshot.log, its checkpoints are removed afterwards."""
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(run_dir / "fewshot.log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        train(recipe, run_dir)
        wall = time.perf_counter() - start
        report = evaluate(run_dir, data=val_dir, out=run_dir / "eval" / "report.json",
                          workers=recipe["data"]["workers"])
    shutil.rmtree(run_dir / runpaths.CHECKPOINTS, ignore_errors=True)
    summary = read_json(run_dir / runpaths.SUMMARY, "run summary")["summary"]
    return {"top1": report["top1"], "macro_f1": report["macro_f1"], "trainable": summary["trainable"],
            "total": summary["total"], "wall_s": round(wall, 2), "val_images": report["num_images"]}


# ---- results -------------------------------------------------------------------------------------
def _read_results(path: Path, settings: dict) -> list[dict]:
    """The finished rows of an earlier call with the same settings (none if there is no
    fewshot.json)."""
    if not path.is_file():
        return []
    saved = read_json(path, "results of an earlier grid: remove it to start the grid again")
    old = saved.get("settings", {})
    changed = differences(old.get("recipe", {}), settings["recipe"], "recipe.")
    changed += [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in settings.items() if k != "recipe" and old.get(k) != v]
    if changed:
        raise VisloraError(f"{path} holds a grid made with other settings ({'; '.join(changed[:4])}): use another "
                         "--out, or the same recipe, --steps and --lr")
    return list(saved.get("rows", []))


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def format_table(rows: list[dict], settings: dict) -> str:
    """Markdown: mean +- std of val top-1 (%) over seeds, shots by contender, and the trainable
    parameters."""
    contenders = [c for c in CONTENDERS if any(r["contender"] == c for r in rows)]
    seeds = len({r["seed"] for r in rows})
    lines = [f"Val top-1 (%), mean ± std over {seeds} seed(s); every run {settings['steps']} steps of batch "
             f"{settings['batch_size']}; lr " + ", ".join(f"{c} {settings['lr'][c]:g}" for c in contenders) + ".", "",
             "| shots | " + " | ".join(contenders) + " |", "|---:|" + "---:|" * len(contenders)]
    for k in sorted({r["shots"] for r in rows}):
        cells = []
        for c in contenders:
            values = [100 * r["top1"] for r in rows if r["shots"] == k and r["contender"] == c]
            cells.append("{:.1f} ± {:.1f}".format(*_stats(values)) if values else "")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    trainable = {c: next(r["trainable"] for r in rows if r["contender"] == c) for c in contenders}
    lines.append("| trainable | " + " | ".join(f"{trainable[c]:,}" for c in contenders) + " |")
    return "\n".join(lines) + "\n"


def plot_results(rows: list[dict], path: Path) -> None:
    """Val top-1 against shots (log2 axis), one line per contender, error bars = std over seeds."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    shots = sorted({r["shots"] for r in rows})
    for c in [c for c in CONTENDERS if any(r["contender"] == c for r in rows)]:
        ks = [k for k in shots if any(r["shots"] == k and r["contender"] == c for r in rows)]
        stats = [_stats([100 * r["top1"] for r in rows if r["shots"] == k and r["contender"] == c]) for k in ks]
        ax.errorbar(ks, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3, label=c)
    ax.set_xscale("log", base=2)
    ax.set_xticks(shots, [str(k) for k in shots])
    ax.set(xlabel="shots (training images per class)", ylabel="val top-1 (%)", title="few-shot accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_outputs(out: Path, settings: dict, rows: list[dict]) -> None:
    """fewshot.json after every cell; fewshot.md and fewshot.png from the rows so far."""
    write_json(out / RESULTS, {"settings": settings, "rows": rows})
    if rows:
        (out / TABLE).write_text(format_table(rows, settings))
        plot_results(rows, out / PLOT)


# ---- the grid ------------------------------------------------------------------------------------
def fewshot(recipe: dict, out: str | Path, shots: Sequence[int] = (1, 2, 4, 8, 16), seeds: int = 3,
            contenders: Sequence[str] = CONTENDERS, steps: int | None = None,
            lrs: dict[str, float] | None = None) -> list[dict]:
    """Run (or resume) the grid shots x seeds x contenders of a resolved recipe into `out` (see the
    module docstring for the protocol); returns every row of fewshot.json."""
    _check_grid(shots, seeds, contenders)
    contenders = list(dict.fromkeys(contenders))  # `--contenders probe probe` is one contender
    check_task(recipe)
    out = Path(out)
    d = recipe["data"]
    runpaths.keep_apart(out, [d["path"]], [out / "data", out / "runs"])
    train_split, val_split = vdata.scan_folder(d["path"], d["val_fraction"], recipe["train"]["seed"])
    if not val_split.items:
        raise VisloraError(f"data.path {d['path']} has no val split to evaluate on: add ROOT/val or set "
                         "data.val_fraction above 0")
    subsets = {s: sample_shots(train_split, shots, s) for s in range(seeds)}
    if steps is not None and steps < 1:
        raise VisloraError(f"--steps must be >= 1, got {steps}")
    steps = steps or default_steps(recipe, max(shots), len(train_split.classes))
    t = recipe["train"]
    settings = json.loads(json.dumps({"recipe": recipe, "steps": steps, "batch_size": t["batch_size"],
                                      "lr": contender_lrs(recipe, lrs)}))  # as fewshot.json holds them
    out.mkdir(parents=True, exist_ok=True)
    rows = _read_results(out / RESULTS, settings)
    done = {(r["shots"], r["seed"], r["contender"]) for r in rows}
    write_json(out / SUBSETS, {s: {k: [str(p) for p, _ in items] for k, items in by_k.items()}
                               for s, by_k in subsets.items()}, indent=1)
    val_dir = write_folder(val_split.items, val_split.classes, out / "data" / "val")
    grid = [(k, s, c) for s in range(seeds) for k in sorted(set(shots)) for c in contenders]
    progress = Progress(len(grid), sum(cell in done for cell in grid))
    for s in range(seeds):
        for k in sorted(set(shots)):
            todo = [c for c in contenders if (k, s, c) not in done]
            if not todo:
                continue
            train_dir = write_folder(subsets[s][k], train_split.classes, out / "data" / f"seed{s}_shots{k}",
                                     count=steps * t["batch_size"] * t["grad_accum"], seed=s)
            for c in todo:
                cell = cell_recipe(recipe, c, s, train_dir, steps, settings["lr"][c])
                run_dir = out / "runs" / f"shots{k}_seed{s}_{c}"
                tic = time.perf_counter()
                rows.append({"shots": k, "seed": s, "contender": c, **run_cell(cell, run_dir, val_dir),
                             "lr": settings["lr"][c], "steps": steps, "train_images": len(subsets[s][k]),
                             "run_dir": str(run_dir)})
                write_outputs(out, settings, rows)
                progress.done(f"{c} {k}-shot seed {s}: val top-1 {rows[-1]['top1']:.3f}", time.perf_counter() - tic)
            shutil.rmtree(train_dir)
    write_outputs(out, settings, rows)
    return rows


class Progress:
    """One line per finished run of the grid: what it scored, its time and the time left (from this
    call's runs; the runs a resumed grid reads back count as done)."""

    def __init__(self, total: int, done: int):
        self.total, self.count, self.seconds, self.timed = total, done, 0.0, 0

    def done(self, what: str, seconds: float) -> None:
        self.count, self.seconds, self.timed = self.count + 1, self.seconds + seconds, self.timed + 1
        left = (self.total - self.count) * self.seconds / self.timed
        eta = f"ETA {left / 60:.1f} min" if left >= 60 else f"ETA {left:.0f} s"
        print(f"fewshot {self.count}/{self.total}: {what} ({seconds:.0f} s); {eta if left else 'grid done'}",
              flush=True)
