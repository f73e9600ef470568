"""Shrinking a trained adapter by truncated SVD: exact at the true rank, Eckart-Young errors, rank selection by
rank / energy / budget, the rank_pattern round trip through vislora and PEFT, and `vislora shrink` on a tiny run."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import yaml
from peft import PeftModel

from vislora import LoraConfig, inject, load_adapter, lora_layers, save_adapter
from vislora.cli import main
from vislora.data import make_synthetic_folder
from vislora.rundir import load_run
from vislora.svd import shrink_adapter

import zoo

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:adapter on .* more than the layer itself")

# the zoo's cases by id, and one of them with other targets: PEFT refuses the depthwise convs of "conv"
VARIANTS = {"mobilenet-1x1": ("mobilenet", {"targets": "conv1x1"})}
RUN_MODEL = {"name": "vit_tiny_patch16_224", "pretrained": False,
             "kwargs": {"img_size": 32, "patch_size": 8, "depth": 2}}
SHRINKABLE = ["vit", "vit-qv", "mobilenet", "resnet", "convnext"]  # every zoo case but DoRA (test_dora: refused)


def zoo_case(case: str) -> tuple[zoo.Case, dict]:
    """The zoo case behind an id of this file and the LoraConfig keys it overrides."""
    zoo_id, lora = VARIANTS.get(case, (case, {}))
    return zoo.case(zoo_id), lora


def trained(case: str, r: int = 8, true_rank: int | None = None) -> torch.nn.Module:
    """A model whose adapters look trained: random B, rows of A decaying at a random rate per layer (so layers need
    different ranks), and A of rank `true_rank` (per part) if given."""
    spec, lora = zoo_case(case)
    model = inject(spec.build(), spec.config(r=r, alpha=2 * r, **lora))
    torch.manual_seed(1)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.normal_(std=0.1)
            decay = torch.logspace(0, -2 * torch.rand(1).item(), layer.r).repeat(layer.lora_A.shape[0] // layer.r)
            layer.lora_A.mul_(decay[:, None])
            if true_rank is not None:
                for a in layer.lora_A.split(layer.r):
                    k = min(true_rank, a.shape[0])
                    a.copy_(torch.randn(a.shape[0], k) @ torch.randn(k, a.shape[1]) / a.shape[1] ** 0.5)
        model.get_classifier().weight.add_(torch.randn_like(model.get_classifier().weight))
    return model


def part_deltas(layer) -> list[torch.Tensor]:
    """The update of each adapted part as a dense fp64 matrix (only tests form it)."""
    delta = layer.delta_weight().detach().double()
    delta = delta.reshape(delta.shape[0], -1)
    if not layer.qkv_parts:
        return [delta]
    chunk = delta.shape[0] // 3
    return [delta[c * chunk:(c + 1) * chunk] for c in layer.qkv_parts]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("case", SHRINKABLE)
def test_shrink_at_or_above_the_true_rank_keeps_outputs(case):
    model = trained(case, true_rank=3)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y0 = model(x)
    before = {n: copy.deepcopy(part_deltas(layer)) for n, layer in lora_layers(model)}
    report = shrink_adapter(model, rank=4)
    with torch.no_grad():
        y1 = model(x)
    assert relative(y1, y0) <= 1e-5
    layers = dict(lora_layers(model))
    assert {r["name"] for r in report} == set(before) == set(layers)
    for row in report:
        layer = layers[row["name"]]
        assert layer.r == row["rank"] == min(4, row["old_rank"]) and row["energy"] == pytest.approx(1.0)
        for old, new in zip(before[row["name"]], part_deltas(layer), strict=True):
            assert relative(new, old) <= 1e-5


@pytest.mark.parametrize("case", ["vit", "vit-qv", "mobilenet"])  # resnet's fp64 SVDs of 512 x 4608 take 15 s
def test_error_at_rank_k_is_the_discarded_singular_values(case):
    model = trained(case)
    before = {n: part_deltas(layer) for n, layer in lora_layers(model)}
    report = shrink_adapter(model, rank=3)
    layers = dict(lora_layers(model))
    for row in report:
        old, new = before[row["name"]], part_deltas(layers[row["name"]])
        lost = sum(torch.linalg.svdvals(d)[3:].pow(2).sum().item() for d in old)
        total = sum(d.pow(2).sum().item() for d in old)
        error = math.sqrt(sum((o - n).pow(2).sum().item() for o, n in zip(old, new, strict=True)))
        assert error == pytest.approx(math.sqrt(lost), rel=1e-5)
        assert row["rel_error"] == pytest.approx(math.sqrt(lost / total), rel=1e-5)
        assert row["energy"] == pytest.approx(1 - lost / total, rel=1e-5)
        assert row["params"] == layers[row["name"]].lora_A.numel() + layers[row["name"]].lora_B.numel()
        assert row["params"] == row["old_params"] * row["rank"] // row["old_rank"]


def test_energy_and_budget_selection():
    model = trained("vit-qv")
    before = {n: part_deltas(layer) for n, layer in lora_layers(model)}
    report = shrink_adapter(copy.deepcopy(model), energy=0.8)
    for row in report:  # the smallest k keeping 80% of the update's energy (summed over the qkv parts)
        curve = sum(torch.linalg.svdvals(d)[:8].pow(2).cumsum(0) for d in before[row["name"]])
        curve = curve / curve[-1]
        k = row["rank"]
        assert curve[k - 1] >= 0.8 - 1e-9 and (k == 1 or curve[k - 2] < 0.8) and row["energy"] >= 0.8 - 1e-9
    assert len({r["rank"] for r in report}) > 1

    total = sum(r["old_params"] for r in report)
    budget = total // 3
    shrunk = copy.deepcopy(model)
    report_b = shrink_adapter(shrunk, budget=budget)
    assert budget - max(r["old_params"] // 8 for r in report) < sum(r["params"] for r in report_b) <= budget
    assert shrunk.vislora_config.rank_pattern == {r["name"]: r["rank"] for r in report_b}
    assert all(1 <= r["rank"] <= 8 for r in report_b) and len({r["rank"] for r in report_b}) > 1
    assert all(r["rank"] == 8 for r in shrink_adapter(copy.deepcopy(model), budget=total))
    with pytest.raises(ValueError, match="budget"):
        shrink_adapter(copy.deepcopy(model), budget=10)


def test_bad_arguments_zero_updates_and_pissa():
    model = trained("vit")
    for kwargs in ({}, {"rank": 2, "energy": 0.9}, {"rank": 0}, {"energy": 1.5}, {"budget": 2.5}):
        with pytest.raises(ValueError, match="shrink"):
            shrink_adapter(copy.deepcopy(model), **kwargs)
    with torch.no_grad():
        dict(lora_layers(model))["blocks.0.attn.proj"].lora_B.zero_()  # never trained: dropped
    report = shrink_adapter(model, rank=2)
    assert "blocks.0.attn.proj" not in dict(lora_layers(model))
    assert next(r for r in report if r["name"] == "blocks.0.attn.proj")["rank"] == 0
    untrained = inject(zoo.case("vit").build(), LoraConfig(r=4, targets="vit"))
    with pytest.raises(ValueError, match="zero"):
        shrink_adapter(untrained, rank=2)
    pissa = inject(zoo.case("vit").build(), LoraConfig(r=4, targets="vit", init="pissa"))
    with pytest.raises(ValueError, match="PiSSA"):
        shrink_adapter(pissa, rank=2)


@pytest.mark.parametrize("case", ["vit", "vit-qv", "mobilenet-1x1"])
def test_rank_pattern_round_trip_through_vislora_and_peft(tmp_path, case):
    model = trained(case)
    shrink_adapter(model, energy=0.7)
    ranks = {n: layer.r for n, layer in lora_layers(model)}
    assert len(set(ranks.values())) > 1
    save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["rank_pattern"] and saved["modules_to_save"]
    x = torch.randn(2, 3, 32, 32)
    spec = zoo_case(case)[0]
    fresh = load_adapter(spec.build(), tmp_path).eval()
    peft_model = PeftModel.from_pretrained(spec.build(), tmp_path).eval()
    with torch.no_grad():
        y = model(x)
        assert {n: layer.r for n, layer in lora_layers(fresh)} == ranks
        assert relative(fresh(x), y) <= 1e-6
        assert relative(peft_model(x), y) <= 1e-6  # fp32: PEFT sums the update in another order


# ---- the command ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny ViT runs on synthetic images: plain LoRA (qv per-projection adapters) and PiSSA."""
    tmp = tmp_path_factory.mktemp("shrink")
    folder = make_synthetic_folder(tmp / "images", classes=3, per_class=8, size=32, split=True)
    common = {"model": RUN_MODEL,
              "data": {"path": str(folder), "img_size": 32, "workers": 0},
              "train": {"epochs": 1, "batch_size": 6, "warmup_epochs": 0, "lr": 1e-2}}
    for name, adapter in (("lora", {"r": 6, "targets": "vit", "qkv": "qv"}),
                          ("pissa", {"r": 4, "targets": "vit", "init": "pissa"}),
                          ("probe", "linear_probe")):
        (tmp / f"{name}.yaml").write_text(yaml.safe_dump({**common, "adapter": adapter}))
        assert main(["train", str(tmp / f"{name}.yaml"), "--out", str(tmp / name)]) == 0
    return tmp


def test_cli_shrink_writes_a_run_that_eval_export_predict_accept(runs, capsys):
    out = runs / "small"
    assert main(["shrink", str(runs / "lora"), "--energy", "0.9", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "blocks.0.attn.qkv" in printed and "val top1" in printed
    report = json.loads((out / "shrink_report.json").read_text())
    assert report["selection"] == {"energy": 0.9} and report["params_after"] < report["params_before"]
    assert {"top1", "macro_f1"} <= set(report["val_before"]) and "top1" in report["val_after"]
    for row in report["layers"]:
        assert {"old_rank", "rank", "energy"} <= set(row) and row["old_rank"] == 6 and row["energy"] >= 0.9 - 1e-9
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["adapter"]["rank_pattern"] == {r["name"]: r["rank"] for r in report["layers"]}
    model, _, _ = load_run(out)
    assert {n: layer.r for n, layer in lora_layers(model)} == recipe["adapter"]["rank_pattern"]
    assert main(["eval", str(out)]) == 0
    assert json.loads((out / "eval/report.json").read_text())["top1"] == report["val_after"]["top1"]
    assert main(["export", str(out), "--format", "torchscript"]) == 0
    image = next((runs / "images/val/class_0").iterdir())
    assert main(["predict", str(out), str(image), "--json"]) == 0
    assert main(["shrink", str(runs / "lora"), "--rank", "2", "--out", str(out)]) == 2  # refuses to overwrite
    assert "--force" in capsys.readouterr().err
    assert main(["shrink", str(runs / "lora"), "--rank", "2", "--out", str(out), "--force"]) == 0


def test_cli_shrink_from_inside_the_run_folder(runs, monkeypatch):
    """`shrink .` names its output by the run folder's real name, beside it."""
    monkeypatch.chdir(runs / "lora")
    assert main(["shrink", ".", "--rank", "1"]) == 0
    assert (runs / "lora_shrink_rank1" / "adapter" / "adapter_config.json").is_file()


def test_cli_shrink_pissa_run_at_full_rank_is_exact(runs):
    out = runs / "pissa_small"
    assert main(["shrink", str(runs / "pissa"), "--rank", "8", "--out", str(out)]) == 0
    old, _, _ = load_run(runs / "pissa")
    new, recipe, _ = load_run(out)
    assert recipe["adapter"]["init"] == "default"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert relative(new(x), old(x)) <= 1e-5


def test_cli_shrink_errors(runs, capsys):
    assert main(["shrink", str(runs / "probe"), "--rank", "2"]) == 2
    assert "adapter" in capsys.readouterr().err
    assert main(["shrink", str(runs / "lora"), "--energy", "2", "--out", str(runs / "bad")]) == 2
    assert "energy" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["shrink", str(runs / "lora")])  # one of --rank / --energy / --budget is required
