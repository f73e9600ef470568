"""Trust, second round (issue 18): detection, SVD, footprint and adapter files report what they claim."""

import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from PIL import Image
from safetensors.torch import save_file

from vislora import LoraConfig, inject, load_adapter, lora_layers, save_adapter
from vislora.cli import main
from vislora.data import make_synthetic_folder
from vislora.footprint import resolve_target
from vislora.inject import trainable_summary
from vislora.recipe import resolve
from vislora.svd import factor_l2, frobenius_penalty
from vislora.tasks import detection, detection_data, detection_model
from vislora.train import train

_spec = importlib.util.spec_from_file_location(
    "make_detection_data", Path(__file__).resolve().parents[1] / "tools" / "make_detection_data.py")
scenes_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scenes_tool)
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::UserWarning")]

VIT = dict(img_size=32, patch_size=4, depth=2)


def vit(seed=0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, **{**VIT, **kwargs}).eval()


# ---- adapter files --------------------------------------------------------------------------------
def test_peft_pissa_files_load_as_peft_loads_them_and_olora_is_refused(tmp_path):
    x = torch.randn(2, 3, 32, 32)
    for init in ("pissa", "olora"):
        peft_model = get_peft_model(vit(), PeftLoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "fc1"],
                                                          init_lora_weights=init)).eval()
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.add_(0.05 * torch.randn_like(p))
        peft_model.save_pretrained(tmp_path / init)
        with torch.no_grad():
            reference = PeftModel.from_pretrained(vit(), tmp_path / init).eval()(x)
        if init == "olora":
            with pytest.raises(ValueError, match="init_lora_weights='olora'"):
                load_adapter(vit(), tmp_path / init)
            continue
        with torch.no_grad():
            assert (load_adapter(vit(), tmp_path / init)(x) - reference).abs().max().item() <= 1e-5


def test_penalties_of_a_pissa_adapter_measure_its_change():
    model = inject(vit(), LoraConfig(r=4, targets="vit", init="pissa"))
    assert frobenius_penalty(model).item() == 0.0 and factor_l2(model).item() == 0.0
    with torch.no_grad():
        next(layer for _, layer in lora_layers(model)).lora_B.add_(0.01)
    assert frobenius_penalty(model).item() > 0 and factor_l2(model).item() > 0


def test_adapter_of_another_architecture_is_refused(tmp_path, caplog):
    small = inject(timm.create_model("resnet18", pretrained=False, num_classes=3), LoraConfig(targets="all", r=2))
    save_adapter(small, tmp_path / "r18")
    with pytest.raises(ValueError, match="resnet18"), caplog.at_level(logging.WARNING, "vislora.adapters"):
        load_adapter(timm.create_model("resnet34", pretrained=False, num_classes=3), tmp_path / "r18")
    assert "resnet34" in caplog.text
    save_adapter(inject(vit(), LoraConfig(targets="vit", r=2)), tmp_path / "d2")
    with pytest.raises(ValueError, match="not in the file"):
        load_adapter(vit(depth=4), tmp_path / "d2")
    load_adapter(vit(), tmp_path / "d2")  # the same architecture loads


# ---- footprint of a run -------------------------------------------------------------------------
@pytest.mark.parametrize("adapter", [{"r": 4, "targets": "vit"}, {"r": 4, "targets": "vit", "init": "pissa"},
                                     "linear_probe", None], ids=["lora", "pissa", "probe", "full"])
def test_footprint_rebuilds_the_run_as_trained(tmp_path, adapter):
    folder = make_synthetic_folder(tmp_path / "images", classes=3, per_class=4, size=32)
    recipe = resolve({"model": {"name": "vit_tiny_patch16_224", "kwargs": VIT}, "adapter": adapter,
                      "data": {"path": str(folder), "img_size": 32, "workers": 0},
                      "train": {"epochs": 1, "batch_size": 8, "max_steps": 1}})
    run = train(recipe, tmp_path / "run")
    trained = json.loads((run / "train_summary.json").read_text())["summary"]
    measured = trainable_summary(resolve_target(run).build_adapted())
    assert (measured["trainable"], measured["adapter"]) == (trained["trainable"], trained["adapter"])


# ---- extract --------------------------------------------------------------------------------------
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


# ---- detection ------------------------------------------------------------------------------------
def test_detection_recipes_get_detection_defaults():
    recipe = resolve({"task": "detection"})
    assert recipe["data"]["augment"] == {"scale": [0.5, 1.0], "hflip": 0.5, "color_jitter": 0.2,
                                         "mixup": 0.0, "cutmix": 0.0, "rand": None, "erase": 0.0}  # #27: off
    assert resolve({"task": "classification"})["data"]["augment"]["scale"] == [0.7, 1.0]
    fcos = detection.build_model(resolve({"task": "detection", "model": {"name": "test_resnet"},
                                          "detector": {"anchor_sizes": [8, 16, 32, 64, 128],
                                                       "representation_size": 32}}), ["a", "b"])
    assert fcos.nms_thresh == 0.6  # FCOS's own default, not 0.5


def test_yolo_reads_exif_upright_and_refuses_bad_class_fields(tmp_path):
    root = tmp_path / "yolo"
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
    (root / "data.yaml").write_text(yaml.safe_dump({"names": ["a", "b"]}))
    upright = np.zeros((40, 80, 3), np.uint8)  # displayed 80 wide, 40 high: the box is on the left half
    upright[5:35, 5:35] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.rot90(upright, 1).copy()).save(root / "images/train/x.jpg", exif=exif, quality=95)
    (root / "labels/train/x.txt").write_text("0 0.25 0.5 0.375 0.75\n")
    names, meta = detection_data.yolo_names(root)
    records = detection_data.yolo_records(root, "train", names, meta)
    item, target = detection_data.DetectionDataset(records, names)[0]
    assert tuple(item.shape) == (3, 40, 80)
    torch.testing.assert_close(target["boxes"], torch.tensor([[5.0, 5.0, 35.0, 35.0]]))
    for bad in ("inf", "1.7"):
        (root / "labels/train/x.txt").write_text(f"{bad} 0.5 0.5 0.2 0.2\n")
        with pytest.raises(ValueError, match=r"x\.txt:1: class"):
            detection_data.yolo_records(root, "train", names, meta)


@pytest.fixture(scope="module")
def det_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("det")
    scenes_tool.make_scenes(tmp / "scenes", 8, 4, 64, seed=0)
    for label in (tmp / "scenes" / "labels" / "val").glob("*.txt"):
        label.write_text("")  # a val split without boxes: mAP is not a number
    recipe = resolve({"task": "detection", "model": {"name": "test_resnet"}, "adapter": {"r": 2, "targets": "conv"},
                      "detector": {"head": "fcos", "min_size": 64, "max_size": 64, "fpn_channels": 64},
                      "data": {"format": "yolo", "path": str(tmp / "scenes"), "workers": 0},
                      "train": {"epochs": 2, "batch_size": 4}})
    torch.set_num_threads(1)
    return train(recipe, tmp / "run"), tmp


def test_detection_val_without_boxes_still_saves_and_evaluates(det_run, capsys):
    run, tmp = det_run
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert main(["eval", str(run)]) == 0
    assert main(["eval", str(run), "--data", str(tmp / "nonexistent")]) == 2
    assert "nonexistent" in capsys.readouterr().err


def test_detection_predict_export_and_what_is_not_supported(det_run, capsys):
    run, tmp = det_run
    image = next((tmp / "scenes" / "images" / "val").iterdir())
    assert main(["predict", str(run), str(image), "--json"]) == 0
    assert "boxes" in json.loads(capsys.readouterr().out)[0]
    assert main(["export", str(run), "--format", "onnx"]) == 2
    assert "ONNX export of torchvision detectors is not supported" in capsys.readouterr().err
    assert main(["export", str(run), "--format", "torchscript"]) == 0
    assert main(["export", str(run)]) == 0  # the recipe's default formats: what a detector can export
    report = json.loads((run / "export" / "export.json").read_text())
    assert "onnx" in report["not_exported"] and not (run / "export" / "model.onnx").exists()
    capsys.readouterr()
    assert main(["eval", str(run / "export" / "model.pt"), "--data", str(tmp / "scenes")]) == 2
    assert "use the run directory" in capsys.readouterr().err


@pytest.mark.parametrize("name,kwargs", [
    ("swin_tiny_patch4_window7_224", {"img_size": 128, "window_size": 4, "embed_dim": 24, "depths": (1, 1, 1, 1),
                                      "num_heads": (1, 1, 1, 1)}),
    ("eva02_tiny_patch14_224", {"img_size": 112, "depth": 1}),
], ids=["swin-channels-last", "eva"])
def test_detection_on_other_vit_families(name, kwargs):
    det = detection_model.build_detector({"name": name, "kwargs": kwargs},
                                   {"head": "fcos", "min_size": 128, "max_size": 128, "fpn_channels": 64}, 2)
    detection.adapt_detector(det, LoraConfig(targets="vit", r=2))
    det.train()
    losses = det([torch.rand(3, 128, 128)], [{"boxes": torch.tensor([[10.0, 10, 60, 70]]),
                                              "labels": torch.tensor([1])}])
    sum(losses.values()).backward()
    assert any(layer.lora_A.grad is not None for _, layer in lora_layers(det))
