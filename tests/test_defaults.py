"""The defaults' safety rules (issues #30, #31): the lr by adapter preset, the collapse warning (silent during
warm-up, naming the lr and a ready command) and the recovery from a collapse (restore the best epoch, go on at a
lower lr), including --resume inside a recovery. Tiny generated data and models without pretrained weights."""

import json

import pytest
import torch

import vislora.train as vtrain
from vislora.data import make_synthetic_folder
from vislora.defaults import LORA_CONV_LR, MODE_DEFAULTS
from vislora.recipe import resolve
from vislora.tasks import classification

VIT = {"name": "vit_tiny_patch16_224", "pretrained": False, "kwargs": {"img_size": 32, "patch_size": 8, "depth": 1}}
LR = 3e-3


def recipe_for(folder, **train):
    return resolve({
        "model": VIT, "adapter": {"r": 4, "targets": "vit"},
        "data": {"path": str(folder), "img_size": 32, "workers": 0, "augment": {"scale": [0.8, 1.0]}},
        "train": {"epochs": 3, "batch_size": 8, "lr": LR, "warmup_epochs": 0, "seed": 0, **train},
    })


def rows_of(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(autouse=True)
def no_plots(monkeypatch, one_thread):
    """curves.png after every epoch is most of a tiny run's time; nothing here looks at it."""
    monkeypatch.setattr(vtrain.rundir, "plot_curves", lambda history, path, **kwargs: path.write_bytes(b""))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_synthetic_folder(tmp_path_factory.mktemp("images"), classes=3, per_class=12, size=32, split=True)


@pytest.fixture
def sabotage(monkeypatch):
    """Epochs 2 and 3 end with a head that gives every image class 0: a real collapse for the health check."""
    real = vtrain.train_epoch

    def train_epoch(loop, epoch):
        row = real(loop, epoch)
        if epoch in (1, 2):
            with torch.no_grad():
                head = loop.model.get_classifier()
                head.weight.zero_()
                head.bias.copy_(torch.tensor([1e3, 0.0, 0.0]))
        return row

    monkeypatch.setattr(vtrain, "train_epoch", train_epoch)


def test_default_lr_depends_on_mode_and_on_where_lora_sits():
    def lr(adapter, **train):
        return resolve({"adapter": adapter, "train": train})["train"]["lr"]

    assert lr({"targets": "vit"}) == lr({"targets": "all-linear"}) == MODE_DEFAULTS["lora"]
    assert lr({"targets": "conv1x1"}) == MODE_DEFAULTS["lora"]  # 2e-3 cost it up to 1.9 points
    assert lr({"targets": "conv"}) == lr({"targets": "all"}) == lr({"targets": ["attn.qkv"]}) == LORA_CONV_LR
    assert LORA_CONV_LR < MODE_DEFAULTS["lora"]
    assert lr(None) == MODE_DEFAULTS["full"] and lr("linear_probe") == MODE_DEFAULTS["linear_probe"]
    assert lr({"targets": "conv"}, lr=0.1) == 0.1  # a recipe's own lr is kept


def test_on_collapse_is_checked():
    assert resolve({})["train"]["on_collapse"] == "recover"
    with pytest.raises(ValueError, match="train.on_collapse"):
        resolve({"train": {"on_collapse": "restart"}})


def test_warning_is_silent_during_warmup_then_names_the_lr_and_a_command(tmp_path, folder, monkeypatch):
    monkeypatch.setattr(classification, "health", lambda row, n: f"training looks collapsed at epoch {row['epoch']}")
    run = vtrain.train(recipe_for(folder, epochs=4, warmup_epochs=2, on_collapse="warn"), tmp_path / "run")
    rows = rows_of(run)
    assert ["unhealthy" in r for r in rows] == [False, False, True, True]  # epochs 1-2 are the warm-up
    assert ["warning" in r for r in rows] == [False, False, False, True]  # two failed epochs in a row
    warning = rows[3]["warning"]
    assert f"lr in use is {LR:.2g}" in warning and "recovery" not in rows[3]
    assert f"vislora train {run / 'recipe.yaml'} --set train.lr={LR / 5:g} --out {run}-lr{LR / 5:g}" in warning


def test_a_forced_collapse_recovers_to_the_best_epoch_at_a_lower_lr(tmp_path, folder, sabotage, monkeypatch):
    seen = {}
    real = vtrain.recover

    def recover(loop, row):
        seen["best"] = torch.load(loop.run_dir / "checkpoints/best.pt", weights_only=True)
        real(loop, row)
        seen["model"] = {k: v.clone() for k, v in vtrain.rundir.trained_state(loop.model).items()}
        seen["lrs"] = [g["lr"] for g in loop.optimizer.param_groups]
        seen["expected"] = [base * f(loop.step) for base, f in zip(loop.scheduler.base_lrs,
                                                                    loop.scheduler.lr_lambdas, strict=True)]

    monkeypatch.setattr(vtrain, "recover", recover)
    rows = rows_of(vtrain.train(recipe_for(folder, epochs=4), tmp_path / "run"))
    assert rows[1]["unhealthy"] and "warning" not in rows[1]  # one epoch is not yet a collapse
    assert "every val image gets the same class" in rows[2]["warning"]
    assert rows[2]["recovery"] == {"restored_epoch": 1, "lr_before": LR, "lr_after": pytest.approx(LR / 5)}
    assert "Recovered" in rows[2]["warning"] and "epoch 1 restored" in rows[2]["warning"]
    assert "warning" not in rows[3] and rows[3]["val_predicted_classes"] > 1  # training went on from epoch 1
    assert rows[3]["lr"] < LR / 5
    assert seen["best"]["epoch"] == 1  # the recovered state is epoch 1's, at 1/5 of the scheduled lr
    for key, value in seen["best"]["model"].items():
        assert torch.equal(seen["model"][key], value), key
    assert seen["lrs"] == pytest.approx(seen["expected"]) and max(seen["lrs"]) < LR / 5


def test_one_unhealthy_epoch_is_a_transient(tmp_path, folder, monkeypatch):
    real = vtrain.train_epoch

    def train_epoch(loop, epoch):  # epoch 2 ends with every image in class 0, epoch 3 starts healed
        shift = torch.tensor([1e3, 0.0, 0.0])
        if epoch == 2:
            with torch.no_grad():
                loop.model.get_classifier().bias.sub_(shift)
        row = real(loop, epoch)
        if epoch == 1:
            with torch.no_grad():
                loop.model.get_classifier().bias.add_(shift)
        return row

    monkeypatch.setattr(vtrain, "train_epoch", train_epoch)
    rows = rows_of(vtrain.train(recipe_for(folder, epochs=3), tmp_path / "run"))
    assert rows[1].get("unhealthy") and not any("warning" in r or "recovery" in r for r in rows)


def test_warn_only_changes_nothing(tmp_path, folder, sabotage):
    rows = rows_of(vtrain.train(recipe_for(folder, epochs=3, on_collapse="warn"), tmp_path / "run"))
    assert "warning" in rows[2] and not any("recovery" in r for r in rows)


def test_resume_inside_a_recovery_is_exact(tmp_path, folder, sabotage, monkeypatch):
    recipe = recipe_for(folder, epochs=4)
    vtrain.train(recipe, tmp_path / "straight")
    real_validate, calls = classification.validate, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # Ctrl-C in epoch 4, after epoch 3's recovery was checkpointed
        return real_validate(*args, **kwargs)

    monkeypatch.setattr(classification, "validate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        vtrain.train(recipe, tmp_path / "resumed")
    monkeypatch.setattr(classification, "validate", real_validate)
    assert "recovery" in rows_of(tmp_path / "resumed")[2]
    vtrain.train(recipe, tmp_path / "resumed", resume=True)
    a = torch.load(tmp_path / "straight/checkpoints/last.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed/checkpoints/last.pt", weights_only=True)
    lrs = a["scheduler"]["base_lrs"]
    assert lrs == b["scheduler"]["base_lrs"] == pytest.approx([LR / 5] * len(lrs))  # the recovery's lr, resumed
    for key in a["model"]:
        assert torch.allclose(a["model"][key], b["model"][key], atol=1e-6), key
    assert [r["val_top1"] for r in rows_of(tmp_path / "straight")] == [r["val_top1"] for r in
                                                                        rows_of(tmp_path / "resumed")]
