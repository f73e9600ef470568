"""The fast subset of tools/conformance.py: one model per kind of trap, every adapter live, merged == unmerged."""

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

from vislora import LoraConfig, inject, lora_layers

_spec = importlib.util.spec_from_file_location(
    "conformance", Path(__file__).resolve().parents[1] / "tools" / "conformance.py")
conformance = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(conformance)
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.usefixtures("one_thread")]

# trap, timm model (or a synthetic family), constructor kwargs, input side, preset
CASES = [
    ("depthwise-cnn", "test_efficientnet", {}, 32, "conv"),
    ("conv2d-same", "tf_mobilenetv3_small_minimal_100", {}, 32, "conv"),
    ("scaled-std-conv", "test_nfnet", {}, 32, "all"),
    ("bit-std-conv", "resnetv2_50x1_bit", {}, 32, "conv"),
    ("eva-f-linear", "eva02_tiny_patch14_224", {"img_size": 28, "depth": 2}, 28, "vit"),
    ("swin-relative-position", "swin_tiny_patch4_window7_224",
     {"img_size": 32, "window_size": 2, "depths": (1, 1, 1, 1)}, 32, "vit"),
    ("convnext-nhwc-layer-scale", "test_convnext", {}, 32, "conv"),
    ("reparameterisable", "fastvit_t8", {}, 32, "all"),
    ("conv-weight-read", "mobilevitv2_050", {}, 64, "all"),
    ("multihead-attention", "torch_multihead_attention", {}, 32, "all"),
]


def run(name, kwargs, side, preset):
    base = conformance.create(name, kwargs)
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    report, plain = conformance.run_vislora(base, preset, x)
    return report, plain, base, x


@pytest.mark.parametrize("trap,name,kwargs,side,preset", CASES, ids=[c[0] for c in CASES])
def test_every_adapter_is_live_trains_and_merges_exactly(trap, name, kwargs, side, preset):
    report, plain, _, _ = run(name, kwargs, side, preset)
    assert "refused" not in report and report["adapted"] > 0
    live = report["live"]  # inert: nothing the layer does matters at this input (test_nfnet: an SE's dead ReLU)
    assert not live["dead"] and not live["no_gradient"] and len(live["inert"]) <= 2
    assert live["live"] + len(live["inert"]) == live["layers"] == report["adapted"]
    assert report["trains"]["finite"] and not report["trains"]["unchanged"]
    assert report["exact"]["ok"], conformance.exact_reason(report["exact"])
    assert plain is not None and not any(type(m).__module__.startswith("vislora") for m in plain.modules())


def test_multihead_attention_in_projection_is_adapted():
    report, _, _, _ = run("torch_multihead_attention", {}, 32, "all")
    assert not any(k.startswith("MultiheadAttention") for k in report["skipped"])


def test_export_of_the_unloaded_model_matches_pytorch():
    _, plain, base, x = run("test_efficientnet", {}, 32, "all")
    export = conformance.check_export(plain, base, x)
    assert export["torchscript"]["ok"] and export["onnx"]["ok"], export


class ReadsWeight(nn.Module):
    """A layer whose parent calls F.linear on its weight: through `.weight` (live), detached (no gradient), or
    on the wrapped layer's own weight (bypassed)."""

    def __init__(self):
        super().__init__()
        self.used = nn.Linear(8, 8)
        self.detached = nn.Linear(8, 8)
        self.bypassed = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = x.mean((2, 3)).repeat(1, 3)[:, :8]
        x = F.linear(x, self.used.weight) + F.linear(x, self.detached.weight.detach())
        x = x + F.linear(x, self.bypassed.base_layer.weight if hasattr(self.bypassed, "base_layer")
                         else self.bypassed.weight)
        return self.head(x)


@pytest.mark.parametrize("mode", ["gradient", "forward"])
def test_live_check_names_bypassed_and_untrainable_adapters(mode):
    torch.manual_seed(0)
    model = ReadsWeight().eval()
    inject(model, LoraConfig(targets=["used", "detached", "bypassed"]), verify=False)
    live = conformance.check_live(model, list(lora_layers(model)), torch.randn(1, 3, 4, 4), mode=mode)
    assert live["dead"] == ["bypassed"]
    assert live["no_gradient"] == (["detached"] if mode == "gradient" else [])


def test_peft_bypass_on_eva_is_measured_not_assumed():
    """PEFT's adapter on EVA's attn.qkv is skipped by timm's F.linear(x, self.qkv.weight): the check says so."""
    base = conformance.create("eva02_tiny_patch14_224", {"img_size": 28, "depth": 2})
    model = get_peft_model(base, PeftLoraConfig(r=8, lora_alpha=16, target_modules=["attn.qkv", "mlp.fc2"]))
    live = conformance.check_live(model, conformance.peft_layers(model), torch.randn(1, 3, 28, 28))
    assert live["dead"] == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]


def test_reparameterisable_model_deploys_with_its_adapters():
    """FastViT (MobileOne branches): the unloaded model fuses to the same output, fusing with adapters on keeps
    their update (timm reads each branch's .weight), and the fused, deployed form adapts live and exact."""
    _, plain, base, x = run("fastvit_t8", {}, 32, "all")
    rep = conformance.check_reparam(base, plain, x)
    assert rep["ok"] and rep["fuse_adapted"] == "keeps the update", rep
