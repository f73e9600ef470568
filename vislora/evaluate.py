"""Evaluate and predict with a trained model: a run directory (rebuilt and merged in memory) or an exported
.pt / .onnx file. What the numbers mean is the task's (vislora.tasks); this module only opens the target."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from vislora import rundir, runpaths, serve, tasks
from vislora.files import read_json, write_json
from vislora.inject import unload

EXPORTED_SUFFIXES = (".pt", ".pth", ".jit", ".onnx")


@dataclass
class Opened:
    """A trained model ready to run: its task, the task's predictor, the preprocessing and (runs only) the recipe."""

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
    """A run directory (its model rebuilt, adapter merged) or an exported file (vislora.serve)."""
    target = Path(target)
    if not target.exists():
        raise FileNotFoundError(f"{target} does not exist (expected a run directory, model.pt or model.onnx)")
    if is_exported(target):
        predictor, preprocess = serve.load_exported(target)
        task = tasks.get(preprocess.get("task"))
        if task.EXPORT["served"]:
            raise ValueError(f"{target}: {task.EXPORT['served']}")
        return Opened(task, predictor, preprocess, None, target, exporting_run(target))
    model, recipe, preprocess = rundir.load_run(target)
    task = tasks.get(recipe["task"])
    return Opened(task, task.predictor(unload(model)), preprocess, recipe, target, target)


def exporting_run(path: Path) -> Path | None:
    """The run an exported file came from: the one its export.json names, else the run above RUN/export/."""
    folder = path if path.is_dir() else path.parent
    report = folder / serve.REPORT_NAME
    named = read_json(report, "export report").get("run") if report.is_file() else None
    for candidate in (named, folder.parent):
        if candidate and runpaths.is_run(Path(candidate)):
            return Path(candidate)
    return None


def run_score(task: ModuleType, run: Path | None) -> dict | None:
    """The run's own figure: its kept epoch's task.SCORE, from train_summary.json (None without one)."""
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
    """Evaluate a run directory or an exported file on --data (default: the run's val split); writes the JSON
    report (OUT, default RUN/eval/report.json) and the task's plots beside it.
    batch_size: None = the recipe's eval.batch_size (else train.batch_size, else 64)."""
    opened = open_model(target)
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
    """The task's predictions for image files, from a run directory or an exported file; (task, results). Files a
    task writes (predictions.csv, segmentation masks) go to `out`, default predictions/ beside the model."""
    opened = open_model(target)
    out = Path(out) if out is not None else predictions_dir(target)
    return opened.task, opened.task.predict(opened.predictor, opened.preprocess, list(images), topk=topk,
                                            out_dir=out)
