"""vislora.tasks.classification: the head a first run starts from (issue 13) and the collapse health check."""

import json

import timm
import torch
import yaml
from safetensors.torch import save_file

from vislora.cli import main
from vislora.recipe import resolve
from vislora.tasks import classification

from zoo import RUN_VIT, write_recipe


def test_a_new_head_starts_at_zero_and_a_loaded_one_is_kept_only_for_its_own_classes(tmp_path):
    def build(model, classes):
        return classification.build_model(resolve({"model": model}), classes)

    abc = ["a", "b", "c"]
    assert all(p.abs().sum() == 0 for p in build(RUN_VIT, abc).get_classifier().parameters())
    assert any(p.abs().sum() > 0 for p in build({**RUN_VIT, "head_init": "timm"}, abc).get_classifier().parameters())
    source = timm.create_model("vit_tiny_patch16_224", num_classes=3, **RUN_VIT["kwargs"])
    weights = {**RUN_VIT, "checkpoint": str(tmp_path / "w.safetensors")}
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


def test_collapse_warning_fires_on_a_forced_collapse_and_not_on_a_healthy_run(tmp_path, split_images):
    healthy = write_recipe(tmp_path / "ok.yaml", split_images, {"r": 4, "targets": "vit"}, epochs=3)
    assert main(["train", str(healthy), "--out", str(tmp_path / "ok")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "ok/metrics.jsonl").read_text().splitlines()]
    assert not any("warning" in r for r in rows)
    # a huge lr on a tiny CNN with timm's random head: the features die, the loss sits at ln 3
    collapse = {"model": {"name": "test_efficientnet", "head_init": "timm"}, "adapter": {"r": 4, "targets": "conv"},
                "data": {"path": str(split_images), "img_size": 32, "workers": 0},
                "train": {"epochs": 3, "batch_size": 8, "lr": 3.0, "warmup_epochs": 0, "clip_grad": 1.0}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(collapse))
    assert main(["train", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "bad")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "bad/metrics.jsonl").read_text().splitlines()]
    assert any("collapsed" in r.get("warning", "") and "train.lr" in r["warning"] for r in rows), rows
    collapsed = {"epoch": 1, "train_loss": 1.0986, "train_logit_std": 0.001}  # ln 3, constant logits
    assert classification.health(collapsed, 3)
    assert classification.health({"epoch": 1, "train_loss": 0.4, "train_logit_std": 2.0, "val_top1": 0.9,
                                  "val_predicted_classes": 3}, 3) is None
