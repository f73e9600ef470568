"""The optional task capabilities (vislora.tasks.OPTIONAL) and the commands that ask for them: footprint measures
detection and segmentation runs through synthetic_batch and the task's loss; fewshot refuses a task without KSHOT."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import yaml

from vislora import tasks
from vislora.cli import main
from vislora.files import read_json
from vislora.footprint import footprint, format_footprint
from vislora.recipe import resolve
from vislora.train import train

TOOLS = Path(__file__).resolve().parents[1] / "tools"
FAST = dict(repeats=2, steps=1, memory=False)
pytestmark = [pytest.mark.filterwarnings("ignore:.*always returns a \\(Losses, Detections\\) tuple:UserWarning")]


def _tool(name: str):
    """A data generator of tools/ (the scenes test_detection.py and test_segmentation.py train on)."""
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Small models on a shared 2-core machine: one thread (conftest.one_thread)."""


def det_recipe(root: Path) -> dict:
    return resolve({"task": "detection", "model": {"name": "test_resnet"}, "adapter": {"r": 4, "targets": "conv"},
                    "detector": {"head": "fcos", "min_size": 64, "max_size": 64, "fpn_channels": 64},
                    "data": {"format": "yolo", "path": str(root), "workers": 0},
                    "train": {"epochs": 1, "batch_size": 4, "warmup_epochs": 0}})


@pytest.fixture(scope="module")
def det_scenes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("det_scenes")
    _tool("make_detection_data").make_scenes(root, 8, 4, 64, seed=0)
    return root


@pytest.fixture(scope="module")
def det_run(det_scenes, tmp_path_factory) -> Path:
    """A LoRA FCOS detector on test_resnet, one epoch of two steps through vislora.train."""
    return train(det_recipe(det_scenes), tmp_path_factory.mktemp("det_run") / "run")


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory) -> Path:
    """A LoRA FPN segmenter on test_resnet, one epoch of two steps through vislora.train, with a train.log logger:
    the loop ends by asking the task for its confusion matrix (segmentation has none: the default None; it used
    to find segmentation_metrics.confusion, imported into the module, and call it with the wrong arguments)."""
    root = tmp_path_factory.mktemp("seg_scenes")
    _tool("make_segmentation_data").make_segmentation_scenes(root, 8, 4, 64, seed=0)
    recipe = resolve({
        "task": "segmentation", "model": {"name": "test_resnet"}, "adapter": {"r": 4, "targets": "conv", "train": []},
        "segmenter": {"head": "fpn", "img_size": 64}, "data": {"path": str(root), "workers": 0},
        "train": {"epochs": 1, "batch_size": 4, "warmup_epochs": 0, "log": ["tensorboard"]}})
    return train(recipe, tmp_path_factory.mktemp("seg_run") / "run")


# ---- the registry's defaults ----------------------------------------------------------------------
def test_optional_capabilities_have_their_defaults_where_a_task_writes_none():
    cls, det, seg = (tasks.get(n) for n in ("classification", "detection", "segmentation"))
    assert det.health({"epoch": 9}, 3) is None and det.example_inputs({}, {}) is None
    assert det.confusion(None, None, None, None, 1) is None and seg.confusion is tasks.OPTIONAL["confusion"]
    assert cls.confusion is not tasks.OPTIONAL["confusion"]  # classification writes its own
    assert (cls.KSHOT, det.KSHOT, seg.KSHOT) == (True, False, False) and tasks.having("KSHOT") == [cls.NAME]
    assert cls.synthetic_batch is tasks.OPTIONAL["synthetic_batch"]  # (images, class indices): the default
    assert det.recipe_classes({"data": {"path": None}}) is None


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_synthetic_batch_is_what_the_collate_makes(name):
    pre = {"input_size": [3, 24, 32], "class_names": ["a", "b", "c"]}
    task = tasks.get(name)
    images, targets = task.synthetic_batch(pre, 2, 0)
    again, _ = task.synthetic_batch(pre, 2, 0)
    assert len(images) == 2 and all(torch.equal(a, b) for a, b in zip(images, again, strict=True))  # seeded
    assert all(tuple(x.shape) == (3, 24, 32) for x in images)
    if name == "detection":  # boxes inside the image, at least 4 px a side; labels 1..3 (0 is background)
        for t in targets:
            boxes = t["boxes"]
            assert (boxes[:, 2:] - boxes[:, :2] >= 4 - 1e-4).all() and (boxes >= 0).all()
            assert (boxes[:, 2] <= 32 + 1e-4).all() and (boxes[:, 3] <= 24 + 1e-4).all()
            assert set(t["labels"].tolist()) <= {1, 2, 3}
    elif name == "segmentation":
        assert targets.shape == (2, 24, 32) and targets.dtype == torch.long and int(targets.max()) < 3
    else:
        assert targets.shape == (2,) and int(targets.max()) < 3


def test_recipe_classes_read_the_declared_names(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "dog").mkdir()
    assert tasks.get("classification").recipe_classes({"data": {"path": str(tmp_path)}}) == ["cat", "dog"]
    assert tasks.get("classification").recipe_classes({"data": {"path": str(tmp_path / "none")}}) is None
    seg = tasks.get("segmentation")
    assert seg.recipe_classes({"data": {"path": str(tmp_path)}}) is None
    (tmp_path / "classes.txt").write_text("background\nsquare\n")
    assert seg.recipe_classes({"data": {"path": str(tmp_path)}}) == ["background", "square"]


# ---- footprint of any task's run ------------------------------------------------------------------
def _check(report: dict, task: str, classes: int) -> None:
    assert report["kind"] == "run" and report["task"] == task and report["num_classes"] == classes
    p = report["params"]
    assert 0 < p["adapter"] <= p["trainable"] < p["total"]
    assert report["compute"]["merged_gflops"] > 0 and report["compute"]["unmerged_overhead_gflops"] > 0
    assert report["bytes"]["adapter_file"] < report["bytes"]["merged_model"]
    assert set(report["latency_ms"]) == {"batch_1", "batch_2"}
    assert report["train"]["lora"]["step_ms"] > 0 and report["train"]["full"]["step_ms"] > 0


def test_footprint_of_a_detection_run(det_run):
    report = footprint(det_run, batch=2, **FAST)
    _check(report, "detection", len(read_json(det_run / "preprocess.json", "")["class_names"]))
    assert report["img_size"] == 64  # the run's input size: detector.min_size
    assert "(run, detection), 64px" in format_footprint(report)


def test_footprint_of_a_segmentation_run_from_the_cli(seg_run, capsys):
    """`vislora footprint RUN` on a segmentation run: the table, peak memory from one subprocess per contender."""
    assert main(["footprint", str(seg_run), "--batch", "2"]) == 0
    table = capsys.readouterr().out
    print(table)
    assert "(run, segmentation), 64px" in table and "peak memory in steps" in table
    report = footprint(seg_run, batch=2, **FAST)
    _check(report, "segmentation", len(read_json(seg_run / "preprocess.json", "")["class_names"]))


# ---- fewshot asks for KSHOT -----------------------------------------------------------------------
def test_fewshot_refuses_a_task_without_kshot_in_one_line(det_scenes, tmp_path, capsys):
    path = tmp_path / "det.yaml"
    recipe = det_recipe(det_scenes)
    path.write_text(yaml.safe_dump({k: recipe[k] for k in ("task", "model", "adapter", "detector", "data")}))
    out = tmp_path / "grid"
    assert main(["fewshot", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "task detection" in err and "classification" in err, err
    assert not out.exists()  # refused before the lock makes --out
