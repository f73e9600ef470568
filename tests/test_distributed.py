"""Two processes on CPU (torchrun, gloo): same adapter on both ranks, one complete run directory."""

import json
import subprocess
import sys

import yaml

from vislora.data import make_synthetic_folder
from vislora.evaluate import evaluate


def test_two_process_training(tmp_path):
    folder = make_synthetic_folder(tmp_path / "images", classes=3, per_class=15, size=32)  # 9 val images: odd
    recipe = {
        "model": {"name": "vit_tiny_patch16_224", "pretrained": False,
                  "kwargs": {"img_size": 32, "patch_size": 8, "depth": 1}},
        "adapter": {"r": 4, "targets": "vit"},
        "data": {"path": str(folder), "img_size": 32, "workers": 0},
        "train": {"epochs": 2, "batch_size": 8, "lr": 3e-3, "warmup_epochs": 0},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    cmd = [sys.executable, "-m", "vislora", "train", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run"),
           "--nproc", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["max_rank_difference"] == 0.0
    for name in ("recipe.yaml", "classes.json", "metrics.jsonl", "curves.png", "adapter/adapter_model.safetensors",
                 "checkpoints/last.pt"):
        assert (tmp_path / "run" / name).is_file(), name
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    # validation over the exact val set (no sample padded in twice): `vislora eval` in one process agrees
    report = evaluate(tmp_path / "run", out=tmp_path / "eval.json")
    assert report["num_images"] == 9 and report["top1"] == max(r["val_top1"] for r in rows)


def test_a_diverging_two_process_run_stops_in_one_line(tmp_path):
    """Every rank stops at the same step (the finite check is all-reduced); rank 0 says why in one line, exit 2,
    and no rank or launcher prints a traceback."""
    folder = make_synthetic_folder(tmp_path / "images", classes=3, per_class=10, size=32)
    recipe = {"model": {"name": "vit_tiny_patch16_224", "pretrained": False, "head_init": "timm",
                        "kwargs": {"img_size": 32, "patch_size": 8, "depth": 1}},
              "adapter": {"r": 2, "targets": "vit"}, "data": {"path": str(folder), "img_size": 32, "workers": 0},
              "train": {"epochs": 2, "batch_size": 2, "lr": 1e30, "warmup_epochs": 0}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    cmd = [sys.executable, "-m", "vislora", "train", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run"),
           "--nproc", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    errors = [line for line in result.stderr.replace("\r", "\n").splitlines() if "error" in line.lower()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout and len(errors) == 1, result.stderr[-3000:]
    assert "train.lr" in errors[0]
