"""vislora.rundir: the rules of --out (what --force may remove, the lock, data folders outputs stay out of), the
epoch's files and resuming them, and strict JSON."""

import hashlib
import json
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from vislora import rundir, runpaths
from vislora.cli import main
from vislora.data import make_synthetic_folder
from vislora.evaluate import evaluate
from vislora.recipe import resolve
from vislora.tasks import classification, segmentation
from vislora.train import train

from zoo import best_top1, write_recipe

TINY = {"model": {"name": "vit_tiny_patch16_224", "pretrained": False,
                  "kwargs": {"img_size": 32, "patch_size": 8, "depth": 1}},
        "adapter": {"r": 2, "targets": "vit"},
        "train": {"epochs": 1, "batch_size": 8, "warmup_epochs": 0}}
USER_NAMES = ("export", "eval", "checkpoints", "predictions", "adapter")  # folders a user may own under these names
USER_FILES = ("recipe.yaml", "metrics.jsonl", "curves.png", "classes.json", "spectrum.png", "weights.safetensors")


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under folder with the hash of its bytes (links followed)."""
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_synthetic_folder(tmp_path_factory.mktemp("rundir") / "images", classes=3, per_class=8, size=32)


def recipe_file(folder: Path, images: Path, **train) -> Path:
    recipe = {**TINY, "data": {"path": str(images), "img_size": 32, "workers": 0},
              "train": {**TINY["train"], **train}}
    path = folder / f"r{len(list(folder.glob('r*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


# ---- never touch a user's files -----------------------------------------------------------------
def test_force_leaves_a_users_file_of_every_reserved_name_untouched(tmp_path, images, capsys):
    user = tmp_path / "mine"
    for name in USER_NAMES:
        (user / name).mkdir(parents=True)
        (user / name / "notes.txt").write_text(f"my {name}")
    for name in USER_FILES:
        (user / name).write_text(f"my {name}")
    before = snapshot(user)
    assert main(["train", str(recipe_file(tmp_path, images)), "--out", str(user), "--force"]) == 2
    assert "not a vislora run" in capsys.readouterr().err
    assert snapshot(user) == before
    # in a real run, --force removes vislora's files and keeps the user's own
    run = tmp_path / "run"
    assert main(["train", str(recipe_file(tmp_path, images)), "--out", str(run)]) == 0
    (run / "my_notes.txt").write_text("keep me")
    assert main(["train", str(recipe_file(tmp_path, images)), "--out", str(run), "--force"]) == 0
    assert (run / "my_notes.txt").read_text() == "keep me" and (run / runpaths.MARKER).is_file()


def test_force_with_another_adapter_replaces_the_old_run(tmp_path, split_images):
    lora = write_recipe(tmp_path / "lora.yaml", split_images, {"r": 4, "targets": "vit"})
    probe = write_recipe(tmp_path / "probe.yaml", split_images, "linear_probe", epochs=1)
    run = tmp_path / "run"
    assert main(["train", str(lora), "--out", str(run)]) == 0
    (run / "notes.txt").write_text("mine")  # a file vislora did not write survives --force
    assert main(["train", str(probe), "--out", str(run), "--force"]) == 0
    assert not (run / "adapter").exists() and (run / "weights.safetensors").is_file()
    assert (run / "notes.txt").read_text() == "mine"
    assert evaluate(run, out=tmp_path / "r.json")["top1"] == best_top1(run)


WRITES_INTO_DATA = [  # (id, argv from (tmp, data folder)): each would write inside --data
    ("train-out-is-data", lambda t, d: ["train", str(t / "r.yaml"), "--data", str(d), "--out", str(d)]),
    ("train-out-inside-data", lambda t, d: ["train", str(t / "r.yaml"), "--data", str(d), "--out", str(d / "run")]),
    ("fewshot-out-is-data", lambda t, d: ["fewshot", str(t / "r.yaml"), "--data", str(d), "--out", str(d),
                                          "--shots", "1", "--seeds", "1", "--contenders", "probe"]),
    ("fewshot-data-under-out", lambda t, d: ["fewshot", str(t / "r.yaml"), "--data", str(d), "--out",
                                             str(d.parent), "--shots", "1", "--seeds", "1", "--contenders", "probe"]),
    ("eval-report-inside-data", lambda t, d: ["eval", str(t / "run"), "--data", str(d), "--out",
                                              str(d / "class_0" / "report.json")]),
]


@pytest.mark.parametrize("argv", [c[1] for c in WRITES_INTO_DATA], ids=[c[0] for c in WRITES_INTO_DATA])
def test_no_command_writes_inside_its_data(tmp_path, argv, capsys):
    data = make_synthetic_folder(tmp_path / "D" / "data", classes=3, per_class=6, size=32, split=True)
    recipe_file(tmp_path, data).rename(tmp_path / "r.yaml")
    if "eval" in argv(tmp_path, data):
        assert main(["train", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run")]) == 0
    before = snapshot(data)
    capsys.readouterr()
    assert main(argv(tmp_path, data)) == 2
    assert "data folder" in capsys.readouterr().err
    assert snapshot(data) == before


def test_segmentation_predict_never_overwrites_an_input(tmp_path):
    a, a_mask = tmp_path / "a.png", tmp_path / "a_mask.png"
    Image.fromarray(np.full((16, 16, 3), 80, np.uint8)).save(a)
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(a_mask)
    original = a_mask.read_bytes()
    preprocess = {"input_size": [3, 16, 16], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear",
                  "crop_pct": 1.0, "class_names": ["background", "thing"]}
    results = segmentation.predict(lambda x: np.zeros((len(x), 2, 16, 16), np.float32), preprocess, [a, a_mask],
                                   out_dir=tmp_path)
    assert a_mask.read_bytes() == original
    assert [Path(r["mask"]).name for r in results] == ["a_mask_1.png", "a_mask_mask.png"]


# ---- the lock -----------------------------------------------------------------------------------
def _hold(run_dir: str, ready, release, result) -> None:
    try:
        with runpaths.locked(Path(run_dir)):
            ready.set()
            release.wait(20)
            result.put("held")
    except ValueError as e:
        ready.set()
        result.put(str(e))


def test_a_second_training_into_the_same_out_is_refused_naming_the_lock(tmp_path, images, capsys):
    ctx = multiprocessing.get_context("fork")
    ready, release, result = ctx.Event(), ctx.Event(), ctx.Queue()
    holder = ctx.Process(target=_hold, args=(str(tmp_path / "run"), ready, release, result))
    holder.start()
    assert ready.wait(20)
    try:
        assert main(["train", str(recipe_file(tmp_path, images)), "--out", str(tmp_path / "run")]) == 2
        assert runpaths.LOCK in capsys.readouterr().err
    finally:
        release.set()
        holder.join(20)
    assert result.get(timeout=5) == "held" and not (tmp_path / "run" / runpaths.LOCK).exists()


def test_two_lockers_at_once_one_wins_and_a_dead_processs_lock_is_taken_over(tmp_path):
    ctx = multiprocessing.get_context("fork")
    release, result = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_hold, args=(str(tmp_path / "run"), ctx.Event(), release, result)) for _ in range(2)]
    for p in procs:
        p.start()
    time.sleep(2)
    release.set()
    for p in procs:
        p.join(20)
    outcomes = [result.get(timeout=5) for _ in procs]
    assert outcomes.count("held") == 1 and any(runpaths.LOCK in o for o in outcomes), outcomes
    dead = ctx.Process(target=time.sleep, args=(0,))
    dead.start()
    dead.join()
    (tmp_path / "run" / runpaths.LOCK).write_text(f"{dead.pid}@{os.uname().nodename}")
    with runpaths.locked(tmp_path / "run"):
        assert (tmp_path / "run" / runpaths.LOCK).read_text() == f"{os.getpid()}@{os.uname().nodename}"


# ---- epochs, interruptions, resume --------------------------------------------------------------
@pytest.mark.parametrize("where", ["after-log", "after-last-checkpoint"])
def test_ctrl_c_at_an_epochs_files_then_resume_logs_every_epoch_once(tmp_path, images, monkeypatch, where):
    recipe = resolve(yaml.safe_load(recipe_file(tmp_path, images, epochs=3).read_text()))
    real_log, real_save, calls = rundir.log_epoch, rundir.atomic_save, {"log": 0, "last": 0}

    def log_then_stop(run_dir, history, *args):
        real_log(run_dir, history, *args)
        calls["log"] += 1
        if calls["log"] == 2 and where == "after-log":
            raise KeyboardInterrupt

    def save_then_stop(obj, path):
        real_save(obj, path)
        calls["last"] += path.name == "last.pt"
        if calls["last"] == 2 and path.name == "last.pt" and where == "after-last-checkpoint":
            raise KeyboardInterrupt

    monkeypatch.setattr(rundir, "log_epoch", log_then_stop)
    monkeypatch.setattr(rundir, "atomic_save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train(recipe, tmp_path / "run")
    monkeypatch.undo()
    train(recipe, tmp_path / "run", resume=True)
    rows = rundir.read_metrics(tmp_path / "run")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    summary = json.loads((tmp_path / "run" / runpaths.SUMMARY).read_text())
    assert evaluate(tmp_path / "run", out=tmp_path / "e.json")["top1"] == summary["best"] == max(
        r["val_top1"] for r in rows)


def test_a_run_without_val_writes_standard_json(tmp_path, images):
    recipe = resolve({**yaml.safe_load(recipe_file(tmp_path, images).read_text()),
                      "data": {"path": str(images), "img_size": 32, "workers": 0, "val_fraction": 0.0}})
    train(recipe, tmp_path / "run")

    def strict(text: str):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))

    assert strict((tmp_path / "run" / runpaths.SUMMARY).read_text())["best"] is None
    for line in (tmp_path / "run" / runpaths.METRICS).read_text().splitlines():
        strict(line)


def test_resume_with_other_loader_workers_is_refused_by_name(tmp_path, images, capsys):
    path = recipe_file(tmp_path, images)
    assert main(["train", str(path), "--out", str(tmp_path / "run")]) == 0
    assert main(["train", str(path), "--out", str(tmp_path / "run"), "--resume", "--set", "data.workers=1"]) == 2
    assert "data.workers" in capsys.readouterr().err


def test_a_checkpoint_that_is_not_one_is_one_line(tmp_path, images):
    """Unreadable, truncated or code-carrying last.pt files: rundir.load_checkpoint names the file."""
    (tmp_path / "run" / runpaths.CHECKPOINTS).mkdir(parents=True)
    last = tmp_path / "run" / runpaths.CHECKPOINTS / "last.pt"
    torch.save({"epoch": 1, "model": {}, "optimizer": {}, "f": classification.loss}, last)  # a pickled function
    with pytest.raises(ValueError, match="last.pt is not a training checkpoint"):
        rundir.load_checkpoint(tmp_path / "run")
    last.write_bytes(last.read_bytes()[:100])
    with pytest.raises(ValueError, match="last.pt is not a training checkpoint"):
        rundir.load_checkpoint(tmp_path / "run")


def test_a_checkpoint_from_before_the_variant_seam_still_resumes(tmp_path, images):
    """Checkpoints written before DoRA named the factors `<layer>.lora_A`; today `<layer>.updates.default.lora_A`."""
    path = recipe_file(tmp_path, images, epochs=2)
    assert main(["train", str(path), "--out", str(tmp_path / "run"), "--set", "train.epochs=1"]) == 0
    last = tmp_path / "run" / rundir.CHECKPOINTS / "last.pt"
    state = torch.load(last, weights_only=True)
    state["model"] = {k.replace(".updates.default.", "."): v for k, v in state["model"].items()}
    assert any(k.endswith(".lora_A") and "updates" not in k for k in state["model"])
    torch.save(state, last)
    assert rundir.load_checkpoint(tmp_path / "run")["model"].keys() == \
        {k.replace(".lora_", ".updates.default.lora_") for k in state["model"]}
