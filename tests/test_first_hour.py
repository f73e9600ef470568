"""A new user's first hour (issue #31): the run's own split for exported files, predict on folders and globs,
the pictures and files eval and train write, progress lines, a quiet export."""

import json

import pytest
import yaml

from vislora.cli import main
from vislora.data import make_synthetic_folder

TINY = {"model": {"name": "vit_tiny_patch16_224", "pretrained": False,
                  "kwargs": {"img_size": 32, "patch_size": 8, "depth": 1}},
        "adapter": {"r": 4, "targets": "vit"},
        "train": {"epochs": 2, "batch_size": 8, "warmup_epochs": 0}}


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread):
    """One run on a flat ROOT/<class> folder (split 80/20 by the recipe), exported to both formats."""
    tmp = tmp_path_factory.mktemp("first_hour")
    folder = make_synthetic_folder(tmp / "flat", classes=4, per_class=10, size=32)
    (tmp / "r.yaml").write_text(yaml.safe_dump({**TINY, "data": {"path": str(folder), "img_size": 32,
                                                                 "workers": 0}}))
    assert main(["train", str(tmp / "r.yaml"), "--out", str(tmp / "run")]) == 0
    assert main(["export", str(tmp / "run"), "--format", "all"]) == 0
    return tmp


def test_a_flat_folder_run_records_its_split(run):
    split = json.loads((run / "run" / "split.json").read_text())
    assert len(split["train"]) + len(split["val"]) == 40 and len(split["val"]) == 8
    assert not {p for p, _ in split["train"]} & {p for p, _ in split["val"]}


@pytest.mark.parametrize("model", ["model.onnx", "model.pt"])
def test_an_exported_file_without_data_scores_the_runs_val_split(run, model, capsys):
    assert main(["eval", str(run / "run" / "export" / model)]) == 0
    out = capsys.readouterr().out
    report = json.loads((run / "run" / "export" / f"eval_{model.replace('.', '_')}.json").read_text())
    best = json.loads((run / "run" / "train_summary.json").read_text())["best"]
    assert report["num_images"] == 8 and report["top1"] == pytest.approx(best, abs=1e-9)
    assert "the run's val split" in out and "the run reported val_top1" in out


def test_data_on_a_flat_folder_says_it_scores_every_image(run, capsys):
    assert main(["eval", str(run / "run" / "export" / "model.onnx"), "--data", str(run / "flat")]) == 0
    out = capsys.readouterr().out
    assert "all 40 images" in out and "train images count too" in out
