"""A new user's first hour (issue #31): the run's own split for exported files, predict on folders and globs,
the pictures and files eval and train write, progress lines, a quiet export."""

import csv
import json
import warnings

import pytest
import yaml
from PIL import Image

from vislora.cli import main
from vislora.data import make_synthetic_folder
from vislora.rundir import shown_metrics

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


def test_predict_takes_folders_and_globs_and_writes_predictions_csv(run, capsys):
    photos = run / "photos"
    (photos / "sub").mkdir(parents=True)
    images = sorted((run / "flat" / "class_1").glob("*.png"))[:3]
    for i, source in enumerate(images):
        ((photos / "sub") if i == 2 else photos).joinpath(f"p{i}.png").write_bytes(source.read_bytes())
    (photos / "notes.txt").write_text("not an image")  # skipped: a folder gives its images
    assert main(["predict", str(run / "run"), str(photos), "--topk", "2"]) == 0
    out = capsys.readouterr().out
    assert "3 image(s) predicted" in out and "notes.txt" not in out
    with open(run / "run" / "predictions" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == [str(photos / "p0.png"), str(photos / "p1.png"), str(photos / "sub/p2.png")]
    assert all(r["predicted"] == r["top2"].split()[0] and 0 < float(r["p"]) <= 1 for r in rows)
    assert main(["predict", str(run / "run" / "export" / "model.onnx"), str(photos / "**" / "*.png")]) == 0
    with open(run / "run" / "export" / "predictions" / "predictions.csv") as f:
        assert len(list(csv.DictReader(f))) == 3


def test_eval_writes_predictions_errors_recall_and_row_fractions(run, capsys):
    assert main(["eval", str(run / "run")]) == 0
    assert "report_errors.png" in capsys.readouterr().out
    folder = run / "run" / "eval"
    report = json.loads((folder / "report.json").read_text())
    with open(folder / "report_predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == report["num_images"] == 8
    split = json.loads((run / "run" / "split.json").read_text())
    assert [r["path"] for r in rows] == [p for p, _ in split["val"]]
    assert sum(r["true"] == r["predicted"] for r in rows) == round(report["top1"] * 8)
    assert all(r["top4"].split()[0] == r["predicted"] for r in rows)
    wrong = sum(r["true"] != r["predicted"] for r in rows)
    assert report["errors_shown"] == min(wrong, 16)
    for name in ("report_errors.png", "report_recall.png", "report_confusion_norm.png", "report_confusion.png"):
        assert (folder / name).stat().st_size > 1000, name


def test_training_draws_its_inputs_and_curves_without_a_meaningless_top5(run):
    with Image.open(run / "run" / "train_batch.png") as im:
        assert im.size[0] > 500
    row = {"train_acc": 0.5, "val_loss": 1.0, "val_top1": 0.5, "val_top5": 1.0, "val_predicted_classes": 3}
    assert shown_metrics(row, 4) == ["train_acc", "val_top1"]
    assert shown_metrics(row, 10) == ["train_acc", "val_top1", "val_top5"]


def test_export_prints_a_short_table_without_tracer_warnings(run, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["export", str(run / "run"), "--format", "torchscript", "--out", str(run / "ts")]) == 0
    out = capsys.readouterr().out
    assert not [w for w in caught if "Tracer" in w.category.__name__], [str(w.message) for w in caught]
    assert out.splitlines()[0].split()[:4] == ["runtime", "file", "size", "max"] and "{" not in out
    assert "alternating rounds" in out and f"exported to {run / 'ts'}" in out
    cost = json.loads((run / "ts" / "export.json").read_text())["cost"]
    low, high = cost["latency_ratio_range"]
    assert low <= cost["latency_ratio"] <= high and cost["latency_rounds"] == 5


def test_training_ends_with_what_it_kept(run, capsys):
    assert main(["train", str(run / "r.yaml"), "--out", str(run / "again"), "--set", "train.epochs=1"]) == 0
    closing = [line for line in capsys.readouterr().out.splitlines() if line.startswith("vislora: best val_top1")]
    assert len(closing) == 1 and "at epoch 1 (kept), last" in closing[0] and closing[0].endswith(" s")


def test_the_adapter_has_a_card_and_keeps_vislora_fields_out_of_peft_config(run):
    adapter = run / "run" / "adapter"
    card = (adapter / "README.md").read_text()
    assert card.startswith("---\nbase_model: vit_tiny_patch16_224\nlibrary_name: peft")
    assert "4 classes: class_0, class_1, class_2, class_3" in card and "Licence of the base weights" in card
    assert "val_top1" in card and "val_top5" not in card and str(run / "run" / "recipe.yaml") in card
    assert "vislora" not in json.loads((adapter / "adapter_config.json").read_text())
    assert (adapter / "vislora.json").is_file()
