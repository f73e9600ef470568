"""Adapter files: save/load round trips, all-or-nothing loading, PEFT compatibility in both directions."""

import copy
import json
import logging
import warnings

import pytest
import timm
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftConfig, PeftModel, get_peft_model

import vislora
from vislora import LoraConfig, inject, load_adapter, lora_layers, save_adapter

import zoo

VIT, CNN = zoo.case("vit"), zoo.case("resnet")


def build(case, seed=0):
    return case.build(seed)


def trained(case, config):
    model = build(case)
    inject(model, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.normal_(std=0.1)
        for p in model.get_classifier().parameters():
            p.add_(torch.randn_like(p))
    return model


@pytest.mark.parametrize("spec,config", zoo.with_config("vit", "mobilenet", "convnext", "vit-dora", r=4) + [
    pytest.param(zoo.case("vit-qv"), zoo.case("vit-qv").config(r=4, rslora=True), id="vit-qv-rslora"),
    pytest.param(CNN, CNN.config(r=0.25), id="resnet-fraction"),  # the zoo's two other cases, with a twist
    pytest.param(VIT, VIT.config(r=4, qkv="qkv", init="pissa"), id="vit-pissa"),
])
def test_save_load_roundtrip(tmp_path, spec, config):
    model = trained(spec, config)
    x = torch.randn(2, 3, 32, 32)
    save_adapter(model, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["target_modules"]
    fresh = build(spec)
    load_adapter(fresh, tmp_path)
    with torch.no_grad():
        assert torch.allclose(fresh(x), model(x), atol=1e-5)
    if config.init == "pissa":  # saved relative to the original weights, as a plain adapter of rank 2r
        return
    # loading into an already injected model with the same layout works too
    again = build(spec)
    inject(again, config)
    load_adapter(again, tmp_path)
    with torch.no_grad():
        assert torch.allclose(again(x), model(x), atol=1e-6)


def test_load_into_wrong_model_is_all_or_nothing(tmp_path):
    save_adapter(trained(VIT, LoraConfig(targets="vit", r=4)), tmp_path)
    other = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, patch_size=4,
                              depth=2, embed_dim=96, num_heads=3)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match="shape mismatch") as err:
        load_adapter(other, tmp_path)
    assert "blocks.0" in str(err.value)
    assert not any(True for _ in lora_layers(other))
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    assert all(p.requires_grad for p in other.parameters())


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(build(VIT), tmp_path)


@pytest.mark.parametrize("spec,config", zoo.with_config("vit", "vit-qv", "resnet", "vit-dora", r=4) + [
    pytest.param(VIT, VIT.config(r=4, init="pissa"), id="vit-pissa"),
])  # not mobilenet or convnext: PEFT refuses a depthwise conv whose groups do not divide the rank
def test_peft_loads_vislora_files(tmp_path, spec, config):
    model = trained(spec, config)
    save_adapter(model, tmp_path)
    x = torch.randn(2, 3, 32, 32)
    peft_model = PeftModel.from_pretrained(build(spec), tmp_path).eval()
    with torch.no_grad():
        y = model(x)
        # PiSSA moved a residual into the base weights: the file holds [B, -B0][A; A0], exact up to fp32 rounding
        # of that cancellation (1.4e-6 of the output scale seen on one machine); PEFT's DoRA forms the norm of
        # W + sBA where vislora's comes from W, A, B: fp32 rounding again (6.5e-7 of the scale, 1.7e-5 absolute
        # on outputs of 26, seen on another machine). Both are held to 1e-5 of the output scale.
        relative = config.init == "pissa" or config.use_dora
        tol = 1e-5 * max(1.0, y.abs().max().item()) if relative else 1e-5
        assert (peft_model(x) - y).abs().max().item() <= tol


@pytest.mark.parametrize("spec,peft_targets,save", [
    (VIT, ["qkv", "proj", "fc1", "fc2"], ["head"]),
    (CNN, r"layer\d\.\d\.(conv\d|downsample\.0)", ["fc"]),
], ids=["vit", "resnet"])
def test_vislora_loads_peft_files(tmp_path, spec, peft_targets, save):
    torch.manual_seed(3)
    peft_model = get_peft_model(build(spec), PeftLoraConfig(r=4, lora_alpha=8, target_modules=peft_targets,
                                                            modules_to_save=save, init_lora_weights=False)).eval()
    peft_model.save_pretrained(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    model = load_adapter(build(spec), tmp_path).eval()
    with torch.no_grad():
        assert (model(x) - peft_model(x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("train,bias", [
    (["head", "*.bias"], "all"),  # BitFit beside LoRA: PEFT's bias="all"
    (["head", "*norm*"], "none"),  # every norm module: modules_to_save
    (["head", "blocks.1"], "none"),  # the last block at full rank
    (["head", "*norm*", "*.bias"], "all"),  # norms whole, then the biases left outside them (norm biases match too)
], ids=["biases", "norms", "last-block", "norms-and-biases"])
def test_hybrid_full_rank_parts_round_trip_in_vislora_and_peft(tmp_path, train, bias):
    model = inject(build(VIT), LoraConfig(targets="vit", r=4, train=train))
    summary = vislora.trainable_summary(model)
    assert summary["fully_trained"] == summary["trainable"] - summary["adapter"] > 0
    torch.manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["bias"] == bias
    x = torch.randn(2, 3, 32, 32)
    fresh = load_adapter(build(VIT), tmp_path)
    with torch.no_grad():
        y = model(x)
        assert (fresh(x) - y).abs().max().item() == 0.0
        assert (PeftModel.from_pretrained(build(VIT), tmp_path).eval()(x) - y).abs().max().item() <= 1e-5
        assert (vislora.unload(fresh)(x) - y).abs().max().item() <= 1e-5  # merged keeps them


def test_a_stem_trained_by_glob_reloads_exactly(tmp_path):
    """`train: [head, "conv*"]` on ResNet trains the stem `conv1`; PEFT would read that modules_to_save entry as
    every `*.conv1`, vislora reloads exactly the modules it trained (the run rebuilds)."""
    model = trained(CNN, LoraConfig(targets="conv", r=2, train=["head", "conv*"]))
    assert model.vislora_train == ["fc", "conv1"]
    with torch.no_grad():
        model.conv1.weight.add_(0.1)  # what training did to the stem
    save_adapter(model, tmp_path)
    fresh = load_adapter(build(CNN), tmp_path).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh(x), model.eval()(x))
    assert fresh.vislora_train == ["fc", "conv1"]


def test_peft_reads_a_vislora_adapter_without_warnings(tmp_path):
    """vislora's own fields live in vislora.json beside adapter_config.json: PEFT warned about an unknown key
    'vislora' in its config (issue #31); files written before still load."""
    model = inject(build(VIT), LoraConfig(r=2, targets="vit"))
    save_adapter(model, tmp_path)
    assert "vislora" not in json.loads((tmp_path / "adapter_config.json").read_text())
    assert json.loads((tmp_path / "vislora.json").read_text())["ranks"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PeftConfig.from_pretrained(str(tmp_path))
    old = {**json.loads((tmp_path / "adapter_config.json").read_text()),
           "vislora": json.loads((tmp_path / "vislora.json").read_text())}
    (tmp_path / "vislora.json").unlink()
    (tmp_path / "adapter_config.json").write_text(json.dumps(old))  # the layout of earlier vislora versions
    assert {n: ly.r for n, ly in lora_layers(load_adapter(build(VIT), tmp_path))} == \
        {n: ly.r for n, ly in lora_layers(model)}


# ---- files of other tools and other models (issues 14 and 18) ----------------------------------------
def test_peft_pissa_files_load_as_peft_loads_them_and_olora_is_refused(tmp_path):
    vit = zoo.case("vit")
    x = torch.randn(2, 3, 32, 32)
    for init in ("pissa", "olora"):
        peft_model = get_peft_model(vit.build(), PeftLoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "fc1"],
                                                                init_lora_weights=init)).eval()
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.add_(0.05 * torch.randn_like(p))
        peft_model.save_pretrained(tmp_path / init)
        with torch.no_grad():
            reference = PeftModel.from_pretrained(vit.build(), tmp_path / init).eval()(x)
        if init == "olora":
            with pytest.raises(ValueError, match="init_lora_weights='olora'"):
                load_adapter(vit.build(), tmp_path / init)
            continue
        with torch.no_grad():
            assert (load_adapter(vit.build(), tmp_path / init)(x) - reference).abs().max().item() <= 1e-5


def test_adapter_of_another_architecture_is_refused(tmp_path, caplog):
    small = inject(timm.create_model("resnet18", pretrained=False, num_classes=3), LoraConfig(targets="all", r=2))
    save_adapter(small, tmp_path / "r18")
    with pytest.raises(ValueError, match="resnet18"), caplog.at_level(logging.WARNING, "vislora.adapters"):
        load_adapter(timm.create_model("resnet34", pretrained=False, num_classes=3), tmp_path / "r18")
    assert "resnet34" in caplog.text
    vit = zoo.case("vit")
    save_adapter(inject(vit.build(), LoraConfig(targets="vit", r=2)), tmp_path / "d2")
    deeper = timm.create_model(vit.model, pretrained=False, num_classes=5, **{**vit.kwargs, "depth": 4})
    with pytest.raises(ValueError, match="not in the file"):
        load_adapter(deeper, tmp_path / "d2")
    load_adapter(vit.build(), tmp_path / "d2")  # the same architecture loads


def test_file_scaling_wins_over_an_injected_model(tmp_path):
    resnet = zoo.case("resnet")
    model = resnet.build(num_classes=3)
    inject(model, LoraConfig(targets="conv", r=4, alpha=32, rslora=True))
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.normal_(std=0.05)
    save_adapter(model, tmp_path)
    other = resnet.build(num_classes=3)
    inject(other, LoraConfig(targets="conv", r=4, alpha=4))  # same shapes, other alpha and no rslora
    load_adapter(other, tmp_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (other(x) - model(x)).abs().max().item() <= 1e-5


def test_anchored_alpha_pattern_round_trip_in_vislora_and_peft(tmp_path):
    """targets 'conv1' adapts the stem conv1 and every layerN.M.conv1; the stem alone gets another alpha."""
    resnet = zoo.case("resnet")
    model = resnet.build(num_classes=3)
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
    fresh = load_adapter(resnet.build(num_classes=3), tmp_path)
    assert {n: (ly.alpha, ly.r) for n, ly in lora_layers(fresh)} == {n: (ly.alpha, ly.r) for n, ly in
                                                                      lora_layers(model)}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (fresh(x) - model(x)).abs().max().item() <= 1e-5
        peft_model = PeftModel.from_pretrained(resnet.build(num_classes=3), tmp_path).eval()
        assert (peft_model(x) - model(x)).abs().max().item() <= 1e-5
