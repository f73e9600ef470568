"""Logs the usual tools read (issue #27): summary.csv in every run (timm's per-epoch columns), and
the loggers train.log names: TensorBoard event files, MLflow (a local file store in the run) and
Weights & Biases (offline). Each optional package is imported by its logger's constructor, which
first checks it is there: a named logger that is not installed is one line naming the pip package,
and none is a dependency of vislora.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import tempfile
import uuid
from pathlib import Path

from vislora import image
from vislora.defaults import LOGGERS
from vislora.errors import VisloraError
from vislora.files import atomic_write, read_json, write_json
from vislora.runpaths import LOGGER_DIRS, SUMMARY_CSV
from vislora.tasks.common import plot_confusion

TENSORBOARD, MLRUNS, WANDB, IDS = LOGGER_DIRS  # folders in the run, and the file of the loggers' run ids


def require(name: str, module: str) -> None:
    """The logger's package is installed, else one line naming the pip package."""
    if importlib.util.find_spec(module) is None:
        raise VisloraError(f"train.log: {name} is not installed: pip install {LOGGERS[name]}")


def numbers(row: dict) -> dict[str, float]:
    """The finite numbers of a metrics row (no flags, warnings or nested records)."""
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}


def summary_columns(history: list[dict]) -> list[str]:
    """timm's summary.csv columns where the task has them: epoch, train_loss, eval_* (from val_*),
    lr."""
    evals = [k for row in history for k in row if k.startswith("val_")]
    return ["epoch", "train_loss", *dict.fromkeys("eval_" + k[4:] for k in evals), "lr"]


def write_summary(run_dir: Path, history: list[dict]) -> Path:
    """summary.csv: one row per epoch of the whole history (rewritten, then renamed: --resume keeps
    it whole)."""
    columns = summary_columns(history)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            for row in history:
                values = {"epoch": row["epoch"], "train_loss": row.get("train_loss"), "lr": row.get("lr"),
                          **{"eval_" + k[4:]: v for k, v in row.items() if k.startswith("val_")}}
                writer.writerow(["" if values.get(c) is None else values[c] for c in columns])

    return atomic_write(run_dir / SUMMARY_CSV, write)


class TensorBoard:
    """Event files in RUN/tensorboard (torch's SummaryWriter): scalars by optimizer step, the images
    at the end. A resumed run purges what the interrupted one logged after its checkpoint."""

    def __init__(self, run_dir: Path, recipe: dict, resume_step: int | None, ids: dict):
        require("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / TENSORBOARD),
                                    purge_step=resume_step + 1 if resume_step is not None else None)

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def image(self, name: str, path: Path, step: int) -> None:
        self.writer.add_image(name, image.read_image(path), step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class MLflow:
    """An MLflow run in a local file store, RUN/mlruns (experiment "vislora"; no server, no
    database): the recipe's fields as params, metrics by step, images as artifacts. --resume
    continues the same MLflow run."""

    def __init__(self, run_dir: Path, recipe: dict, resume_step: int | None, ids: dict):
        require("mlflow", "mlflow")
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store, in maintenance
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=(run_dir / MLRUNS).resolve().as_uri())
        found = self.client.get_experiment_by_name("vislora")
        experiment = found.experiment_id if found else self.client.create_experiment("vislora")
        self.run_id = ids.get("mlflow") or self.client.create_run(experiment, run_name=run_dir.name).info.run_id
        ids["mlflow"] = self.run_id
        if resume_step is None:
            for key, value in flat(recipe).items():
                self.client.log_param(self.run_id, key, str(value)[:500])

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.client.log_metric(self.run_id, f"{prefix}/{key}", value, step=step)

    def image(self, name: str, path: Path, step: int) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandB:
    """A Weights & Biases run in offline mode (RUN/wandb, no network: `wandb sync` uploads it
    later), the recipe as its config; --resume continues the same run id."""

    def __init__(self, run_dir: Path, recipe: dict, resume_step: int | None, ids: dict):
        require("wandb", "wandb")
        import wandb

        self.wandb = wandb
        ids.setdefault("wandb", uuid.uuid4().hex[:8])
        self.run = wandb.init(project="vislora", name=run_dir.name, dir=str(run_dir), mode="offline",
                              id=ids["wandb"], resume="allow", config=recipe, reinit="create_new")

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        self.run.log({f"{prefix}/{k}": v for k, v in values.items()}, step=step)

    def image(self, name: str, path: Path, step: int) -> None:
        self.run.log({name: self.wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        self.run.finish()


SINKS = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB}


def flat(tree: dict, prefix: str = "") -> dict:
    """A nested recipe as dotted keys: MLflow's params."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class Loggers:
    """What the loop logs, on rank 0: summary.csv every epoch, and to each train.log logger the
    step's scalars (train/*), the epoch's (epoch/*) and, at the end, the images (a classifier's val
    confusion matrix)."""

    def __init__(self, recipe: dict, run_dir: Path, resume_step: int | None, main: bool):
        self.run_dir, self.main, self.sinks = Path(run_dir), main, []
        if not main:
            return
        ids_file = self.run_dir / IDS
        ids = read_json(ids_file, "loggers' run ids") if resume_step is not None and ids_file.is_file() else {}
        self.sinks = [SINKS[name](self.run_dir, recipe, resume_step, ids) for name in recipe["train"]["log"]]
        if ids:
            write_json(ids_file, ids)

    def step(self, step: int, row: dict) -> None:
        for sink in self.sinks:
            sink.scalars("train", numbers(row), step)

    def epoch(self, history: list[dict]) -> None:
        if not self.main:
            return
        write_summary(self.run_dir, history)
        for sink in self.sinks:
            sink.scalars("epoch", numbers(history[-1]), int(history[-1]["step"]))

    def finish(self, step: int, confusion: list[list[int]] | None, classes: list[str]) -> None:
        """The confusion matrix PNG as an image, then every logger closed."""
        if confusion is not None and self.sinks:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "confusion_matrix.png"
                plot_confusion(confusion, classes, path)
                for sink in self.sinks:
                    sink.image("confusion_matrix", path, step)
        for sink in self.sinks:
            sink.close()
