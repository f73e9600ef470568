"""vislora.footprint on tiny models: parameter groups, bytes, exact FLOP overhead, latency and training figures."""

import json

import pytest
import timm
import torch
import torch.nn as nn
import yaml

from vislora import LoraConfig, LoraLayer, inject, save_adapter
from vislora.data import make_synthetic_folder
from vislora.footprint import adapter_group, count_flops, footprint, format_footprint, resolve_target
from vislora.inject import trainable_summary
from vislora.recipe import resolve
from vislora.train import train

import zoo

FAST = dict(repeats=2, steps=1, memory=False)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Small models on a shared 2-core machine: one thread (conftest.one_thread)."""


def tiny_vit():
    """The zoo's ViT (train mode, as footprint gets it from a user)."""
    return zoo.case("vit").build().train()


class TinyCNN(nn.Module):
    """One conv of every group footprint reports."""

    def __init__(self):
        super().__init__()
        self.dense = nn.Conv2d(3, 16, 3, padding=1)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.k1x3 = nn.Conv2d(16, 16, (1, 3), padding=(0, 1))
        self.pointwise = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        for conv in (self.dense, self.depthwise, self.grouped, self.k1x3, self.pointwise):
            x = torch.relu(conv(x))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def vit_report():
    torch.manual_seed(0)
    model = inject(tiny_vit(), LoraConfig(r=8, targets="vit"))
    return footprint(model, img_size=32, batch=4, **FAST), model


def test_parameters_and_groups(vit_report):
    report, model = vit_report
    p = report["params"]
    assert p["total"] == sum(t.numel() for t in model.parameters())
    assert p["trainable"] == sum(t.numel() for t in model.parameters() if t.requires_grad)
    assert p["adapter"] == sum(g["params"] for g in p["by_group"].values())
    assert set(p["by_group"]) == {"attention qkv/proj", "MLP fc"}
    assert p["by_group"]["attention qkv/proj"]["layers"] == 4 and p["by_group"]["MLP fc"]["layers"] == 4
    assert 0 < p["trainable_share"] < 0.2


def test_bytes(vit_report):
    report, model = vit_report
    b = report["bytes"]
    full = 4 * sum(t.numel() for n, t in model.named_parameters() if "lora_" not in n)
    assert b["full_checkpoint_fp32"] == full
    assert full <= b["merged_model"] < full * 1.05  # the merged model is the base model: tensors plus a header
    trained = 4 * (report["params"]["trainable"])
    assert trained <= b["adapter_file"] < trained + 50_000
    assert b["full_over_adapter"] == pytest.approx(full / b["adapter_file"])


def test_flop_overhead_is_the_lora_matmuls(vit_report):
    """Batch 1, 65 tokens < 192 inputs: every layer adds s (x A^T) B^T to y, 2 N R (in + out) FLOPs."""
    report, _ = vit_report
    c = report["compute"]
    n, r = 65, 8
    per_block = sum(2 * n * r * (i + o) for i, o in ((192, 576), (192, 192), (192, 768), (768, 192)))
    assert round(c["unmerged_overhead_gflops"] * 1e9) == 2 * per_block
    assert c["merged_gmacs"] == pytest.approx(c["merged_gflops"] / 2)
    base = tiny_vit().eval()
    assert round(c["merged_gflops"] * 1e9) == count_flops(base, torch.randn(1, 3, 32, 32))
    attention = 2 * 2 * (2 * 65 * 65 * 192)  # q k^T and attn v, 2 blocks: counted because fused attention is unfused
    linears = 2 * 65 * 2 * 192 * (576 + 192 + 768 + 768)
    assert c["merged_gflops"] * 1e9 > attention + linears


def test_latency_and_training(vit_report):
    report, _ = vit_report
    for key in ("batch_1", "batch_4"):
        row = report["latency_ms"][key]
        assert all(row[k] > 0 for k in ("base", "unmerged", "merged"))
        assert row["merged_over_base"] == pytest.approx(row["merged"] / row["base"])
        low, high = row["merged_over_base_iqr"]  # the spread of the round-by-round ratios (issue #31)
        assert 0 < low <= high and row["rounds"] >= 1
    t = report["train"]
    assert t["lora"]["step_ms"] > 0 and t["full"]["step_ms"] > 0
    assert "step_peak_mb" not in t["lora"]  # an in-memory module cannot be rebuilt in a subprocess


def test_format(vit_report):
    text = format_footprint(vit_report[0])
    for part in ("PARAMETERS", "attention qkv/proj", "BYTES ON DISK", "GFLOPs", "batch 4", "TRAINING STEP"):
        assert part in text
    json.dumps(vit_report[0])


def test_cnn_groups_and_weight_path_overhead():
    torch.manual_seed(0)
    model = inject(TinyCNN(), LoraConfig(r=2, targets="all", train=[]))
    groups = {adapter_group(n, layer) for n, layer in model.named_modules() if isinstance(layer, LoraLayer)}
    assert groups == {"dense kxk", "depthwise", "grouped", "kx1/1xk", "conv 1x1", "other"}
    report = footprint(model, img_size=16, batch=2, **FAST)
    assert report["num_classes"] == 3
    assert set(report["params"]["by_group"]) == groups
    assert report["compute"]["unmerged_overhead_gflops"] >= 0


def test_timm_name_with_memory():
    report = footprint("test_vit", img_size=32, batch=2, repeats=1, steps=1, memory=True)
    assert report["kind"] == "timm" and report["adapter_config"]["targets"] == "vit"
    lora, full = report["train"]["lora"], report["train"]["full"]
    assert lora["step_peak_mb"] > 50 and full["step_peak_mb"] > 50
    assert full["step_mb"] > lora["step_mb"]  # gradients and AdamW state for every weight
    assert "peak memory in steps" in format_footprint(report)


def test_default_targets_for_cnn():
    subject = resolve_target("resnet18", img_size=32)
    assert subject.build_adapted().vislora_config.targets == "conv"


def test_bad_targets(tmp_path):
    with pytest.raises(ValueError, match="not_a_model"):
        footprint("not_a_model", **FAST)
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        footprint(tmp_path / "missing.yaml", **FAST)
    with pytest.raises(FileNotFoundError, match="no recipe.yaml"):
        footprint(tmp_path, **FAST)
    with pytest.raises(ValueError, match="batch"):
        footprint(tiny_vit(), batch=0, **FAST)
    with pytest.raises(ValueError, match="48px"):
        footprint(inject(tiny_vit(), LoraConfig()), img_size=48, **FAST)


RECIPE = {"model": {"name": "vit_tiny_patch16_224", "pretrained": False,
                    "kwargs": {"img_size": 32, "patch_size": 8, "depth": 2}},
          "adapter": {"r": 4, "targets": "vit"}, "data": {"path": "no/such/folder", "img_size": 32}}


def test_recipe_and_run_dir(tmp_path):
    pytest.importorskip("vislora.data")
    from vislora.recipe import resolve, save_recipe

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(RECIPE))
    report = footprint(path, batch=2, **FAST)
    assert report["kind"] == "recipe" and report["num_classes"] == 10 and report["img_size"] == 32
    assert report["adapter_config"]["r"] == 4

    run = tmp_path / "run"
    run.mkdir()
    save_recipe(resolve(RECIPE), run / "recipe.yaml")
    (run / "preprocess.json").write_text(json.dumps({"input_size": [3, 32, 32], "class_names": list("abc")}))
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, **RECIPE["model"]["kwargs"])
    save_adapter(inject(model, LoraConfig(r=4, targets="vit")), run / "adapter")
    report = footprint(run, batch=2, **FAST)
    assert report["kind"] == "run" and report["num_classes"] == 3
    assert report["params"]["adapter"] == sum(g["params"] for g in report["params"]["by_group"].values()) > 0


@pytest.mark.parametrize("adapter", [{"r": 4, "targets": "vit"}, {"r": 4, "targets": "vit", "init": "pissa"},
                                     "linear_probe", None], ids=["lora", "pissa", "probe", "full"])
def test_footprint_rebuilds_the_run_as_trained(tmp_path, adapter):
    """What footprint counts for a run is what training reported (issue 18): the same trainable and adapter sizes."""
    folder = make_synthetic_folder(tmp_path / "images", classes=3, per_class=4, size=32)
    recipe = resolve({"model": {"name": "vit_tiny_patch16_224", "kwargs": dict(zoo.VIT_KWARGS)}, "adapter": adapter,
                      "data": {"path": str(folder), "img_size": 32, "workers": 0},
                      "train": {"epochs": 1, "batch_size": 8, "max_steps": 1}})
    run = train(recipe, tmp_path / "run")
    trained = json.loads((run / "train_summary.json").read_text())["summary"]
    measured = trainable_summary(resolve_target(run).build_adapted())
    assert (measured["trainable"], measured["adapter"]) == (trained["trainable"], trained["adapter"])
