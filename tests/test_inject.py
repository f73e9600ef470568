"""Table-driven tests of the foundation: every model family, every conv geometry, merge exactness, selection."""

import copy
import logging
import warnings

import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import BatchNormAct2d, Conv2dSame, StdConv2d
from torch.func import functional_call
from torch.nn.utils import parametrizations

import vislora
from vislora import LoraConfig, inject, lora_layers, merge, trainable_summary, unload, unmerge
from vislora.inject import freeze_bn_stats, unadaptable_layers
from vislora.layers import LoraLayer, _depthwise_on_cpu
from vislora.targets import find_targets

import zoo
from zoo import RUN_VIT, Case


class OddConvs(nn.Module):
    """Every conv geometry timm models use, and some they don't."""

    def __init__(self):
        super().__init__()
        self.dilated = nn.Conv2d(3, 8, 3, padding=2, dilation=2)
        self.reflect = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")
        self.circular = nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular", stride=2)
        self.k1x7 = nn.Conv2d(8, 8, (1, 7), padding=(0, 3))
        self.k7x1 = nn.Conv2d(8, 8, (7, 1), padding=(3, 0), padding_mode="replicate")
        self.grouped = nn.Conv2d(8, 16, 3, padding=1, groups=4)
        self.depthwise = nn.Conv2d(16, 16, 5, padding=2, groups=16)
        self.std = StdConv2d(16, 16, 3, padding=1)
        self.same = Conv2dSame(16, 16, 3, stride=2)
        self.weight_norm = parametrizations.weight_norm(nn.Conv2d(16, 16, 1))
        self.pointwise = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        for conv in list(self.children())[:-1]:
            x = torch.relu(conv(x))
        return self.fc(x.mean((2, 3)))


# the zoo's cases, then the families only these tests build (the same Case type: model, kwargs, input size, config)
FAMILIES = zoo.CASES + [
    Case("deit", "deit_tiny_patch16_224", dict(img_size=32, patch_size=4, depth=2), 32,
         {"targets": "vit", "qkv": "qv"}),
    Case("swin", "swin_tiny_patch4_window7_224", dict(img_size=32, window_size=2, depths=(1, 1, 1, 1)), 32,
         {"targets": "vit"}),
    Case("eva02", "eva02_tiny_patch14_224", dict(img_size=28, depth=2), 28, {"targets": "vit"}),
    Case("beit", "beit_base_patch16_224", dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2), 32,
         {"targets": ["attn.qkv"]}),
    Case("efficientnet_b0", "efficientnet_b0", {}, 32, {"targets": "conv", "r": 4}),
    Case("mobilenetv3-fraction", "mobilenetv3_small_100", {}, 32, {"targets": "conv", "r": 0.25}),
    Case("regnetx_002", "regnetx_002", {}, 32, {"targets": "conv"}),
    Case("inception_v3", "inception_v3", {}, 75, {"targets": "conv", "r": 4}),
    Case("tf_efficientnet_b0", "tf_efficientnet_b0", {}, 32, {"targets": "conv", "r": 4}),
    Case("resnetv2_50x1_bit", "resnetv2_50x1_bit", {}, 32, {"targets": "all", "r": 4}),
    Case("odd_convs", "odd_convs", {}, 24, {"targets": "all", "r": 2, "train": ["fc"]}),
]


def build(name, kwargs):
    torch.manual_seed(0)
    if name == "odd_convs":
        return OddConvs().eval()
    return timm.create_model(name, pretrained=False, num_classes=5, **kwargs).eval()


def randomize(model, std=0.1):
    torch.manual_seed(1)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.normal_(std=std)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("case", FAMILIES, ids=[c.id for c in FAMILIES])
def test_model_family(case):
    model = build(case.model, case.kwargs)
    base = copy.deepcopy(model)
    x = torch.randn(2, 3, case.size, case.size)
    with torch.no_grad():
        y_base = base(x)
    inject(model, case.config(), verify=True)
    assert any(True for _ in lora_layers(model))
    with torch.no_grad():
        if case.config().use_dora:  # m * W / |W| with m = |W|: the base up to rounding (test_dora's bound)
            assert rel(model(x), y_base) <= 1e-6
        else:
            assert torch.equal(model(x), y_base), "B = 0 must reproduce the base model exactly"
    randomize(model)
    with torch.no_grad():
        y_unmerged = model(x)
        assert rel(y_unmerged, y_base) > 1e-3, "the adapters must be on the forward path"
        merge(model)
        y_merged = model(x)
        assert rel(y_merged, y_unmerged) < 1e-4
        unmerge(model)
        assert torch.equal(model(x), y_unmerged)
    # only adapter and `train` parameters require grad, and all of them receive gradients
    model.train()
    model(x).square().mean().backward()
    for pname, p in model.named_parameters():
        is_adapter = ".lora_" in pname
        in_train = any(pname.startswith(t + ".") for t in model.vislora_train)
        assert p.requires_grad == (is_adapter or in_train), pname
        assert (p.grad is not None) == p.requires_grad, pname
    model.eval()
    unloaded = unload(model)
    assert not any(type(m).__module__.startswith("vislora") for m in unloaded.modules())
    with torch.no_grad():
        assert rel(unloaded(x), y_merged) < 1e-5


@pytest.mark.parametrize("name,kwargs", [("resnet18", {}), ("efficientnet_b0", {"drop_rate": 0.0})])
def test_frozen_batchnorm_keeps_running_stats(name, kwargs):
    """In train mode frozen BatchNorm (plain, and timm's BatchNormAct2d) gives the eval-mode output, never updates its
    statistics, passes gradients; unload restores the plain classes."""
    model = build(name, kwargs)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for bn in bns:
            bn.running_mean.normal_(std=0.5)
            bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(4, 3, 32, 32, requires_grad=True)
    with torch.no_grad():
        want = model.eval()(x)
    inject(model, LoraConfig(targets="all"))
    assert {type(bn).__name__ for bn in bns} <= {"FrozenStatsBatchNorm2d", "FrozenStatsBatchNormAct2d"}
    before = [bn.running_mean.clone() for bn in bns]
    got = model.train()(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(bn.running_mean, b) for bn, b in zip(bns, before, strict=True))
    got.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    unload(model)
    assert {type(bn) for bn in bns} <= {nn.BatchNorm2d, BatchNormAct2d}


def test_freeze_bn_stats_leaves_kept_modules_alone():
    model = build("resnet18", {}).train()
    freeze_bn_stats(model, keep=["layer4"])
    frozen, kept = model.bn1.running_mean.clone(), model.layer4[0].bn1.running_mean.clone()
    model(torch.randn(4, 3, 32, 32))
    assert torch.equal(model.bn1.running_mean, frozen)
    assert not torch.equal(model.layer4[0].bn1.running_mean, kept)


def test_bf16_merge_unmerge_is_bit_exact():
    model = build("vit_tiny_patch16_224", dict(img_size=32, patch_size=4, depth=1)).to(torch.bfloat16)
    inject(model, LoraConfig(targets="vit"), verify=False)
    randomize(model)
    qkv = model.blocks[0].attn.qkv
    original = qkv.base_layer.weight.detach().clone()
    merge(model)
    assert not torch.equal(qkv.base_layer.weight, original)
    unmerge(model)
    assert torch.equal(qkv.base_layer.weight, original)
    merge(model)
    merge(model)  # idempotent
    unmerge(model)
    unmerge(model)
    assert torch.equal(qkv.base_layer.weight, original)


@pytest.mark.parametrize("kernel,stride,dilation,padding", [
    (5, 1, 1, 2), (7, 2, 1, 3), (5, 2, 2, 1), ((5, 3), (2, 1), 1, (2, 0)), (7, 1, 1, 3), (5, 2, 1, "same"),
], ids=["5x5", "7x7-stride2", "5x5-stride2-dilated", "5x3", "7x7-tiny-map", "tf-same-5x5-stride2"])
def test_depthwise_weight_gradient_is_exact(kernel, stride, dilation, padding):
    """Depthwise LoRA on CPU takes its weight gradient from a grouped conv of input and output gradient:
    the gradients of x, A, B and the bias must equal plain autograd through the base conv with W + s B A."""
    torch.manual_seed(0)
    if padding == "same":  # timm's Conv2dSame (TF padding, computed in forward)
        conv = Conv2dSame(6, 6, kernel, stride=stride, dilation=dilation, groups=6).double()
    else:
        conv = nn.Conv2d(6, 6, kernel, stride=stride, dilation=dilation, padding=padding, groups=6).double()
    size = (3, 2) if kernel == 7 and stride == 1 else (11, 9)
    layer = LoraLayer(conv, r=2, alpha=4)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 6, *size, dtype=torch.float64, requires_grad=True)
    assert _depthwise_on_cpu(conv, x)
    params = (x, layer.lora_A, layer.lora_B, conv.bias)
    y = layer(x)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, params, grad)
    y_ref = functional_call(conv, {"weight": conv.weight + layer.delta_weight(torch.float64)}, (x,))
    want = torch.autograd.grad(y_ref, params, grad)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for name, a, b in zip(("x", "A", "B", "bias"), got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


def test_qkv_parts_adapt_only_q_and_v():
    model = build("vit_tiny_patch16_224", dict(img_size=32, patch_size=4, depth=1))
    inject(model, LoraConfig(targets=["attn.qkv"], qkv="qv", r=4))
    layer = model.blocks[0].attn.qkv
    randomize(model)
    delta = layer.delta_weight()
    d = delta.shape[0] // 3
    assert delta[:d].abs().sum() > 0 and delta[2 * d:].abs().sum() > 0
    assert delta[d:2 * d].abs().sum() == 0
    assert layer.lora_A.numel() + layer.lora_B.numel() == 2 * 4 * (192 + 192)


def test_weight_reading_attention_gets_the_update():
    """BEiT/EVA call F.linear(x, self.qkv.weight): the update must apply there too, before merging."""
    model = build("beit_base_patch16_224", dict(img_size=32, patch_size=8, depth=1, embed_dim=64, num_heads=2))
    x = torch.randn(1, 3, 32, 32)
    y0 = model(x)
    inject(model, LoraConfig(targets=["attn.qkv"]))
    randomize(model)
    model.train()
    y1 = model(x)
    assert rel(y1, y0) > 1e-3
    y1.sum().backward()
    assert model.blocks[0].attn.qkv.lora_B.grad.abs().sum() > 0


@pytest.mark.parametrize("config,message", [
    (LoraConfig(targets=["no_such_layer"]), "no_such_layer"),
    (LoraConfig(targets="vit"), "vit"),
    (LoraConfig(targets=["bn1"]), "bn1"),
    (LoraConfig(targets=["conv1"], r=0), "conv1"),
    (LoraConfig(targets=["layer1.0.conv1"], r=1000), "layer1.0.conv1"),
    (LoraConfig(targets="all", train=["nonexistent"]), "nonexistent"),
])
def test_bad_configs_name_the_culprit(config, message):
    model = build("resnet18", {})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        inject(model, config)
    assert not any(True for _ in lora_layers(model))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_presets_skip_stem_and_head_and_patterns_work():
    model = build("efficientnet_b0", {})
    inject(model, LoraConfig(targets="all", r=4))
    names = [n for n, _ in lora_layers(model)]
    assert "conv_stem" not in names and "classifier" not in names
    assert any("conv_dw" in n for n in names)
    model = build("resnet18", {})
    inject(model, LoraConfig(targets=[r"layer\d\.\d\.conv1", "downsample.0"], exclude=["layer4.0.conv1"]))
    names = {n for n, _ in lora_layers(model)}
    assert "layer1.0.conv1" in names and "layer4.0.conv1" not in names and "layer2.0.downsample.0" in names


def test_rank_fraction_and_oversized_note(caplog):
    """An adapter larger than its layer is a logged note (the shipped MobileNetV2 recipe has one), not a warning."""
    model = build("mobilenetv3_small_100", {})
    with warnings.catch_warnings(), caplog.at_level(logging.INFO, logger="vislora.inject"):
        warnings.simplefilter("error")
        inject(model, LoraConfig(targets=["blocks.1.0.conv_dw"], r=9))
    assert "more than the layer itself" in caplog.text
    model = build("vit_tiny_patch16_224", dict(img_size=32, patch_size=4, depth=1))
    inject(model, LoraConfig(targets=["mlp.fc1"], r=0.5))
    assert model.blocks[0].mlp.fc1.r == 96


def test_verify_names_a_broken_layer(monkeypatch):
    model = build("resnet18", {})
    monkeypatch.setattr(vislora.layers.LoraLayer, "delta_weight",
                        lambda self, dtype=None: torch.zeros_like(self.base_layer.weight))
    with pytest.raises(ValueError, match="layer1.0.conv1"):
        inject(model, LoraConfig(targets=["layer1.0.conv1"]), verify=True)


def test_trainable_summary_and_optimizer_params():
    model = build("vit_tiny_patch16_224", dict(img_size=32, patch_size=4, depth=2))
    inject(model, LoraConfig(targets="vit", r=4))
    s = trainable_summary(model)
    assert s["adapted_layers"] == 8
    assert s["trainable"] == s["adapter"] + sum(p.numel() for p in model.head.parameters())
    assert 0 < s["trainable_share"] < 0.1


def test_one_exclude_or_train_pattern_given_as_a_string_is_one_pattern():
    """`exclude: blocks.0.attn.qkv` (a string, not a list) is honoured, not read as its characters."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, patch_size=8,
                              depth=2)
    inject(model, LoraConfig(r=2, targets="vit", exclude="blocks.0.attn.qkv", train="head"), verify=False)
    names = [n for n, _ in lora_layers(model)]
    assert "blocks.0.attn.qkv" not in names and "blocks.1.attn.qkv" in names
    assert model.head.weight.requires_grad


def test_inject_on_meta_device_and_reentrant_checkpointing():
    with torch.device("meta"):
        model = timm.create_model("vit_tiny_patch16_224", num_classes=3, **RUN_VIT["kwargs"])
    inject(model, LoraConfig(r=4))  # no verify: a meta model has no numbers
    assert model(torch.randn(2, 3, 32, 32, device="meta")).shape == (2, 3)
    timm.layers.set_reentrant_ckpt(True)
    try:
        model = timm.create_model("vit_tiny_patch16_224", num_classes=3, **RUN_VIT["kwargs"])
        inject(model, LoraConfig(r=4))
        model.set_grad_checkpointing(True)
        model.train()(torch.randn(2, 3, 32, 32)).sum().backward()
        assert all(layer.lora_A.grad is not None for _, layer in lora_layers(model))
        vislora.unload(model)
        assert not model._forward_pre_hooks
    finally:
        timm.layers.set_reentrant_ckpt(False)


def test_inject_keeps_the_eval_mode_of_the_layers_it_wraps():
    """An adapter injected into an eval-mode model is in eval mode too (no adapter dropout at eval, and unload
    gives back layers in the mode they had): verify must not leave them in train mode."""
    model = build("resnet18", {})
    inject(model, LoraConfig(targets="all", dropout=0.5), verify=True)
    assert not any(m.training for m in model.modules())
    x = torch.randn(1, 3, 32, 32)
    randomize(model)
    with torch.no_grad():
        assert torch.equal(model(x), model(x)), "adapter dropout must be off in eval mode"
    assert not any(m.training for m in unload(model).modules())


class AttentionAndConv1d(nn.Module):
    """nn.MultiheadAttention (OpenCLIP) and an ECA-style Conv1d, adapted; a Conv3d and an Embedding, which no
    preset can adapt."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, stride=4)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.eca = nn.Conv1d(1, 1, 3, padding=1, bias=False)
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)
        self.volume = nn.Conv3d(1, 1, 1)  # unused: weights vislora cannot adapt
        self.tokens = nn.Embedding(4, 16)
        self.pretrained_cfg = {"first_conv": "stem", "classifier": "head"}

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        x = x * self.eca(x.mean(1, keepdim=True)).sigmoid()
        return self.head(self.fc(x).mean(1))


def test_presets_adapt_attention_and_conv1d_and_name_what_they_cannot(caplog):
    """nn.MultiheadAttention's in_proj (and its out_proj) and a Conv1d are adapted, live and exact; a Conv3d and an
    Embedding are named in one logged warning (never a silent skip); explicit patterns say nothing extra."""
    model = AttentionAndConv1d().requires_grad_(False)  # torch's MHA takes another path when params need grad
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        y0 = model(x)
    skipped = unadaptable_layers(model)
    assert list(skipped) == ["volume", "tokens"]
    assert skipped["volume"].startswith("Conv3d: only nn.Conv1d and nn.Conv2d")
    with caplog.at_level(logging.WARNING, "vislora.inject"):
        inject(model, LoraConfig(targets="all", r=2), verify=True)
    assert "preset 'all' leaves 2 layer(s) that vislora cannot adapt, e.g. 'volume'" in caplog.text
    assert {n for n, _ in lora_layers(model)} == {"attn", "attn.out_proj", "eca", "fc"}
    with torch.no_grad():
        assert torch.equal(model(x), y0)
        for name, layer in lora_layers(model):
            saved = layer.lora_B.clone()
            layer.update.perturb_()
            assert not torch.allclose(model(x), y0), name  # each adapter, alone, moves the output
            layer.lora_B.copy_(saved)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inject(AttentionAndConv1d(), LoraConfig(targets=["fc"]))


@pytest.mark.parametrize("name,kwargs,wanted", [
    ("convit_tiny", dict(depth=2), {"blocks.0.attn.qk", "blocks.0.attn.v", "blocks.0.attn.proj"}),
    ("crossvit_tiny_240", {}, {"blocks.0.fusion.0.attn.wq", "blocks.0.fusion.0.attn.wk", "blocks.0.fusion.0.attn.wv"}),
    ("tnt_s_legacy_patch16_224", dict(depth=2), {"blocks.0.attn_in.qk", "blocks.0.attn_in.v", "blocks.0.attn_out.qk",
                                                  "blocks.0.attn_out.proj", "blocks.0.mlp_in.fc1", "blocks.0.mlp.fc2"}),
])
def test_vit_preset_adapts_every_attention_of_convit_crossvit_and_tnt(name, kwargs, wanted):
    """ConViT's GPSA (qk, v), CrossViT's cross-attention (wq, wk, wv) and TNT's inner and outer attention are
    attention projections: the vit preset takes them (the conformance suite found them skipped)."""
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=5, **kwargs)
    names = set(find_targets(model, LoraConfig(targets="vit")))
    assert wanted <= names
    assert not any(n.endswith(("pos_proj", "proj_l", "proj_w")) for n in names)


class SharedConv(nn.Module):
    """Two blocks that hold one conv (CoaT's shared position encodings): the adapter must reach both paths."""

    def __init__(self):
        super().__init__()
        conv = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.a, self.b = nn.Sequential(conv, nn.ReLU()), nn.Sequential(conv, nn.Tanh())

    def forward(self, x):
        return self.b(self.a(x))


def test_a_shared_layer_gets_one_adapter_on_every_path_and_unloads_shared():
    torch.manual_seed(0)
    model, x = SharedConv(), torch.randn(2, 4, 6, 6)
    base = copy.deepcopy(model)
    inject(model, LoraConfig(r=2, targets="conv"))
    assert [n for n, _ in lora_layers(model)] == ["a.0"] and model.a[0] is model.b[0]
    for p in model.a[0].adapter_parameters():
        nn.init.normal_(p)  # a live update (B no longer zero)
    assert not torch.allclose(model(x), base(x), atol=1e-3)
    merged = copy.deepcopy(model)
    merge(merged)
    assert torch.allclose(model(x), merged(x), atol=1e-6)
    plain = unload(model)
    assert plain.a[0] is plain.b[0] and not isinstance(plain.a[0], LoraLayer)
    assert torch.allclose(plain(x), merged(x), atol=1e-6)
