"""DoRA behind the variant seam: one table of layer kinds, each checked the same way (start, merge, bf16 round trip,
magnitudes, gradients, the norm formula), PEFT files both ways, and the refusals."""

import copy
import json

import pytest
import timm
import torch
import torch.nn as nn
import yaml
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from timm.layers import Conv2dSame, MixedConv2d, StdConv2d
from torch.nn.utils import parametrizations

import vislora.spectrum
import vislora.svd
from vislora import LoraConfig, LoraLayer, inject, load_adapter, lora_layers, merge, save_adapter, unload, unmerge
from vislora.cli import main
from vislora.data import make_synthetic_folder
from vislora.layers import DoRA
from vislora.recipe import resolve
from vislora.train import build_optimizer

from zoo import interrupt_validation

VIT = dict(img_size=32, patch_size=8, depth=2)


class Wrap(nn.Module):
    """One layer under test, fed a fixed input shape."""

    def __init__(self, layer: nn.Module, shape: tuple[int, ...]):
        super().__init__()
        self.layer, self.shape = layer, shape

    def forward(self, x):
        return self.layer(x)


class SelfAttention(nn.Module):
    """An OpenCLIP-style block: nn.MultiheadAttention (in_proj and out_proj adapted)."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(12, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def vit():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, **VIT)


# (id, model builder, input shape, LoraConfig kwargs)
CASES = [
    ("linear", lambda: nn.Sequential(nn.Linear(12, 10)), (4, 12), {"targets": ["0"]}),
    ("linear-no-bias", lambda: nn.Sequential(nn.Linear(12, 10, bias=False)), (3, 5, 12), {"targets": ["0"]}),
    ("conv1x1", lambda: nn.Sequential(nn.Conv2d(8, 6, 1)), (2, 8, 7, 7), {"targets": ["0"]}),
    ("conv3x3", lambda: nn.Sequential(nn.Conv2d(4, 6, 3, padding=1)), (2, 4, 9, 9), {"targets": ["0"]}),
    ("kx1", lambda: nn.Sequential(nn.Conv2d(4, 6, (3, 1), padding=(1, 0))), (2, 4, 8, 8), {"targets": ["0"]}),
    ("dilated-reflect", lambda: nn.Sequential(nn.Conv2d(4, 6, 3, padding=2, dilation=2, padding_mode="reflect")),
     (2, 4, 9, 9), {"targets": ["0"]}),
    ("grouped", lambda: nn.Sequential(nn.Conv2d(8, 12, 3, padding=1, groups=4)), (2, 8, 8, 8), {"targets": ["0"]}),
    ("depthwise-5x5", lambda: nn.Sequential(nn.Conv2d(6, 6, 5, padding=2, groups=6)), (2, 6, 9, 9),
     {"targets": ["0"]}),
    ("conv2dsame", lambda: nn.Sequential(Conv2dSame(4, 6, 3, stride=2)), (2, 4, 9, 9), {"targets": ["0"]}),
    ("conv1d", lambda: nn.Sequential(nn.Conv1d(4, 6, 3, padding=1)), (2, 4, 9), {"targets": ["0"]}),
    ("multihead-attention", SelfAttention, (2, 5, 12), {"targets": "all"}),
    ("mha-qv", SelfAttention, (2, 5, 12), {"targets": "vit", "qkv": "qv"}),
    ("mixedconv", lambda: nn.Sequential(MixedConv2d(8, 8, [3, 5], depthwise=True)), (2, 8, 9, 9), {"targets": "all"}),
    ("vit-qv", vit, (2, 3, 32, 32), {"targets": "vit", "qkv": "qv"}),
    ("eva-flinear", lambda: timm.create_model("eva02_tiny_patch14_224", pretrained=False, num_classes=5,
                                              img_size=28, depth=1), (2, 3, 28, 28), {"targets": "vit"}),
    ("resnet", lambda: timm.create_model("resnet18", pretrained=False, num_classes=5), (2, 3, 32, 32),
     {"targets": "conv"}),
]
IDS = [c[0] for c in CASES]


def build(case):
    _, make, shape, kwargs = case
    torch.manual_seed(0)
    model = make().eval()
    return model, torch.randn(*shape), LoraConfig(r=2, use_dora=True, train=[], **kwargs)


def perturbed(model):
    torch.manual_seed(1)
    for _, layer in lora_layers(model):
        layer.update.perturb_()
    return model


def relative(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Small models on a shared 2-core machine: one thread (conftest.one_thread)."""


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_dora_starts_as_the_base_merges_exactly_and_unloads_plain(case):
    model, x, config = build(case)
    with torch.no_grad():
        y_base = model(x)
    inject(model, config, verify=True)  # verify perturbs B and the magnitudes of every DoRA layer
    assert all(isinstance(layer.update, DoRA) for _, layer in lora_layers(model))
    with torch.no_grad():
        assert relative(model(x), y_base) <= 1e-6
        perturbed(model)
        y = model(x)
        merge(model)
        assert relative(model(x), y) <= 1e-5
        unmerge(model)
        assert relative(model(x), y) <= 1e-6
        keys = set(unload(copy.deepcopy(model)).state_dict())
        plain = unload(model)
        assert relative(plain(x), y) <= 1e-5
    assert not any(type(m).__module__.startswith("vislora") for m in plain.modules())
    assert keys == set(build(case)[0].state_dict())


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_one_magnitude_per_adapted_output_with_a_gradient_and_bf16_round_trip(case):
    model, x, config = build(case)
    inject(model, config, verify=False)
    model(x).square().sum().backward()
    for name, layer in lora_layers(model):
        update = layer.update
        rows = sum(r.stop - r.start for r in update.rows())
        assert update.lora_magnitude.shape == (rows,), name
        assert update.lora_magnitude.grad is not None and update.lora_magnitude.grad.abs().sum() > 0, name
        if layer.qkv_parts:
            assert rows == 2 * layer.raw_weight().shape[0] // 3  # q and v only
    half = copy.deepcopy(model).to(torch.bfloat16)
    perturbed(half)
    before = {n: p.clone() for n, p in half.state_dict().items()}
    merge(half)
    unmerge(half)
    assert all(torch.equal(before[n], p) for n, p in half.state_dict().items())


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ("linear", "linear-no-bias", "conv1x1", "vit-qv")],
                         ids=["linear", "linear-no-bias", "conv1x1", "vit-qv"])
def test_activation_path_equals_weight_path_in_value_and_gradients(case):
    """The fast path (ScaleRows over the factored norm) against the plain weight path, W' formed explicitly."""
    model, x, config = build(case)
    inject(model, config, verify=False)
    perturbed(model)
    other = copy.deepcopy(model)
    for _, layer in lora_layers(other):
        layer.weight_path = True
    results = []
    for m in (model, other):
        y = m(x)
        (y * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
        grads = [p.grad.clone() for _, layer in lora_layers(m) for p in layer.adapter_parameters()]
        results.append((y.detach(), grads))
    assert relative(results[0][0], results[1][0]) <= 1e-6
    for a, b in zip(results[0][1], results[1][1], strict=True):
        assert relative(a, b) <= 1e-5


class InPlaceAfter(nn.Module):
    """An SE block's shape: a conv and a Linear each followed by an in-place ReLU that overwrites their output."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(4, 6, 1), nn.Linear(6, 5)

    def forward(self, x):
        y = torch.relu_(self.conv(x)).mean((2, 3))
        return torch.relu_(self.fc(y)) * 2


def test_an_in_place_op_after_a_dora_layer_keeps_its_gradients_exact():
    """DoRA keeps its output for the magnitude's gradient; an in-place ReLU after it (timm's SE blocks) must not
    break backward or change the gradients: they equal the weight path's."""
    x = torch.randn(3, 4, 5, 5)
    model = inject(InPlaceAfter(), LoraConfig(r=2, targets=["conv", "fc"], use_dora=True), verify=False)
    perturbed(model)
    other = copy.deepcopy(model)
    for _, layer in lora_layers(other):
        layer.weight_path = True
    grads = []
    for m in (model, other):
        m(x).sum().backward()
        grads.append([p.grad.clone() for _, layer in lora_layers(m) for p in layer.adapter_parameters()])
    for a, b in zip(*grads, strict=True):
        assert relative(a, b) <= 1e-5


class OutOfPlaceAfter(InPlaceAfter):
    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3))) * 2


@pytest.mark.parametrize("net, recomputes", [(OutOfPlaceAfter, 0), (InPlaceAfter, 1)])
def test_dora_recomputes_its_output_only_where_a_later_op_overwrote_it(net, recomputes, monkeypatch):
    """Backward reads the kept output; recomputing it everywhere (a version check read before autograd's own bump
    of the in-place output) cost MobileNetV2 a third of its step."""
    model = inject(net(), LoraConfig(r=2, targets=["conv", "fc"], use_dora=True), verify=False)
    perturbed(model)
    calls = []
    original = LoraLayer._direction_output
    monkeypatch.setattr(LoraLayer, "_direction_output", lambda self, *a: calls.append(1) or original(self, *a))
    model(torch.randn(3, 4, 5, 5)).sum().backward()
    assert len(calls) == 1 + recomputes  # the conv's forward (fc's Linear kernel recomputes no direction) + any


def test_the_norm_formula_equals_the_materialised_norm_in_fp64():
    torch.manual_seed(0)
    for qkv in (None, (0, 2)):
        w = torch.randn(24, 10, dtype=torch.float64)
        dora = DoRA(w, r=3, alpha=5.0, qkv_parts=qkv, num_chunks=3, dtype=torch.float64)
        with torch.no_grad():
            dora.lora_B.normal_()
        direct = (w + dora.delta(w.shape)).norm(dim=1)
        assert (dora.row_norms(w) - direct).abs().max().item() <= 1e-10


@pytest.mark.parametrize("direction", ["vislora-to-peft", "peft-to-vislora"])
@pytest.mark.parametrize("spec", ["vit", "resnet"])
def test_peft_round_trips_of_dora_files(tmp_path, spec, direction):
    def make():
        torch.manual_seed(0)  # the same base on both sides
        return vit() if spec == "vit" else timm.create_model("resnet18", pretrained=False, num_classes=5)

    x = torch.randn(2, 3, 32, 32)
    targets = ["qkv", "proj", "fc1", "fc2"] if spec == "vit" else r"layer\d\.\d\.(conv\d|downsample\.0)"
    torch.manual_seed(0)
    if direction == "vislora-to-peft":
        model = perturbed(inject(make().eval(), LoraConfig(r=2, use_dora=True, targets="vit" if spec == "vit" else
                                                            "all", train=["head"])))
        save_adapter(model, tmp_path)
        other = PeftModel.from_pretrained(make().eval(), tmp_path).eval()
    else:
        model = get_peft_model(make().eval(), PeftLoraConfig(r=2, lora_alpha=4, target_modules=targets,
                                                             use_dora=True, init_lora_weights=False)).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "magnitude" in name:
                    p.mul_(1.1)
        model.save_pretrained(tmp_path)
        other = load_adapter(make().eval(), tmp_path).eval()
        assert all(not layer.additive for _, layer in lora_layers(other))
    with torch.no_grad():
        assert relative(other(x), model(x)) <= 1e-5


def test_dora_refusals_name_the_layer():
    model = nn.Sequential(StdConv2d(3, 4, 3), parametrizations.weight_norm(nn.Conv2d(4, 4, 1)))
    with pytest.raises(ValueError, match="'0' .*StdConv2d.*standardises"):
        inject(copy.deepcopy(model), LoraConfig(targets=["^0$"], r=2, use_dora=True, train=[]))
    with pytest.raises(ValueError, match="'1' .*re-parametrised"):
        inject(copy.deepcopy(model), LoraConfig(targets=["^1$"], r=2, use_dora=True, train=[]))
    with pytest.raises(ValueError, match="pissa"):
        inject(vit(), LoraConfig(targets="vit", use_dora=True, init="pissa"))
    inject(model, LoraConfig(targets=["^0$"], r=2, train=[]))  # plain LoRA adapts a StdConv2d exactly


def test_dora_runs_are_refused_by_the_tools_that_read_an_additive_update():
    model = perturbed(inject(vit(), LoraConfig(targets="vit", r=2, use_dora=True)))
    for tool in (vislora.spectrum.spectrum, vislora.svd.shrink_adapter, vislora.svd.frobenius_penalty):
        kwargs = {"rank": 1} if tool is vislora.svd.shrink_adapter else {}
        with pytest.raises(ValueError, match="DoRA"):
            tool(model, **kwargs)
    assert vislora.svd.factor_l2(model).item() > 0  # plain L2 on the factors is defined for DoRA too


def test_lora_plus_speeds_up_only_the_b_factors():
    model = inject(vit(), LoraConfig(targets="vit", r=2, use_dora=True))
    t = resolve({"train": {"epochs": 2, "warmup_epochs": 0, "min_lr": 0.0, "lr": 1e-3, "head_lr": 1e-2,
                           "lora_plus_ratio": 16}})["train"]
    optimizer, _ = build_optimizer(model, t, steps_per_epoch=3)
    fast = {id(layer.lora_B) for _, layer in lora_layers(model)}
    for group in optimizer.param_groups:
        expected = 16e-3 if any(id(p) in fast for p in group["params"]) else 1e-3
        assert all((id(p) in fast) == (expected == 16e-3) for p in group["params"])
        assert group["initial_lr"] == pytest.approx(expected)
    assert isinstance(next(m for m in model.modules() if isinstance(m, LoraLayer)).update, DoRA)


def test_a_dora_run_through_every_command(tmp_path, monkeypatch):
    """train (interrupted, resumed: the same weights), eval = the reported figure, export verified, predict,
    footprint: a DoRA run works everywhere a LoRA run does, and its file says use_dora."""
    folder = make_synthetic_folder(tmp_path / "images", classes=3, per_class=8, size=32)
    recipe = {"model": {"name": "vit_tiny_patch16_224", "pretrained": False, "kwargs": VIT},
              "adapter": {"r": 2, "targets": "vit", "use_dora": True, "qkv": "qv"},
              "data": {"path": str(folder), "img_size": 32, "workers": 0},
              "train": {"epochs": 3, "batch_size": 8, "warmup_epochs": 0, "lora_plus_ratio": 4}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "straight")]) == 0
    restore_validate = interrupt_validation(monkeypatch)
    assert main(["train", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run")]) == 130
    restore_validate()
    assert main(["train", "--resume", "--out", str(tmp_path / "run")]) == 0
    a = torch.load(tmp_path / "straight/checkpoints/last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)["model"]
    assert any("lora_magnitude" in k for k in a) and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    summary = json.loads((tmp_path / "run/train_summary.json").read_text())
    assert main(["eval", str(tmp_path / "run")]) == 0
    report = json.loads((tmp_path / "run/eval/report.json").read_text())
    assert report["top1"] == summary["best"]
    assert main(["export", str(tmp_path / "run"), "--format", "all"]) == 0
    exported = json.loads((tmp_path / "run/export/export.json").read_text())
    assert exported["torchscript"]["max_abs_diff"] <= 1e-4 and exported["onnx"]["max_abs_diff"] <= 1e-4
    image = next((folder / "class_0").iterdir())
    assert main(["predict", str(tmp_path / "run" / "export" / "model.onnx"), str(image)]) == 0
    assert main(["footprint", str(tmp_path / "run")]) == 0
    config = json.loads((tmp_path / "run/adapter/adapter_config.json").read_text())
    assert config["use_dora"] is True


@pytest.mark.parametrize("layer", [nn.Linear(8, 6), nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.Conv2d(4, 6, 1)],
                         ids=["linear", "depthwise", "conv1x1"])
def test_dora_on_dead_rows_stays_finite(layer):
    """Pretrained weights hold filters of zero norm (EfficientNet-Lite0: 5 depthwise ones; DoRA there gave a NaN
    loss in the first batch): g = m / n is 0 there, not NaN; the layer starts as the base, merges exactly and
    its gradients are finite."""
    torch.manual_seed(0)
    with torch.no_grad():
        layer.weight[:2].zero_()
    model = nn.Sequential(layer)
    x = torch.randn(3, 8) if isinstance(layer, nn.Linear) else torch.randn(2, layer.in_channels, 5, 5)
    y0 = model(x).detach()
    inject(model, LoraConfig(targets=["0"], r=2, use_dora=True, train=()), verify=True)
    assert torch.allclose(model(x), y0, atol=1e-6)
    model[0].update.perturb_()
    unmerged = model(x)
    assert torch.isfinite(unmerged).all()
    unmerged.square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model[0].adapter_parameters())
    with torch.no_grad():
        merge(model)
        assert torch.allclose(model(x), unmerged, atol=1e-5)
        unmerge(model)
