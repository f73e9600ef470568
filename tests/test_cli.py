"""The command line, as a user types it: train, export, predict and eval on the exported files."""

import json

import pytest
import yaml

from vislora.cli import main
from vislora.data import make_synthetic_folder


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    folder = make_synthetic_folder(tmp / "images", classes=3, per_class=10, size=32, split=True)
    recipe = {"model": {"name": "test_efficientnet", "pretrained": False},
              "adapter": {"r": 4, "targets": "conv"},
              "data": {"path": str(folder), "img_size": 32, "workers": 0},
              "train": {"epochs": 1, "batch_size": 8, "warmup_epochs": 0}}
    (tmp / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", str(tmp / "r.yaml"), "--out", str(tmp / "run")]) == 0
    assert main(["export", str(tmp / "run"), "--format", "all"]) == 0
    return tmp


def test_export_report(run):
    report = json.loads((run / "run/export/export.json").read_text())
    for fmt in ("torchscript", "onnx"):
        assert report[fmt]["max_abs_diff"] <= 1e-4 and report[fmt]["bytes"] > 0
    assert report["cost"]["base_parameters"] == report["cost"]["merged_parameters"]
    assert (run / "run/export/preprocess.json").is_file()


@pytest.mark.parametrize("model", ["run", "run/export/model.pt", "run/export/model.onnx"])
def test_predict_and_eval_on_each_file(run, model, capsys):
    image = next((run / "images/val/class_0").iterdir())
    assert main(["predict", str(run / model), str(image), str(run / "missing.png"), "--topk", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out[0]["top"]) == 2 and "error" in out[1]
    out_json = run / f"eval_{model.replace('/', '_')}.json"
    assert main(["eval", str(run / model), "--data", str(run / "images"), "--out", str(out_json)]) == 0
    report = json.loads(out_json.read_text())
    assert report["num_images"] == len(list((run / "images/val").rglob("*.png"))) and 0 <= report["top1"] <= 1


def test_errors_are_clear(run, capsys):
    assert main(["train", str(run / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err
    assert main(["train", str(run / "r.yaml"), "--out", str(run / "run")]) == 2  # refuses to overwrite a run


def test_lowrank_penalty_spectrum_and_extract(tmp_path, capsys):
    """Training with the Frobenius penalty logs it; spectrum reads the run; extract turns a full fine-tune
    into an adapter with per-layer energy and error (exact at full rank)."""
    folder = make_synthetic_folder(tmp_path / "images", classes=3, per_class=8, size=32)
    vit = {"name": "vit_tiny_patch16_224", "pretrained": False,
           "kwargs": {"img_size": 32, "patch_size": 8, "depth": 1}}
    common = {"model": vit, "data": {"path": str(folder), "img_size": 32, "workers": 0}}
    train = {"epochs": 1, "batch_size": 8, "warmup_epochs": 0}
    (tmp_path / "lora.yaml").write_text(yaml.safe_dump({**common, "adapter": {"r": 4, "targets": "vit"},
                                                        "train": {**train, "lowrank_penalty": 0.1, "factor_l2": 1e-4}}))
    (tmp_path / "full.yaml").write_text(yaml.safe_dump({**common, "adapter": None, "train": train}))
    assert main(["train", str(tmp_path / "lora.yaml"), "--out", str(tmp_path / "lora")]) == 0
    assert main(["train", str(tmp_path / "full.yaml"), "--out", str(tmp_path / "full")]) == 0
    row = json.loads((tmp_path / "lora/metrics.jsonl").read_text().splitlines()[0])
    assert row["penalty"] > 0
    assert main(["spectrum", str(tmp_path / "lora")]) == 0
    assert (tmp_path / "lora/spectrum.png").is_file() and "blocks.0.attn.qkv" in capsys.readouterr().out
    assert main(["extract", "--tuned", str(tmp_path / "full"), "--rank", "full", "--targets", "vit",
                 "--out", str(tmp_path / "extracted")]) == 0
    report = json.loads((tmp_path / "extracted/extract_report.json").read_text())
    assert all(r["rel_error"] < 1e-5 for r in report if not r["unchanged"])
    assert (tmp_path / "extracted/adapter_model.safetensors").is_file()
