"""Run directories before anything heavy is imported: their file names, the rules of `--out` (a
folder, apart from the data; `train --force` replaces only a run vislora wrote), the lock a training
holds, and whether a run can be resumed. Standard library and vislora.recipe (YAML) only, so the CLI
checks all of this before torch loads; vislora.rundir writes and reads what is in the folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path

from vislora.errors import VisloraError
from vislora.files import write_json
from vislora.recipe import differences, read_yaml, resolve

RECIPE, CLASSES, PREPROCESS, SUMMARY = "recipe.yaml", "classes.json", "preprocess.json", "train_summary.json"
ADAPTER, WEIGHTS, CHECKPOINTS = "adapter", "weights.safetensors", "checkpoints"
METRICS, CURVES, SPLIT, TRAIN_BATCH = "metrics.jsonl", "curves.png", "split.json", "train_batch.png"
# vislora.loggers': timm's per-epoch CSV, and the optional loggers' folders (train.log)
SUMMARY_CSV, LOGGER_DIRS = "summary.csv", ("tensorboard", "mlruns", "wandb", "loggers.json")
MARKER, LOCK = ".vislora_run", ".vislora.lock"  # "vislora wrote this run"; "a training is writing it now"
# everything vislora writes into a run directory: `train --force` removes these, in a run (MARKER)
# and nowhere else
ARTIFACTS = (RECIPE, CLASSES, PREPROCESS, SUMMARY, ADAPTER, WEIGHTS, CHECKPOINTS, METRICS, CURVES, SPLIT, TRAIN_BATCH,
             "eval", "export",
             "spectrum.png", "spectrum.json", "predictions", "shrink_report.json", METRICS + ".tmp", WEIGHTS + ".tmp",
             SUMMARY_CSV, *LOGGER_DIRS, MARKER)
# recipe fields a resumed run may change: they do not change what is trained (data.workers does:
# each worker count gives other augmentation streams; train.log only adds a logger)
RESUMABLE_CHANGES = ("train.device", "train.log", "eval.", "export.")


# ---- the rules of --out --------------------------------------------------------------------------
def is_run(path: Path) -> bool:
    """A folder vislora wrote a run into: its marker, or (runs before the marker) recipe.yaml +
    preprocess.json."""
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
    """No command writes into its data: `out` must not be a data folder or lie inside one, and no
    folder the command replaces (`replaced`, e.g. fewshot's OUT/data) may hold the data."""
    for folder in (Path(d) for d in data if d):
        if not folder.is_dir():
            continue
        if within(out, folder) or any(within(folder, r) for r in replaced):
            raise VisloraError(f"{flag} {out} would write into the data folder {folder}: vislora never writes into "
                             "its data (nor trains on its own outputs); choose an --out outside it")


def check_out(run_dir: Path, data: Sequence[str | Path | None], resume: bool, force: bool) -> None:
    """train's --out: a folder (not a file), apart from the data; a folder with files is refused
    unless --resume continues it or --force replaces it, and --force replaces only a run (it never
    deletes a user's files)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise VisloraError(f"--out {run_dir} is a file, not a folder: choose a folder for the run")
    keep_apart(run_dir, data, [run_dir / name for name in ARTIFACTS])
    if resume or not holds_files(run_dir):
        return
    if not is_run(run_dir):
        raise VisloraError(f"--out {run_dir} holds files and is not a vislora run: choose an empty or new folder "
                         "(--force replaces only a run vislora wrote, never other files)")
    if not force:
        raise VisloraError(f"{run_dir} already holds a run: pass --resume to continue it, --force to replace it "
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
    """A lock left by a process of this machine that no longer runs (killed before it could remove
    it)."""
    pid, _, host = holder.partition("@")
    return host == socket.gethostname() and pid.isdigit() and not _alive(int(pid))


@contextlib.contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """Hold RUN/.vislora.lock (created atomically, O_EXCL) while training writes the run: a second
    training into the same folder is refused naming the lock. Re-entrant in one process; a dead
    process's lock is taken over."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path, mine = run_dir / LOCK, f"{os.getpid()}@{socket.gethostname()}"
    fd = _take(path, mine, run_dir)
    if fd is None:  # this process holds it already (yielded outside any except: no chained tracebacks)
        yield
        return
    with os.fdopen(fd, "w") as f:
        f.write(mine)
    try:
        yield
    finally:
        if path.is_file() and path.read_text().strip() == mine:
            path.unlink()


def _take(path: Path, mine: str, run_dir: Path) -> int | None:
    """Create the lock file and return its descriptor; None when this process holds it already."""
    for _ in range(2):
        try:
            return os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = path.read_text().strip() if path.is_file() else ""
        if holder == mine:
            return None
        if not _stale(holder):
            raise VisloraError(f"{path} is held by process {holder or '?'}: another training is writing "
                             f"{run_dir}; wait for it, or remove {path} if no such process runs")
        path.unlink(missing_ok=True)
    raise VisloraError(f"{path}: could not take the lock")


# ---- starting, clearing, resuming ----------------------------------------------------------------
def clear(run_dir: Path) -> list[str]:
    """Remove a previous run's artifacts (only the names vislora writes, and only in a run); returns
    them."""
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


def mark(run_dir: Path) -> None:
    """The marker that says vislora wrote this run (what lets --force replace it)."""
    write_json(run_dir / MARKER, {"written_by": "vislora", "artifacts": list(ARTIFACTS)})


def read_recipe(run_dir: str | Path) -> dict:
    path = Path(run_dir) / RECIPE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a vislora run directory: no {RECIPE}")
    return resolve(read_yaml(path), str(path))


def check_resumable(run_dir: Path, recipe: dict) -> None:
    """--resume needs the run's checkpoint and the run's own recipe: a field that changes what is
    trained (the adapter's rank, the data, the model ...) is an error naming every such field."""
    if not (run_dir / CHECKPOINTS / "last.pt").is_file():
        raise FileNotFoundError(f"--resume: {run_dir / CHECKPOINTS / 'last.pt'} does not exist, so there is "
                                "nothing to resume (train without --resume to start the run)")
    changed = [d for d in differences(read_recipe(run_dir), recipe) if not d.startswith(RESUMABLE_CHANGES)]
    if changed:
        raise VisloraError(f"--resume: the recipe differs from {run_dir / RECIPE} in {'; '.join(changed)}. Resume with "
                         "the run's own recipe (vislora train --resume --out RUN), or train into a new --out")
