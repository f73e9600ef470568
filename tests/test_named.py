"""Several named adapters on one backbone: exact switching, per-adapter heads, mixed batches equal to each
adapter's merged model, PEFT's multi-adapter layout both ways, refusals, and single-adapter runs unchanged."""

import copy
import json

import pytest
import timm
import torch
import yaml
from peft import PeftModel

from vislora import LoraConfig, inject, load_adapter, lora_layers, merge, save_adapter, unload, unmerge
from vislora.cli import main
from vislora.data import make_synthetic_folder
from vislora.named import adapter_names, add_adapter, delete_adapter, mixed_forward, set_adapter

VIT = ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2))
CNN = ("mobilenetv2_035", {})
SPECS = {"vit": VIT, "mobilenet": CNN}


def base(spec, classes=5):
    """The shared backbone (the same weights whatever the head: its classifier is replaced after)."""
    torch.manual_seed(0)
    name, kwargs = spec
    model = timm.create_model(name, pretrained=False, num_classes=5, **kwargs).eval()
    if classes != 5:
        model.reset_classifier(classes)
    return model


def close(a, b, spec) -> bool:
    """fp32 agreement: 1e-5 of the output scale; 1e-4 through MobileNetV2's 52 DoRA layers and BatchNorms."""
    return (a - b).abs().max() <= (1e-5 if spec is VIT else 1e-4) * b.abs().max().clamp_min(1e-6)


def trained_adapter(spec, tmp_path, tag: str, seed: int, classes: int = 5, **config) -> tuple:
    """An adapter (random B / magnitudes / head) saved to tmp_path/tag, and its merged model."""
    targets = "vit" if spec is VIT else "conv"
    model = inject(base(spec, classes), LoraConfig(r=2, targets=targets, **config), verify=False)
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.update.perturb_()
        for p in model.get_classifier().parameters():
            p.normal_()
    save_adapter(model, tmp_path / tag)
    return tmp_path / tag, unload(copy.deepcopy(model)).eval()


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Small models on a shared 2-core machine: one thread (conftest.one_thread)."""


CASES = [("vit", {}, {}), ("vit-dora-vs-lora", {"use_dora": True}, {"r": 2}),
         ("mobilenet-dora", {"use_dora": True}, {}), ("vit-other-classes", {}, {"classes": 3})]


@pytest.mark.parametrize("spec_name,config_a,extra_b", CASES, ids=[c[0] for c in CASES])
def test_switching_is_exact_and_mixed_batches_match_each_merged_model(tmp_path, spec_name, config_a, extra_b):
    spec = SPECS[spec_name.split("-")[0]]
    classes_b = extra_b.pop("classes", 5)
    dir_a, merged_a = trained_adapter(spec, tmp_path, "a", 1, **config_a)
    dir_b, merged_b = trained_adapter(spec, tmp_path, "b", 2, classes=classes_b)
    model = load_adapter(base(spec), dir_a)
    load_adapter(model, dir_b, name="b")
    assert adapter_names(model) == ["default", "b"]
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        y_a = model(x)
        set_adapter(model, "b")
        y_b = model(x)
        set_adapter(model, "default")
        assert torch.equal(model(x), y_a)  # A -> B -> A: bit-identical
        assert close(y_a, merged_a(x), spec) and close(y_b, merged_b(x), spec)
        assert y_b.shape[1] == classes_b
    names = ["default", "b", "b", "default"]
    out = mixed_forward(model, x, names)
    for i, name in enumerate(names):
        reference = (merged_a if name == "default" else merged_b)(x[i:i + 1])[0]
        assert close(out[i], reference, spec), (i, name)
    with torch.no_grad():
        assert torch.equal(model(x), y_a)  # mixed_forward left the model as it was


def test_merging_one_adapter_for_deployment_and_switching_back(tmp_path):
    dir_a, _ = trained_adapter(VIT, tmp_path, "a", 1)
    dir_b, merged_b = trained_adapter(VIT, tmp_path, "b", 2)
    model = load_adapter(load_adapter(base(VIT), dir_a), dir_b, name="b")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y_a = model(x)
        with pytest.raises(ValueError, match="unmerge"):
            merge(model)
            set_adapter(model, "b")
        unmerge(model)
        set_adapter(model, "b")
        merge(model)
        assert (model(x) - merged_b(x)).abs().max() <= 1e-5 * merged_b(x).abs().max()
        unmerge(model)
        set_adapter(model, "default")
        assert torch.equal(model(x), y_a)
    delete_adapter(model, "b")
    assert adapter_names(model) == ["default"] and "vislora_modules" not in dict(model.named_children())


def test_peft_multi_adapter_layout_both_ways(tmp_path):
    dir_a, merged_a = trained_adapter(VIT, tmp_path, "a", 1)
    dir_b, merged_b = trained_adapter(VIT, tmp_path, "b", 2)
    model = load_adapter(load_adapter(base(VIT), dir_a), dir_b, name="cats")
    save_adapter(model, tmp_path / "both")
    assert (tmp_path / "both" / "adapter_config.json").is_file()
    assert (tmp_path / "both" / "cats" / "adapter_config.json").is_file()
    x = torch.randn(2, 3, 32, 32)
    peft = PeftModel.from_pretrained(base(VIT), tmp_path / "both").eval()
    peft.load_adapter(tmp_path / "both" / "cats", adapter_name="cats")
    with torch.no_grad():
        assert (peft(x) - merged_a(x)).abs().max() <= 1e-5 * merged_a(x).abs().max()
        peft.set_adapter("cats")
        assert (peft(x) - merged_b(x)).abs().max() <= 1e-5 * merged_b(x).abs().max()
    again = load_adapter(load_adapter(base(VIT), tmp_path / "both"), tmp_path / "both" / "cats", name="cats")
    with torch.no_grad():
        set_adapter(again, "cats")
        assert (again(x) - merged_b(x)).abs().max() <= 1e-5 * merged_b(x).abs().max()


def test_named_adapter_refusals(tmp_path):
    dir_a, _ = trained_adapter(VIT, tmp_path, "a", 1)
    pissa, _ = trained_adapter(VIT, tmp_path, "p", 1, init="pissa")
    model = load_adapter(base(VIT), dir_a)
    with pytest.raises(ValueError, match="already carries an adapter named 'default'"):
        add_adapter(model, LoraConfig(r=2, targets="vit"), "default")
    with pytest.raises(ValueError, match="same modules"):
        add_adapter(model, LoraConfig(r=2, targets="vit", train=[]), "headless")
    with pytest.raises(ValueError, match="single parameters"):
        add_adapter(model, LoraConfig(r=2, targets="vit", train=["head", "*.bias"]), "biases")
    with pytest.raises(ValueError, match="PiSSA"):
        add_adapter(model, LoraConfig(r=2, targets="vit", init="pissa"), "p")
    other_arch = trained_adapter(CNN, tmp_path, "cnn", 3)[0]
    with pytest.raises(ValueError):
        load_adapter(model, other_arch, name="cnn")
    with pytest.raises(ValueError, match="no adapter named"):
        set_adapter(model, "dogs")
    with pytest.raises(ValueError, match="is active"):
        delete_adapter(model, "default")
    with pytest.raises(ValueError, match="2 adapter names for a batch of 3"):
        mixed_forward(model, torch.randn(3, 3, 32, 32), ["default", "default"])
    assert adapter_names(model) == ["default"] and pissa.is_dir()  # every refusal left the model as it was


def test_a_single_adapter_keeps_todays_keys(tmp_path):
    dir_a, _ = trained_adapter(VIT, tmp_path, "a", 1)
    model = load_adapter(base(VIT), dir_a)
    keys = set(model.state_dict())
    assert "head.weight" in keys and not any(k.startswith("vislora_modules") for k in keys)
    assert "blocks.0.attn.qkv.updates.default.lora_A" in keys


# ---- the CLI: several runs of one base, one base in memory ---------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three tiny runs of test_efficientnet (random init): a and b (DoRA, r=2) share their base (same seed,
    and a random base also depends on the class count: timm draws the head before it initialises the body), c was
    built with another seed. Heads of other widths on one base: the API tests above."""
    tmp = tmp_path_factory.mktemp("named_cli")
    for name, classes, seed, adapter in [("a", 3, 0, {}), ("b", 3, 0, {"use_dora": True, "r": 2}), ("c", 3, 1, {})]:
        folder = make_synthetic_folder(tmp / f"images_{name}", classes=classes, per_class=6, size=32, split=True)
        recipe = {"model": {"name": "test_efficientnet", "pretrained": False},
                  "adapter": {"r": 4, "targets": "conv", **adapter},
                  "data": {"path": str(folder), "img_size": 32, "workers": 0},
                  "train": {"epochs": 1, "batch_size": 8, "warmup_epochs": 0, "seed": seed}}
        (tmp / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
        assert main(["train", str(tmp / f"{name}.yaml"), "--out", str(tmp / name)]) == 0
    return tmp


def test_cli_predicts_and_evaluates_several_runs_on_one_base(runs, capsys):
    """predict / eval --adapter RUN1 --adapter RUN2 give each run's own answer (its head, its classes)."""
    images = [str(next((runs / f"images_{n}/val/class_0").iterdir())) for n in "ab"]
    alone = {}
    for name in "ab":
        assert main(["predict", str(runs / name), *images, "--json"]) == 0
        alone[str(runs / name)] = json.loads(capsys.readouterr().out)
    assert main(["predict", "--adapter", str(runs / "a"), "--adapter", str(runs / "b"), *images, "--json"]) == 0
    together = json.loads(capsys.readouterr().out)
    assert list(together) == list(alone)
    for run, results in alone.items():
        for mine, theirs in zip(together[run], results, strict=True):
            assert [c for c, _ in mine["top"]] == [c for c, _ in theirs["top"]]
            assert all(abs(p - q) < 1e-5 for (_, p), (_, q) in zip(mine["top"], theirs["top"], strict=True))
    scores = {}
    for name in "ab":
        assert main(["eval", str(runs / name)]) == 0
        scores[name] = json.loads((runs / name / "eval/report.json").read_text())["top1"]
        (runs / name / "eval/report.json").unlink()
    assert main(["eval", "--adapter", str(runs / "a"), "--adapter", str(runs / "b")]) == 0
    for name in "ab":
        assert json.loads((runs / name / "eval/report.json").read_text())["top1"] == scores[name]


@pytest.mark.parametrize("argv, message", [
    (["predict", "--adapter", "{a}", "--adapter", "{c}", "{img}"], "was trained on another base than"),
    (["predict", "--adapter", "{a}", "--adapter", "{a}/adapter", "{img}"], "is not a run directory"),
    (["predict", "--adapter", "{a}", "--adapter", "{runs}/missing", "{img}"], "does not exist"),
    (["predict", "{a}"], "predict needs a MODEL"),
    (["eval", "--adapter", "{a}", "--out", "{runs}/r.json"], "no TARGET and no --out"),
    (["eval"], "eval needs a TARGET"),
])
def test_cli_several_runs_refusals(runs, argv, message, capsys):
    image = str(next((runs / "images_a/val/class_0").iterdir()))
    args = [a.format(a=runs / "a", c=runs / "c", runs=runs, img=image) for a in argv]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
