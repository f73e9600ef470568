"""Evaluate and predict with a trained model: a run directory (rebuilt and merged in memory) or an
exported .pt / .onnx file. What the numbers mean is the task's (vislora.tasks); this module only
opens the target."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
import torch.nn as nn

from vislora import exported, rundir, runpaths, tasks
from vislora.adapters import load_adapter
from vislora.errors import VisloraError
from vislora.files import read_json, write_json
from vislora.inject import unload
from vislora.layers import DEFAULT
from vislora.named import set_adapter

EXPORTED_SUFFIXES = (".pt", ".pth", ".jit", ".onnx")


@dataclass
class Opened:
    """A trained model ready to run: its task, the task's predictor, the preprocessing and (runs
    only) the recipe."""

    task: ModuleType
    predictor: Callable
    preprocess: dict
    recipe: dict | None  # a run directory's (None for an exported file)
    source: Path
    run: Path | None = None  # the run directory it is, or that exported it (None: unknown)


def is_exported(target: str | Path) -> bool:
    target = Path(target)
    return target.suffix in EXPORTED_SUFFIXES or (target.is_dir() and not (target / runpaths.RECIPE).is_file())


def open_model(target: str | Path) -> Opened:
    """A run directory (its model rebuilt, adapter merged) or an exported file
    (vislora.exported)."""
    target = Path(target)
    if not target.exists():
        raise FileNotFoundError(f"{target} does not exist (expected a run directory, model.pt or model.onnx)")
    if is_exported(target):
        predictor, preprocess = exported.load_exported(target)
        task = tasks.get(preprocess.get("task"))
        if task.EXPORT["served"]:
            raise VisloraError(f"{target}: {task.EXPORT['served']}")
        return Opened(task, predictor, preprocess, None, target, exporting_run(target))
    model, recipe, preprocess = rundir.load_run(target)
    task = tasks.get(recipe["task"])
    return Opened(task, task.predictor(unload(model)), preprocess, recipe, target, target)


def exporting_run(path: Path) -> Path | None:
    """The run an exported file came from: the one its export.json names, else the run above
    RUN/export/."""
    folder = path if path.is_dir() else path.parent
    report = folder / exported.REPORT_NAME
    named = read_json(report, "export report").get("run") if report.is_file() else None
    for candidate in (named, folder.parent):
        if candidate and runpaths.is_run(Path(candidate)):
            return Path(candidate)
    return None


def run_score(task: ModuleType, run: Path | None) -> dict | None:
    """The run's own figure: its kept epoch's task.SCORE, from train_summary.json (None without
    one)."""
    summary = run / runpaths.SUMMARY if run else None
    if summary is None or not summary.is_file():
        return None
    best = read_json(summary, "training summary").get("best")
    return {"metric": task.SCORE, "value": best, "run": str(run)} if isinstance(best, (int, float)) else None


def default_report_path(opened: Opened) -> Path:
    source = opened.source
    if opened.recipe is not None:
        return source / "eval" / "report.json"
    return source.parent / f"eval_{source.stem}{source.suffix.replace('.', '_')}.json"


def evaluate(target: str | Path, data: str | Path | None = None, out: str | Path | None = None,
             batch_size: int | None = None, workers: int = 2) -> dict:
    """Evaluate a run directory or an exported file on --data (default: the run's val split); writes
    the JSON report (OUT, default RUN/eval/report.json) and the task's plots beside it. batch_size:
    None = the recipe's eval.batch_size (else train.batch_size, else 64)."""
    return evaluate_opened(open_model(target), data, out, batch_size, workers)


def evaluate_opened(opened: Opened, data: str | Path | None = None, out: str | Path | None = None,
                    batch_size: int | None = None, workers: int = 2) -> dict:
    """evaluate() of a model already opened (open_model, or one of open_adapters)."""
    target = opened.source
    if batch_size is None and opened.recipe is not None:
        batch_size = opened.recipe["eval"]["batch_size"] or opened.recipe["train"]["batch_size"]
    out = Path(out) if out else default_report_path(opened)
    out.parent.mkdir(parents=True, exist_ok=True)
    recipe = opened.recipe
    if recipe is None and data is None and opened.run is not None:  # an exported file: its run's val split
        recipe = runpaths.read_recipe(opened.run)
    report = opened.task.evaluate(opened.predictor, opened.preprocess, recipe, data, out, batch_size or 64, workers,
                                  run_dir=opened.run)
    report["source"], report["task"] = str(target), opened.task.NAME
    if data is None:
        report["run_score"] = run_score(opened.task, opened.run)
    write_json(out, report)
    report["written"] = {"folder": str(out.parent),  # what the CLI lists; not in the JSON file
                         "files": sorted(p.name for p in out.parent.glob(out.stem + "*") if p.is_file())}
    return report


def predictions_dir(target: str | Path) -> Path:
    """Where predict writes without --out: predictions/ in the run, or beside the exported file."""
    target = Path(target)
    return (target.parent if is_exported(target) else target) / "predictions"


def predict(target: str | Path, images: Sequence[str | Path], topk: int = 5, out: str | Path | None = None
            ) -> tuple[ModuleType, list[dict]]:
    """The task's predictions for image files, from a run directory or an exported file; (task,
    results). Files a task writes (predictions.csv, segmentation masks) go to `out`, default
    predictions/ beside the model."""
    opened = open_model(target)
    out = Path(out) if out is not None else predictions_dir(target)
    return opened.task, opened.task.predict(opened.predictor, opened.preprocess, list(images), topk=topk,
                                            out_dir=out)


# ---- several runs of one base: one model in memory, each run's adapter in turn -------------------
def _run_parts(run: Path) -> tuple[dict, dict]:
    """(recipe, preprocess) of a run that carries an adapter (named adapters need one)."""
    if not (run / runpaths.ADAPTER).is_dir():
        raise VisloraError(f"--adapter {run}: not an adapter run (no {runpaths.ADAPTER}/ in it, e.g. full "
                         "fine-tuning or an exported file): give it as the model, alone")
    return runpaths.read_recipe(run), read_json(run / runpaths.PREPROCESS, "run's preprocessing")


def _base(recipe: dict, preprocess: dict) -> nn.Module:
    """The plain base a run was trained from, built as training built it."""
    with torch.random.fork_rng(devices=[]):
        return tasks.get(recipe["task"]).build_model(recipe, preprocess["class_names"])


def _check_same_base(reference: dict, other: dict, trained: list[str], run: Path, first: Path) -> None:
    """Every base tensor outside the runs' trained modules (heads ...) equal: one base can serve
    both runs."""
    prefixes = tuple(f"{m}." for m in trained)
    for key, tensor in reference.items():
        if key.startswith(prefixes):
            continue
        theirs = other.get(key)
        if theirs is None or theirs.shape != tensor.shape or not torch.equal(theirs, tensor):
            raise VisloraError(f"--adapter {run} was trained on another base than {first} (its '{key}' differs: "
                             "model name, checkpoint or init seed): predict or evaluate them apart")


def open_adapters(runs: Sequence[str | Path]) -> Iterator[Opened]:
    """Runs that share a base, with one base in memory: each run's adapter (and trained head) loaded
    beside the first's, then made active in turn. Each Opened holds until the next one is
    yielded."""
    runs = [Path(r) for r in runs]
    parts = [_run_parts(run) for run in runs]
    model, _, _ = rundir.load_run(runs[0])
    reference = _base(*parts[0]).state_dict()
    names = [DEFAULT] + [f"run{i}" for i in range(1, len(runs))]
    for run, (recipe, preprocess), name in zip(runs[1:], parts[1:], names[1:], strict=True):
        if recipe["task"] != parts[0][0]["task"]:
            raise VisloraError(f"--adapter {run} is a {recipe['task']} run, {runs[0]} a {parts[0][0]['task']} run: "
                             "one base serves runs of one task")
        load_adapter(model, run / runpaths.ADAPTER, name=name)
        trained = model.vislora_adapters[name].train + model.vislora_adapters[DEFAULT].train
        _check_same_base(reference, _base(recipe, preprocess).state_dict(), trained, run, runs[0])
    for run, (recipe, preprocess), name in zip(runs, parts, names, strict=True):
        set_adapter(model, name)
        task = tasks.get(recipe["task"])
        yield Opened(task, task.predictor(model), preprocess, recipe, run, run)


def predict_each(runs: Sequence[str | Path], images: Sequence[str | Path], topk: int = 5,
                 out: str | Path | None = None) -> Iterator[tuple[Opened, list[dict]]]:
    """predict() for several runs of one base (open_adapters): files in OUT/<run name>, default
    RUN/predictions."""
    for opened in open_adapters(runs):
        folder = Path(out) / opened.source.name if out is not None else predictions_dir(opened.source)
        yield opened, opened.task.predict(opened.predictor, opened.preprocess, list(images), topk=topk,
                                          out_dir=folder)
