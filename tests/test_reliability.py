"""What eval, predict and the saved files report is what training saw (issue 14's silent wrong results)."""

import json
import os

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

import vislora
from vislora import LoraConfig, inject, load_adapter, lora_layers, save_adapter
from vislora.cli import main
from vislora.data import make_synthetic_folder, preprocess_config
from vislora.evaluate import evaluate, predict
from vislora.recipe import load_recipe, resolve
from vislora.tasks import backbone, classification

VIT = {"name": "vit_tiny_patch16_224", "pretrained": False, "kwargs": {"img_size": 32, "patch_size": 8, "depth": 1}}


def write_recipe(path, folder, adapter, **train):
    recipe = {"model": VIT, "adapter": adapter,
              "data": {"path": str(folder), "img_size": 32, "workers": 0, "augment": {"scale": [0.8, 1.0]}},
              "train": {"epochs": 2, "batch_size": 8, "lr": 3e-3, "warmup_epochs": 0, **train}}
    path.write_text(yaml.safe_dump(recipe))
    return path


def best_top1(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return max(r["val_top1"] for r in rows)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_synthetic_folder(tmp_path_factory.mktemp("images"), classes=3, per_class=12, size=32, split=True)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, folder):
    """LoRA on a random-init base (pretrained: false, no checkpoint), trained and exported through the CLI."""
    tmp = tmp_path_factory.mktemp("run")
    recipe = write_recipe(tmp / "r.yaml", folder, {"r": 4, "targets": "vit"})
    assert main(["train", str(recipe), "--out", str(tmp / "run")]) == 0
    assert main(["export", str(tmp / "run")]) == 0
    return tmp / "run"


def test_eval_reproduces_the_reported_top1_on_a_random_init_base(lora_run, folder, tmp_path):
    reported = best_top1(lora_run)
    first = evaluate(lora_run, out=tmp_path / "a.json")["top1"]
    second = evaluate(lora_run, out=tmp_path / "b.json")["top1"]
    assert first == second == reported
    for exported in ("model.pt", "model.onnx"):  # the deployed files keep it
        assert evaluate(lora_run / "export" / exported, data=folder, out=tmp_path / "x.json")["top1"] == reported


def test_force_with_another_adapter_replaces_the_old_run(tmp_path, folder):
    lora = write_recipe(tmp_path / "lora.yaml", folder, {"r": 4, "targets": "vit"})
    probe = write_recipe(tmp_path / "probe.yaml", folder, "linear_probe", epochs=1)
    run = tmp_path / "run"
    assert main(["train", str(lora), "--out", str(run)]) == 0
    (run / "notes.txt").write_text("mine")  # a file vislora did not write survives --force
    assert main(["train", str(probe), "--out", str(run), "--force"]) == 0
    assert not (run / "adapter").exists() and (run / "weights.safetensors").is_file()
    assert (run / "notes.txt").read_text() == "mine"
    assert evaluate(run, out=tmp_path / "r.json")["top1"] == best_top1(run)


def _twins(tmp_path):
    """An upright photo and its EXIF-rotated twin (pixels stored sideways, orientation 6), a 16-bit PNG and its
    8-bit twin."""
    rng = np.random.default_rng(0)
    base = np.zeros((40, 30, 3), np.uint8)
    base[5:20, 4:12] = (230, 40, 40)
    base[25:35, 15:28] = (40, 200, 60)
    base += rng.integers(0, 30, base.shape, dtype=np.uint8)
    Image.fromarray(base).save(tmp_path / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": store the pixels rotated 90 CCW
    Image.fromarray(np.rot90(base, 1).copy()).save(tmp_path / "rotated.png", exif=exif)
    gray = base.mean(2).astype(np.uint8)
    Image.fromarray(gray).save(tmp_path / "gray8.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "gray16.png")
    return [tmp_path / n for n in ("upright.png", "rotated.png", "gray8.png", "gray16.png")]


@pytest.mark.parametrize("target", ["run", "export/model.pt", "export/model.onnx"])
def test_predict_reads_images_as_training_does(lora_run, tmp_path, target):
    paths = _twins(tmp_path)
    _, results = predict(lora_run if target == "run" else lora_run / target, paths, topk=3)
    probs = [dict(r["top"]) for r in results]
    for a, b in ((0, 1), (2, 3)):
        assert max(abs(probs[a][c] - probs[b][c]) for c in probs[a]) <= 1e-3, (paths[a].name, paths[b].name)
    assert max(abs(probs[0][c] - probs[2][c]) for c in probs[0]) > 1e-4  # the twins are not all the same picture


def test_file_scaling_wins_over_an_injected_model(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=3).eval()
    inject(model, LoraConfig(targets="conv", r=4, alpha=32, rslora=True))
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.normal_(std=0.05)
    save_adapter(model, tmp_path)
    torch.manual_seed(0)
    other = timm.create_model("resnet18", pretrained=False, num_classes=3).eval()
    inject(other, LoraConfig(targets="conv", r=4, alpha=4))  # same shapes, other alpha and no rslora
    load_adapter(other, tmp_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (other(x) - model(x)).abs().max().item() <= 1e-5


def test_anchored_alpha_pattern_round_trip_in_vislora_and_peft(tmp_path):
    """targets 'conv1' adapts the stem conv1 and every layerN.M.conv1; the stem alone gets another alpha."""
    from peft import PeftModel

    def build():
        torch.manual_seed(0)
        return timm.create_model("resnet18", pretrained=False, num_classes=3).eval()

    model = build()
    inject(model, LoraConfig(targets=["conv1"], r=4, alpha=8, alpha_pattern={"^conv1$": 64}, rank_pattern={
        "^layer1\\.0\\.conv1$": 2}))
    assert {n: (layer.alpha, layer.r) for n, layer in lora_layers(model)}["conv1"] == (64, 4)
    assert {n: layer.alpha for n, layer in lora_layers(model)}["layer1.0.conv1"] == 8
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.normal_(std=0.05)
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert all(k.startswith("^") and k.endswith("$") for k in {**cfg["alpha_pattern"], **cfg["rank_pattern"]})
    fresh = load_adapter(build(), tmp_path)
    assert {n: (ly.alpha, ly.r) for n, ly in lora_layers(fresh)} == {n: (ly.alpha, ly.r) for n, ly in
                                                                      lora_layers(model)}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (fresh(x) - model(x)).abs().max().item() <= 1e-5
        assert (PeftModel.from_pretrained(build(), tmp_path).eval()(x) - model(x)).abs().max().item() <= 1e-5


def test_grad_accum_larger_than_an_epoch_still_steps(tmp_path, folder):
    recipe = write_recipe(tmp_path / "r.yaml", folder, {"r": 4, "targets": "vit"}, grad_accum=50)
    assert main(["train", str(recipe), "--out", str(tmp_path / "run")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # one step per epoch, on its last batch
    state = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)["model"]
    b = [v for k, v in state.items() if k.endswith("lora_B")]  # step 1 trained the zero head, step 2 the adapters
    assert b and all(v.abs().max() > 0 for v in b)


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


def test_options_are_read(tmp_path, folder, monkeypatch):
    """eval.topk, the recipe's export section and eval --batch-size all take effect."""
    recipe = write_recipe(tmp_path / "r.yaml", folder, {"r": 4, "targets": "vit"}, epochs=1)
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--out", str(run), "--set", "eval.topk=2",
                 "--set", "export.formats=[torchscript]", "--set", "export.opset=18"]) == 0
    assert main(["export", str(run)]) == 0
    assert (run / "export/model.pt").is_file() and not (run / "export/model.onnx").exists()
    import vislora.data as vdata

    sizes, real = [], vdata.build_loader
    monkeypatch.setattr(vdata, "build_loader", lambda ds, bs, *a, **k: sizes.append(bs) or real(ds, bs, *a, **k))
    report = evaluate(run, out=tmp_path / "e.json", batch_size=3)
    assert "top2" in report and "top5" not in report and sizes == [3]


def test_relative_paths_resolve_against_the_recipe_or_the_working_directory(tmp_path, folder, monkeypatch):
    repo = os.getcwd()
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(os.path.join(repo, "recipes/demo_vit_lora.yaml"))
    assert recipe["data"]["path"] == os.path.join(repo, "data", "mnist")
    assert recipe["model"]["checkpoint"] == os.path.join(repo, "data", "vit_fmnist.safetensors")
    (tmp_path / "work").mkdir()
    os.symlink(folder, tmp_path / "work" / "imgs")
    write_recipe(tmp_path / "r.yaml", "unused", {"r": 4, "targets": "vit"}, epochs=1)
    monkeypatch.chdir(tmp_path / "work")
    assert main(["train", "../r.yaml", "--data", "imgs", "--out", "run"]) == 0  # --data: the working directory
    saved = yaml.safe_load((tmp_path / "work/run/recipe.yaml").read_text())
    assert saved["data"]["path"] == str(tmp_path / "work" / "imgs")
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "work/run", "--out", "e.json"]) == 0  # evaluated from another folder


def test_inject_on_meta_device_and_reentrant_checkpointing():
    with torch.device("meta"):
        model = timm.create_model("vit_tiny_patch16_224", num_classes=3, **VIT["kwargs"])
    inject(model, LoraConfig(r=4))  # no verify: a meta model has no numbers
    assert model(torch.randn(2, 3, 32, 32, device="meta")).shape == (2, 3)
    timm.layers.set_reentrant_ckpt(True)
    try:
        model = timm.create_model("vit_tiny_patch16_224", num_classes=3, **VIT["kwargs"])
        inject(model, LoraConfig(r=4))
        model.set_grad_checkpointing(True)
        model.train()(torch.randn(2, 3, 32, 32)).sum().backward()
        assert all(layer.lora_A.grad is not None for _, layer in lora_layers(model))
        vislora.unload(model)
        assert not model._forward_pre_hooks
    finally:
        timm.layers.set_reentrant_ckpt(False)


# ---- the first run (issue 13) ----------------------------------------------------------------------
def test_a_new_head_starts_at_zero_and_a_loaded_one_is_kept_only_for_its_own_classes(tmp_path):
    def build(model, classes):
        return classification.build_model(resolve({"model": model}), classes)

    abc = ["a", "b", "c"]
    assert all(p.abs().sum() == 0 for p in build(VIT, abc).get_classifier().parameters())
    assert any(p.abs().sum() > 0 for p in build({**VIT, "head_init": "timm"}, abc).get_classifier().parameters())
    source = timm.create_model("vit_tiny_patch16_224", num_classes=3, **VIT["kwargs"])
    weights = {**VIT, "checkpoint": str(tmp_path / "w.safetensors")}
    save_file(source.state_dict(), weights["checkpoint"])
    # no card: nothing says what the file's 3 outputs mean, so the head is new (zero); the body is loaded
    unknown = build(weights, abc)
    assert unknown.get_classifier().weight.abs().sum() == 0
    assert torch.equal(unknown.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    (tmp_path / "w.json").write_text(json.dumps({"classes": abc}))
    same = build(weights, abc)  # the card names these classes, in this order: the file's head is kept
    assert torch.equal(same.get_classifier().weight, source.get_classifier().weight)
    for classes in (["c", "b", "a"], ["x", "y", "z"], ["a", "b", "c", "d", "e"]):  # other order, names or size
        assert build(weights, classes).get_classifier().weight.abs().sum() == 0, classes
    assert classification.head_notes(weights | {"head_init": "zero"}, abc) == []  # kept: nothing to say
    note = classification.head_notes(weights | {"head_init": "zero"}, ["x", "y", "z"])
    assert len(note) == 1 and "w.safetensors" in note[0] and "3 other classes" in note[0]


def test_collapse_warning_fires_on_a_forced_collapse_and_not_on_a_healthy_run(tmp_path, folder):
    healthy = write_recipe(tmp_path / "ok.yaml", folder, {"r": 4, "targets": "vit"}, epochs=3)
    assert main(["train", str(healthy), "--out", str(tmp_path / "ok")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "ok/metrics.jsonl").read_text().splitlines()]
    assert not any("warning" in r for r in rows)
    # a huge lr on a tiny CNN with timm's random head: the features die, the loss sits at ln 3
    collapse = {"model": {"name": "test_efficientnet", "head_init": "timm"}, "adapter": {"r": 4, "targets": "conv"},
                "data": {"path": str(folder), "img_size": 32, "workers": 0},
                "train": {"epochs": 3, "batch_size": 8, "lr": 3.0, "warmup_epochs": 0, "clip_grad": 1.0}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(collapse))
    assert main(["train", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "bad")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "bad/metrics.jsonl").read_text().splitlines()]
    assert any("collapsed" in r.get("warning", "") and "train.lr" in r["warning"] for r in rows), rows
    collapsed = {"epoch": 1, "train_loss": 1.0986, "train_logit_std": 0.001}  # ln 3, constant logits
    assert classification.health(collapsed, 3)
    assert classification.health({"epoch": 1, "train_loss": 0.4, "train_logit_std": 2.0, "val_top1": 0.9,
                                  "val_predicted_classes": 3}, 3) is None


def test_resume_from_the_command_line_uses_the_runs_own_recipe(tmp_path, folder, monkeypatch):
    from vislora.tasks import classification

    recipe = write_recipe(tmp_path / "r.yaml", folder, {"r": 4, "targets": "vit"})
    real, calls = classification.validate, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(classification, "validate", interrupted)
    assert main(["train", str(recipe), "--out", str(tmp_path / "run")]) == 130  # Ctrl-C in epoch 2
    monkeypatch.setattr(classification, "validate", real)
    recipe.unlink()  # the run's own recipe.yaml is all --resume needs
    assert main(["train", "--resume", "--out", str(tmp_path / "run")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]


def test_a_local_checkpoint_brings_its_cards_preprocessing(tmp_path):
    """WEIGHTS.json beside a checkpoint (as import_weights.py and pretrain.py write it) is its pretrained_cfg."""
    source = timm.create_model("vit_tiny_patch16_224", num_classes=3, **VIT["kwargs"])
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    (tmp_path / "w.json").write_text(json.dumps({"pretrained_cfg": {"mean": [0.1, 0.2, 0.3], "crop_pct": 1.0}}))
    recipe = resolve({"model": {**VIT, "checkpoint": str(tmp_path / "w.safetensors")}, "data": {"std": [2, 2, 2]}})
    pre = preprocess_config(classification.build_model(recipe, ["a", "b", "c"]), {"std": recipe["data"]["std"]})
    assert pre["mean"] == (0.1, 0.2, 0.3) and pre["crop_pct"] == 1.0 and pre["std"] == (2.0, 2.0, 2.0)
    body = backbone.create_body(recipe["model"])  # detection's and segmentation's backbone
    assert body.pretrained_cfg["mean"] == [0.1, 0.2, 0.3] and "state_dict" not in body.pretrained_cfg
