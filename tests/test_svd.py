"""PiSSA init, SVD extraction, update spectra and penalties on a tiny ViT and a tiny CNN with every conv kind."""

from __future__ import annotations

import copy
import json
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.nn.utils.parametrizations import weight_norm

from vislora import LoraConfig, inject, lora_layers, save_adapter
from vislora.cli import main
from vislora.layers import raw_weight_name
from vislora.spectrum import format_spectrum, plot_spectrum, spectrum
from vislora.svd import extract_adapter, factor_l2, frobenius_penalty, pissa_as_lora
from vislora.targets import find_targets

import zoo

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:adapter on .* more than the layer itself")  # full-rank tiny convs


class TinyCNN(nn.Module):
    """A dense 3x3, a depthwise 3x3, a grouped dilated 3x3, a 3x1 and a weight-normed 1x1 conv, then a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.grouped = nn.Conv2d(16, 24, 3, padding=2, dilation=2, groups=4)
        self.kx1 = nn.Conv2d(24, 24, (3, 1), padding=(1, 0))
        self.pw = weight_norm(nn.Conv2d(24, 12, 1))
        self.head = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(self.dw(x))
        x = F.relu(self.grouped(x))
        x = self.pw(F.relu(self.kx1(x)))
        return self.head(x.mean((2, 3)))


CNN_TARGETS = ["stem", "dw", "grouped", "kx1", "pw"]
CNN_LORA = {"targets": CNN_TARGETS, "train": ["head"]}


def make(case: str, seed: int = 0) -> tuple[nn.Module, dict, torch.Tensor]:
    """A zoo case (with a 10-class head) or, for 'cnn', TinyCNN; its LoraConfig keys; a 32 px batch."""
    if case == "cnn":
        torch.manual_seed(seed)
        model, kwargs = TinyCNN().eval(), CNN_LORA
    else:
        model, kwargs = zoo.case(case).build(seed, num_classes=10), zoo.case(case).lora
    return model, dict(kwargs), torch.randn(2, 3, 32, 32)


def head_of(model: nn.Module) -> nn.Module:
    """The classifier: timm's get_classifier(), TinyCNN's head."""
    return model.get_classifier() if hasattr(model, "get_classifier") else model.head


def raw(module: nn.Module) -> torch.Tensor:
    return module.get_parameter(raw_weight_name(module))


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(t.shape[0], -1)


@torch.no_grad()
def perturb(model: nn.Module, names: list[str], scale: float = 0.02, rank: int | None = None,
            chunks: tuple[int, ...] | None = None) -> None:
    """A random 'fine-tuning': full-rank noise, or a rank-`rank` update plus faint noise; only `chunks` (of 3)."""
    for name in names:
        w = raw(model.get_submodule(name))
        out, fan_in = w.shape[0], w[0].numel()
        if rank is None:
            d = scale * torch.randn(out, fan_in)
        else:
            d = torch.randn(out, rank) @ torch.diag(torch.linspace(1.0, 0.3, rank)) @ torch.randn(rank, fan_in)
            d = scale * d / math.sqrt(rank) + 1e-3 * scale * torch.randn(out, fan_in)
        if chunks is not None:
            keep = torch.zeros(out, 1)
            for c in chunks:
                keep[c * out // 3:(c + 1) * out // 3] = 1
            d = d * keep
        w.add_(d.view_as(w))


def tuned_copy(model: nn.Module, names: list[str], **kw) -> nn.Module:
    tuned = copy.deepcopy(model)
    perturb(tuned, names, **kw)
    head = head_of(tuned)
    with torch.no_grad():
        head.weight.add_(0.1 * torch.randn_like(head.weight))
    return tuned


def delta_matrix(layer) -> torch.Tensor:
    return as_matrix(layer.delta_weight().detach()).double()


# ---- PiSSA ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["vit", "vit-qv", "cnn"])
def test_pissa_keeps_output_and_exports_plain_lora(case):
    model, kwargs, x = make(case)
    original = copy.deepcopy(model)
    with torch.no_grad():
        y0 = model(x)
    inject(model, LoraConfig(r=4, alpha=8, init="pissa", **kwargs))
    with torch.no_grad():
        y1 = model(x)
    torch.testing.assert_close(y1, y0, atol=1e-5, rtol=1e-4)
    assert not any("pissa" in k for k in model.state_dict())  # buffers are non-persistent

    for name, layer in lora_layers(model):  # the adapter holds the top-r singular triplets of each part
        w = as_matrix(raw(original.get_submodule(name))).double()
        chunk = w.shape[0] // 3
        rows = [slice(c * chunk, (c + 1) * chunk) for c in layer.qkv_parts] if layer.qkv_parts else [slice(None)]
        for rs in rows:
            s = torch.linalg.svdvals(w[rs])
            got = torch.linalg.svdvals(delta_matrix(layer)[rs])[:4]
            torch.testing.assert_close(got, s[:4], atol=1e-5, rtol=1e-5)

    torch.manual_seed(1)  # "train": move the factors
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_A.add_(0.05 * torch.randn_like(layer.lora_A))
            layer.lora_B.add_(0.05 * torch.randn_like(layer.lora_B))
        y2 = model(x)
        for name, layer in lora_layers(model):  # plain LoRA on the ORIGINAL weights, merged by hand
            a, b, scaling = pissa_as_lora(layer)
            assert a.shape[0] == b.shape[1] == 2 * layer.lora_A.shape[0]
            w = raw(original.get_submodule(name))
            w.add_((scaling * b @ a).view_as(w))
        y3 = original(x)
    assert (y2 - y0).abs().max() > 1e-3  # the adapter did change the model
    torch.testing.assert_close(y3, y2, atol=5e-5, rtol=1e-4)


def test_pissa_as_lora_needs_pissa():
    model, kwargs, _ = make("cnn")
    inject(model, LoraConfig(r=2, **kwargs))
    with pytest.raises(ValueError, match="PiSSA"):
        pissa_as_lora(dict(lora_layers(model))["dw"])


# ---- extraction -----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["vit", "vit-qv", "mobilenet", "convnext", "cnn"])
def test_extract_full_rank_is_exact(case):
    base, kwargs, x = make(case)
    config = LoraConfig(r=8, **kwargs)
    names = find_targets(base, config)
    tuned = tuned_copy(base, names, chunks=(0, 2) if case == "vit-qv" else None)
    with torch.no_grad():
        y_tuned, y_base = tuned(x), base(x)
    model, report = extract_adapter(base, tuned, config, rank="full")
    with torch.no_grad():
        y = model(x)
    assert (y_tuned - y_base).abs().max() > 1e-2
    torch.testing.assert_close(y, y_tuned, atol=5e-5, rtol=1e-4)
    assert [r["name"] for r in report] == names
    for row in report:
        assert row["energy"] == pytest.approx(1.0, abs=1e-6) and row["rel_error"] < 1e-3 and not row["unchanged"]
    torch.testing.assert_close(head_of(model).weight, head_of(tuned).weight)


def test_extract_low_rank_is_eckart_young():
    base, kwargs, _ = make("vit-qv")
    config = LoraConfig(r=8, **kwargs)
    names = find_targets(base, config)
    tuned = tuned_copy(base, names)  # the k chunk changes too: it is lost and counted in the error
    model, report = extract_adapter(base, tuned, config, rank=3)
    layers = dict(lora_layers(model))
    for row in report:
        layer = layers[row["name"]]
        assert row["rank"] == layer.r == 3
        assert row["params"] == layer.lora_A.numel() + layer.lora_B.numel()
        d = as_matrix(raw(tuned.get_submodule(row["name"])) - raw(layer.base_layer)).double()
        assert row["rel_error"] == pytest.approx(math.sqrt(1 - row["energy"]), abs=1e-5)
        direct = (torch.linalg.matrix_norm(d - delta_matrix(layer)) / torch.linalg.matrix_norm(d)).item()
        assert row["rel_error"] == pytest.approx(direct, abs=1e-5)
        if layer.qkv_parts:  # Eckart-Young per adapted chunk, plus the untouched k chunk
            c = d.shape[0] // 3
            lost = sum(torch.linalg.svdvals(d[i * c:(i + 1) * c])[3:].pow(2).sum() for i in (0, 2))
            lost = lost + d[c:2 * c].pow(2).sum()
        else:
            lost = torch.linalg.svdvals(d)[3:].pow(2).sum()
        assert row["rel_error"] == pytest.approx(math.sqrt(lost / d.pow(2).sum()), abs=1e-5)


def test_extract_cnn_low_rank_matches_direct_error():
    base, kwargs, _ = make("cnn")
    config = LoraConfig(r=8, **kwargs)
    tuned = tuned_copy(base, CNN_TARGETS)
    model, report = extract_adapter(base, tuned, config, rank=3)
    layers = dict(lora_layers(model))
    for row in report:
        layer = layers[row["name"]]
        d = as_matrix(raw(tuned.get_submodule(row["name"])) - raw(layer.base_layer)).double()
        s = torch.linalg.svdvals(d)
        assert row["rel_error"] == pytest.approx((s[3:].pow(2).sum() / s.pow(2).sum()).sqrt().item(), abs=1e-5)
        direct = (torch.linalg.matrix_norm(d - delta_matrix(layer)) / torch.linalg.matrix_norm(d)).item()
        assert row["rel_error"] == pytest.approx(direct, abs=1e-5)


def test_extract_auto_rank_by_energy_and_budget(tmp_path):
    base, kwargs, _ = make("vit")
    config = LoraConfig(r=8, **kwargs)
    names = find_targets(base, config)
    tuned = tuned_copy(base, names, rank=6)
    model, report = extract_adapter(copy.deepcopy(base), tuned, config, rank="auto", energy=0.95)
    ranks = {r["name"]: r["rank"] for r in report}
    assert model.vislora_config.rank_pattern == ranks
    for row in report:
        d = as_matrix(raw(tuned.get_submodule(row["name"])) - raw(base.get_submodule(row["name"]))).double()
        curve = torch.linalg.svdvals(d).pow(2).cumsum(0) / d.pow(2).sum()
        k = row["rank"]
        assert row["energy"] >= 0.95 and curve[k - 1] >= 0.95 - 1e-6 and (k == 1 or curve[k - 2] < 0.95)
    assert 1 < min(ranks.values()) <= max(ranks.values()) <= 8
    save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert all(saved["rank_pattern"].get(n, saved["r"]) == k for n, k in ranks.items())

    total = sum(r["params"] for r in report)
    budget = int(0.6 * total)
    model_b, report_b = extract_adapter(copy.deepcopy(base), tuned, config, rank="auto", energy=0.95, budget=budget)
    assert sum(r["params"] for r in report_b) <= budget
    assert all(rb["rank"] <= ranks[rb["name"]] for rb in report_b)
    assert model_b.vislora_config.rank_pattern == {r["name"]: r["rank"] for r in report_b}
    with pytest.raises(ValueError, match="budget"):
        extract_adapter(copy.deepcopy(base), tuned, config, rank="auto", budget=10)


def test_extract_skips_unchanged_layers_carries_changed_modules_and_warns_about_lost_tensors():
    base, kwargs, x = make("vit")
    config = LoraConfig(r=4, **kwargs)
    changed = [n for n in find_targets(base, config) if n.startswith("blocks.0.")]
    tuned = tuned_copy(base, changed)
    with torch.no_grad():
        tuned.blocks[1].norm1.bias.add_(0.1)  # a norm: carried as a module to save
        tuned.blocks[0].attn.qkv.bias.add_(0.1)  # the bias of an adapted layer: LoRA cannot carry it
    with pytest.warns(UserWarning, match=r"blocks\.0\.attn\.qkv\.bias"):
        model, report = extract_adapter(base, tuned, config, rank=4)
    assert "blocks.1.norm1" in model.vislora_train
    assert torch.equal(model.blocks[1].norm1.bias, tuned.blocks[1].norm1.bias)
    adapted = dict(lora_layers(model))
    for row in report:
        assert row["unchanged"] == (not row["name"].startswith("blocks.0."))
        assert (row["name"] in adapted) == (not row["unchanged"])
        if row["unchanged"]:
            assert row["rank"] == row["params"] == 0 and row["rel_error"] == 0.0


def test_extract_nested_names_keep_their_own_rank():
    """'conv1' is also a suffix of 'block.conv1': skipping or ranking one must not touch the other."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.conv1 = nn.Conv2d(3, 8, 1)
    model.block = nn.Sequential()
    model.block.conv1 = nn.Conv2d(8, 8, 3, padding=1)
    model.block.conv2 = nn.Conv2d(8, 8, 1)
    x = torch.randn(1, 3, 8, 8)
    config = LoraConfig(targets=["conv1", "conv2"], train=[])
    tuned = copy.deepcopy(model)
    perturb(tuned, ["block.conv1"])
    _, report = extract_adapter(copy.deepcopy(model), tuned, config, rank="full")
    assert {r["name"]: r["rank"] for r in report} == {"conv1": 0, "block.conv1": 8, "block.conv2": 0}
    perturb(tuned, ["conv1", "block.conv2"], rank=2)
    extracted, report = extract_adapter(copy.deepcopy(model), tuned, config, rank="auto", energy=0.9)
    assert {n: layer.r for n, layer in lora_layers(extracted)} == {r["name"]: r["rank"] for r in report}
    assert report[0]["rank"] <= 3 and report[1]["rank"] > 3
    with torch.no_grad():
        full, _ = extract_adapter(copy.deepcopy(model), tuned, config, rank="full")
        torch.testing.assert_close(full(x), tuned(x), atol=1e-5, rtol=1e-5)


def test_extract_into_injected_model_keeps_its_layers():
    base, kwargs, x = make("cnn")
    config = LoraConfig(r=9, **kwargs)
    tuned = tuned_copy(base, CNN_TARGETS)
    inject(base, config)
    with pytest.raises(ValueError, match="already carries adapters"):
        extract_adapter(base, tuned, config, rank="auto")
    model, report = extract_adapter(base, tuned, config, rank=9)
    assert [r["rank"] for r in report] == [9, 9, 9, 9, 9]
    assert report[1]["rel_error"] == pytest.approx(0.0, abs=1e-5)  # dw: 16 x 9, rank 9 is full


def test_extract_bad_input():
    base, kwargs, _ = make("cnn")
    other = nn.Module()
    with pytest.raises(ValueError, match="no module 'stem'"):
        extract_adapter(copy.deepcopy(base), other, LoraConfig(**kwargs))
    wrong = copy.deepcopy(base)
    wrong.dw = nn.Conv2d(16, 16, 3, padding=1)
    with pytest.raises(ValueError, match="'dw'.*shape"):
        extract_adapter(copy.deepcopy(base), wrong, LoraConfig(**kwargs))
    with pytest.raises(ValueError, match="rank"):
        extract_adapter(copy.deepcopy(base), base, LoraConfig(**kwargs), rank="most")
    with pytest.raises(ValueError, match="nothing to extract"):
        extract_adapter(copy.deepcopy(base), base, LoraConfig(**kwargs))


def test_extract_from_an_imagenet_headed_base_to_a_k_class_fine_tune(tmp_path, capsys):
    torch.manual_seed(0)
    base = timm.create_model("resnet18", pretrained=False)  # 1000 classes, as ImageNet weights come
    tuned = timm.create_model("resnet18", pretrained=False, num_classes=5)
    state = {k: v for k, v in base.state_dict().items() if not k.startswith("fc.")}
    tuned.load_state_dict(state, strict=False)
    with torch.no_grad():
        tuned.layer1[0].conv1.weight.add_(0.01 * torch.randn_like(tuned.layer1[0].conv1.weight))
        tuned.layer2[0].bn1.running_mean.add_(0.5)  # BN statistics changed: carried as a module to save
    save_file(base.state_dict(), str(tmp_path / "base.safetensors"))
    save_file(tuned.state_dict(), str(tmp_path / "tuned.safetensors"))
    assert main(["extract", "--base", str(tmp_path / "base.safetensors"), "--tuned", str(tmp_path /
                 "tuned.safetensors"), "--model", "resnet18", "--kwargs", '{"num_classes": 5}', "--rank", "full",
                 "--targets", "all", "--out", str(tmp_path / "adapter")]) == 0
    fidelity = json.loads((tmp_path / "adapter/extract_fidelity.json").read_text())
    assert "layer2.0.bn1" in fidelity["carried"]
    assert fidelity["max_abs_diff"] <= 1e-4 * fidelity["output_scale"]
    assert "whole model" in capsys.readouterr().out


# ---- spectrum and penalties -----------------------------------------------------------------------
def random_adapter(case: str) -> nn.Module:
    model, kwargs, _ = make(case)
    inject(model, LoraConfig(r=4, **kwargs))
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.normal_(std=0.1)
    return model


@pytest.mark.parametrize("case", ["vit-qv", "cnn"])
def test_spectrum_matches_explicit_svd(case, tmp_path):
    model = random_adapter(case)
    report = spectrum(model)
    layers = dict(lora_layers(model))
    assert [r["name"] for r in report] == list(layers)
    for row in report:
        explicit = torch.linalg.svdvals(delta_matrix(layers[row["name"]]))
        s = torch.tensor(row["singular_values"], dtype=torch.float64)
        torch.testing.assert_close(s, explicit[:s.numel()], atol=1e-6, rtol=1e-5)
        assert explicit.numel() == s.numel() or explicit[s.numel():].max() < 1e-5
        p = explicit / explicit.sum()
        p = p[p > 0]
        assert row["effective_rank"] == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-3)
        assert row["energy"][-1] == pytest.approx(1.0) and row["norm"] == pytest.approx(explicit.norm().item(), 1e-5)
    table = format_spectrum(report)
    assert all(r["name"] in table for r in report)
    out = plot_spectrum(report, tmp_path / "plots" / "spectrum.png")
    assert out.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("case", ["vit-qv", "cnn"])
def test_frobenius_penalty_and_factor_l2(case):
    model = random_adapter(case)
    penalty = frobenius_penalty(model)
    explicit = sum(layer.delta_weight().double().pow(2).sum() for _, layer in lora_layers(model))
    assert penalty.item() == pytest.approx(explicit.item(), rel=1e-5)
    l2 = factor_l2(model)
    plain = sum(layer.lora_A.pow(2).sum() + layer.lora_B.pow(2).sum() for _, layer in lora_layers(model))
    assert l2.item() == pytest.approx(plain.item(), rel=1e-6)
    (penalty + l2).backward()
    for _, layer in lora_layers(model):
        assert layer.lora_A.grad is not None and layer.lora_A.grad.abs().sum() > 0
        assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0


def test_penalties_of_a_pissa_adapter_measure_its_change():
    model = inject(zoo.case("vit").build(), LoraConfig(r=4, targets="vit", init="pissa"))
    assert frobenius_penalty(model).item() == 0.0 and factor_l2(model).item() == 0.0
    with torch.no_grad():
        next(layer for _, layer in lora_layers(model)).lora_B.add_(0.01)
    assert frobenius_penalty(model).item() > 0 and factor_l2(model).item() > 0
