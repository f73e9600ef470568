"""End to end: recipe -> train -> eval -> resume, on a generated folder with odd files, tiny ViT and tiny CNN."""

import json

import pytest
import torch
from safetensors.torch import load_file

import vislora.train as vtrain
from vislora import knobs
from vislora.cli import main
from vislora.data import make_synthetic_folder
from vislora.evaluate import evaluate
from vislora.recipe import load_recipe, resolve
from vislora.rundir import load_run

from zoo import interrupt_validation, write_recipe

VIT = {"name": "vit_tiny_patch16_224", "pretrained": False, "kwargs": {"img_size": 32, "patch_size": 8, "depth": 2}}
CNN = {"name": "test_efficientnet", "pretrained": False, "kwargs": {}}


def recipe_for(model, adapter, path, **train):
    return resolve({
        "model": model, "adapter": adapter,
        "data": {"path": str(path), "img_size": 32, "workers": 0, "augment": {"scale": [0.8, 1.0]}},
        "train": {"epochs": 3, "batch_size": 16, "lr": 3e-3, "warmup_epochs": 0, "seed": 0, **train},
    })


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_synthetic_folder(tmp_path_factory.mktemp("images"), classes=3, per_class=16, size=32, oddities=True)


@pytest.mark.parametrize("model,adapter", [
    (VIT, {"r": 4, "targets": "vit"}),
    (CNN, {"r": 4, "targets": "conv"}),
    (VIT, "linear_probe"),
    (CNN, None),
], ids=["vit-lora", "cnn-lora-depthwise", "vit-probe", "cnn-full"])
def test_train_then_eval(tmp_path, folder, model, adapter):
    run = vtrain.train(recipe_for(model, adapter, folder), tmp_path / "run")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    for name in ("recipe.yaml", "classes.json", "preprocess.json", "curves.png", "checkpoints/last.pt",
                 "checkpoints/best.pt", "train_summary.json"):
        assert (run / name).is_file(), name
    assert (run / "adapter" / "adapter_model.safetensors").is_file() or (run / "weights.safetensors").is_file()
    report = evaluate(run, out=tmp_path / "report.json")
    for key in ("top1", "top5", "macro_f1", "per_class", "confusion_matrix", "num_images"):
        assert key in report
    assert 0 <= report["top1"] <= 1 and report["num_images"] > 0
    assert (tmp_path / "report_confusion.csv").is_file() and (tmp_path / "report_confusion.png").is_file()


@pytest.mark.parametrize("head_epochs,min_steps", [(0, None), (2, None), (0, 20)],
                         ids=["one-stage", "in-the-head-stage", "small-folder-repeated"])
def test_resume_after_interrupt_matches_uninterrupted(tmp_path, folder, monkeypatch, head_epochs, min_steps):
    """Ctrl-C after epoch 1, then --resume: the same weights as the uninterrupted run; with head_epochs 2 the
    interruption falls inside the head stage (LP-FT), which resumes at its own step of the schedule; with
    min_steps each epoch passes over the folder several times."""
    recipe = recipe_for(VIT, {"r": 4, "targets": "vit"}, folder, head_epochs=head_epochs, min_steps=min_steps)
    vtrain.train(recipe, tmp_path / "straight")
    restore_validate = interrupt_validation(monkeypatch)  # Ctrl-C in epoch 2, after epoch 1's checkpoint
    with pytest.raises(KeyboardInterrupt):
        vtrain.train(recipe, tmp_path / "resumed")
    restore_validate()
    first = torch.load(tmp_path / "resumed/checkpoints/last.pt", weights_only=True)
    assert first["epoch"] == 1
    lora_b = [v for k, v in first["model"].items() if k.endswith("lora_B")]
    assert lora_b and all((b.abs().sum() == 0) == (head_epochs > 0) for b in lora_b)  # only the head moved
    load_run(tmp_path / "resumed")  # the interrupted run is loadable
    vtrain.train(recipe, tmp_path / "resumed", resume=True)
    a = torch.load(tmp_path / "straight/checkpoints/last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed/checkpoints/last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_nan_loss_stops_with_message(tmp_path, folder):
    recipe = recipe_for(VIT, {"r": 4, "targets": "vit"}, folder, lr=1e30, epochs=2)
    recipe["model"]["head_init"] = "timm"  # a random head makes the huge lr blow up at once
    with pytest.raises(vtrain.TrainingDiverged, match="no checkpoint exists"):  # it diverged in epoch 1
        vtrain.train(recipe, tmp_path / "run")


def test_recipes_validate_and_name_unknown_keys(tmp_path):
    from pathlib import Path

    for path in sorted(Path("recipes").glob("*.yaml")):
        load_recipe(path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: resnet18}\ntrain: {epochs: 1, learning_rate: 0.1}\n")
    with pytest.raises(ValueError, match="train.learning_rate"):
        load_recipe(bad)
    recipe = load_recipe(Path("recipes/vit_lora.yaml"), ["train.lr=3e-4", "adapter.r=4", "model.pretrained=false"])
    assert recipe["train"]["lr"] == 3e-4 and recipe["adapter"]["r"] == 4 and recipe["model"]["pretrained"] is False


def test_adapt_hook_runs_peft_through_the_same_loop(tmp_path, folder):
    peft = pytest.importorskip("peft")

    def adapt(model, recipe):
        return peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["qkv"], modules_to_save=["head"]))

    run = vtrain.train(recipe_for(VIT, None, folder, epochs=2), tmp_path / "run", adapt=adapt)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "train_summary.json").read_text())["summary"]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert summary["adapted_layers"] == 0 and 0 < summary["trainable_share"] < 0.5  # PEFT's layers, not ours
    assert (run / "weights.safetensors").is_file()


def test_checkpoint_head_of_other_size_is_dropped(tmp_path, folder):
    import timm
    from safetensors.torch import save_file

    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **VIT["kwargs"])
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    model = dict(VIT, checkpoint=str(tmp_path / "w.safetensors"))
    run = vtrain.train(recipe_for(model, {"r": 4, "targets": "vit"}, folder, epochs=1), tmp_path / "run")
    state = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert state["base_model.model.head.weight"].shape[0] == 3


def test_detection_run_end_to_end(tmp_path):
    """The same loop, CLI pieces and run format for a detector: train, eval (mAP report), TorchScript export."""
    import importlib.util

    from vislora.export import export_run

    spec = importlib.util.spec_from_file_location("make_detection_data", "tools/make_detection_data.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.make_scenes(tmp_path / "scenes", 12, 6, 64, seed=0)
    torch.set_num_threads(1)
    recipe = resolve({
        "task": "detection",
        "model": {"name": "test_resnet", "pretrained": False},
        "adapter": {"r": 4, "targets": "conv"},
        "detector": {"head": "fcos", "min_size": 64, "max_size": 64, "fpn_channels": 64},
        "data": {"format": "yolo", "path": str(tmp_path / "scenes"), "workers": 0,
                 "augment": {"scale": [0.7, 1.0], "color_jitter": 0.1}},
        "train": {"epochs": 3, "batch_size": 4, "lr": 1e-3, "warmup_epochs": 0},
    })
    run = vtrain.train(recipe, tmp_path / "run")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert 0 <= rows[-1]["val_map50"] <= 1
    report = evaluate(run, out=tmp_path / "det.json")
    assert {"map", "map50", "map75", "per_class"} <= set(report)
    assert (tmp_path / "det_boxes.png").is_file()
    exported = export_run(run, formats="torchscript")  # verifies the scripted boxes against the merged model
    assert exported["torchscript"]["max_abs_diff"] <= 1e-4
    assert exported["cost"]["base_parameters"] == exported["cost"]["merged_parameters"]


def test_head_stage_schedule_and_its_limits():
    """LP-FT's schedule: the head alone at head_lr (its own warmup and cosine) for head_steps, the rest at 0; then
    every group from a fresh warmup. head_steps 0 is the plain warmup + cosine."""
    plain = [knobs.warmup_cosine(s, 100, 10, 0.0) for s in range(100)]
    assert [knobs.staged(h, s, 100, 0, 10, 0.0, 5.0) for h in (True, False) for s in range(100)] == plain * 2
    head = [knobs.staged(True, s, 100, 20, 10, 0.0, 5.0) for s in range(100)]
    body = [knobs.staged(False, s, 100, 20, 10, 0.0, 5.0) for s in range(100)]
    assert body[:20] == [0.0] * 20 and head[:20] == [5.0 * knobs.warmup_cosine(s, 20, 10, 0.0) for s in range(20)]
    assert head[20:] == body[20:] == [knobs.warmup_cosine(s, 80, 10, 0.0) for s in range(80)]
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))  # no classifier to train first
    t = resolve({"train": {"head_epochs": 1, "epochs": 3}})["train"]
    with pytest.raises(ValueError, match="train.head_epochs"):
        vtrain.build_optimizer(model, t, steps_per_epoch=4)
    t = resolve({"train": {"head_epochs": 0}})["train"]
    assert len(vtrain.build_optimizer(model, t, steps_per_epoch=4)[0].param_groups) == 2


# ---- the CLI's runs (issue 14) ------------------------------------------------------------------------
def test_grad_accum_larger_than_an_epoch_still_steps(tmp_path, split_images):
    recipe = write_recipe(tmp_path / "r.yaml", split_images, {"r": 4, "targets": "vit"}, grad_accum=50)
    assert main(["train", str(recipe), "--out", str(tmp_path / "run")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # one step per epoch, on its last batch
    state = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)["model"]
    b = [v for k, v in state.items() if k.endswith("lora_B")]  # step 1 trained the zero head, step 2 the adapters
    assert b and all(v.abs().max() > 0 for v in b)


def test_min_steps_passes_over_a_small_folder_several_times_an_epoch(tmp_path, split_images):
    recipe = write_recipe(tmp_path / "r.yaml", split_images, {"r": 4, "targets": "vit"}, min_steps=9)
    assert main(["train", str(recipe), "--out", str(tmp_path / "run")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] >= 9 and rows[-1]["step"] == 2 * rows[0]["step"]  # every epoch passes as often


def test_no_val_split_keeps_the_last_epoch(tmp_path, capsys):
    flat = make_synthetic_folder(tmp_path / "flat", classes=3, per_class=6, size=32)
    recipe = write_recipe(tmp_path / "r.yaml", flat, {"r": 4, "targets": "vit"})
    assert main(["train", str(recipe), "--out", str(tmp_path / "run"), "--set", "data.val_fraction=0"]) == 0
    assert "no val split" in capsys.readouterr().out
    summary = json.loads((tmp_path / "run/train_summary.json").read_text())
    assert summary["kept"] == "last" and summary["epochs"] == 2
    assert main(["eval", str(tmp_path / "run")]) == 2
    assert "no val split" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "run"), "--data", str(flat), "--out", str(tmp_path / "e.json")]) == 0


def test_resume_from_the_command_line_uses_the_runs_own_recipe(tmp_path, split_images, monkeypatch):
    recipe = write_recipe(tmp_path / "r.yaml", split_images, {"r": 4, "targets": "vit"})
    restore_validate = interrupt_validation(monkeypatch)
    assert main(["train", str(recipe), "--out", str(tmp_path / "run")]) == 130  # Ctrl-C in epoch 2
    restore_validate()
    recipe.unlink()  # the run's own recipe.yaml is all --resume needs
    assert main(["train", "--resume", "--out", str(tmp_path / "run")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
