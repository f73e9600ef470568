"""Detection: scene generator, COCO/YOLO data, FCOS/RetinaNet/Faster R-CNN with LoRA in the timm body."""

import importlib.util
import json
import logging
import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from vislora import LoraConfig, load_adapter, lora_layers, save_adapter, unload
from vislora.cli import main
from vislora.recipe import resolve
from vislora.tasks.detection import adapt_detector, build_model
from vislora.tasks.detection_data import (
    DetectionDataset,
    build_detection_datasets,
    coco_records,
    detection_collate,
    yolo_names,
    yolo_records,
)
from vislora.tasks.detection_metrics import detection_loss, evaluate_detection, plot_detections, predict_detections
from vislora.tasks.detection_model import build_detector, detection_train_modules
from vislora.train import train

_spec = importlib.util.spec_from_file_location(
    "make_detection_data", Path(__file__).resolve().parents[1] / "tools" / "make_detection_data.py")
scenes_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scenes_tool)

pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning"),
              pytest.mark.filterwarnings("ignore:.*always returns a \\(Losses, Detections\\) tuple:UserWarning")]

CNN = {"name": "test_resnet"}
VIT = {"name": "vit_tiny_patch16_224", "kwargs": {"img_size": 64, "patch_size": 8, "depth": 2}}
NO_AUGMENT = {"hflip": 0, "scale": [1.0, 1.0], "color_jitter": 0}  # data.augment keys, as every task's


def det_cfg(head: str, **extra) -> dict:
    return {"head": head, "min_size": 64, "max_size": 64, "fpn_channels": 32, "representation_size": 64,
            "score_thresh": 0.01, **extra}


def coco_cfg(root: Path) -> dict:
    return {"format": "coco", "images": str(root / "images"), "train_ann": str(root / "train.json"),
            "val_ann": str(root / "val.json")}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Small models on a shared 2-core machine: one thread (conftest.one_thread)."""


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scenes")
    scenes_tool.make_scenes(root, 16, 8, 64, seed=0, empty_fraction=0.2)
    return root


@pytest.fixture(scope="module")
def data(scenes):
    return build_detection_datasets(coco_cfg(scenes), 64)


def fixed_batch(dataset, size: int = 4):
    """The first empty image and the first non-empty ones: one fixed (augmented once) batch."""
    empty = [i for i, r in enumerate(dataset.records) if len(r["boxes"]) == 0][:1]
    full = [i for i, r in enumerate(dataset.records) if len(r["boxes"])][:size - len(empty)]
    dataset.transform.set_random_seed(0)
    return detection_collate([dataset[i] for i in empty + full])


def assert_same_detections(a: list[dict], b: list[dict]) -> None:
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["labels"], y["labels"])
        torch.testing.assert_close(x["boxes"], y["boxes"], atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(x["scores"], y["scores"], atol=1e-4, rtol=1e-4)


def bn_stats(detector) -> dict:
    return {n: b.clone() for n, b in detector.backbone.body.named_buffers() if "running" in n}


def train_steps(detector, images, targets, steps: int) -> tuple[float, float]:
    """Loss on the batch before and after `steps` AdamW steps (same seed for both measurements)."""
    opt = torch.optim.AdamW([p for p in detector.parameters() if p.requires_grad], lr=1e-3)
    detector.train()
    torch.manual_seed(1)
    with torch.no_grad():
        before = detection_loss(detector, images, targets)[0].item()
    for _ in range(steps):
        loss, parts = detection_loss(detector, images, targets)
        assert all(math.isfinite(v) for v in parts.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.manual_seed(1)
    with torch.no_grad():
        after = detection_loss(detector, images, targets)[0].item()
    return before, after


# ---- scenes and data ------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["coco", "yolo"])
def test_an_unreadable_image_is_skipped_and_reported(scenes, tmp_path, fmt, caplog):
    shutil.copytree(scenes, tmp_path / "s")
    broken = sorted((tmp_path / "s" / "images" / "train").iterdir())[0]
    broken.write_bytes(b"not an image")
    cfg = coco_cfg(tmp_path / "s") if fmt == "coco" else {"format": "yolo", "path": str(tmp_path / "s")}
    with caplog.at_level(logging.WARNING, logger="vislora.tasks.detection"):
        train_set, _, _ = build_detection_datasets(cfg, 64)
    assert train_set.skipped == [str(broken)] and str(broken) in caplog.text
    assert len(train_set) == 15 and all(r["path"] != broken for r in train_set.records)
    assert detection_collate([train_set[0], None])[0][0].shape[0] == 3  # a file broken later: dropped


def test_scenes_deterministic_and_formats_agree(scenes, data, tmp_path):
    summary = scenes_tool.make_scenes(tmp_path, 16, 8, 64, seed=0, empty_fraction=0.2)
    assert summary["classes"] == list(scenes_tool.SHAPES)
    assert (tmp_path / "train.json").read_text() == (scenes / "train.json").read_text()
    assert (tmp_path / "labels/val/000003.txt").read_text() == (scenes / "labels/val/000003.txt").read_text()
    train, val, names = data
    assert names == list(scenes_tool.SHAPES) and (len(train), len(val)) == (16, 8)
    names_yolo, meta = yolo_names(scenes)
    assert names_yolo == names
    for split, coco in (("train", train.records), ("val", val.records)):
        yolo = yolo_records(scenes, split, names, meta)
        assert len(yolo) == len(coco)
        for a, b in zip(coco, yolo, strict=True):
            assert a["path"] == b["path"] and a["labels"].tolist() == b["labels"].tolist()
            assert abs(a["boxes"] - b["boxes"]).max(initial=0) < 1e-3
    empty = next(i for i, r in enumerate(train.records) if len(r["boxes"]) == 0)
    image, target = train[empty]
    assert image.shape == (3, 64, 64) and 0 <= image.min() and image.max() <= 1
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,) and target["labels"].dtype == torch.int64
    image, target = val[next(i for i, r in enumerate(val.records) if len(r["boxes"]))]
    assert target["labels"].min() >= 1 and (target["boxes"][:, 2:] > target["boxes"][:, :2]).all()


def test_train_crop_honours_the_interpolation_and_moves_the_boxes(scenes):
    """data.augment / data.interpolation reach vislora.augment's pipeline (target bboxes): hflip 1 with the whole
    image mirrors every box; the val set stays untransformed (the detector resizes)."""
    train, val, _ = build_detection_datasets(coco_cfg(scenes), 64, {**NO_AUGMENT, "hflip": 1.0}, "nearest")
    assert train.transform.transforms[0].interpolation == cv2.INTER_NEAREST and val.transform is None
    i = next(i for i, r in enumerate(train.records) if len(r["boxes"]))
    image, target = train[i]
    boxes = torch.from_numpy(train.records[i]["boxes"]).float()
    mirrored = torch.stack([64 - boxes[:, 2], boxes[:, 1], 64 - boxes[:, 0], boxes[:, 3]], dim=1)
    assert image.shape == (3, 64, 64) and torch.allclose(target["boxes"], mirrored, atol=1e-3)
    with pytest.raises(ValueError, match="rand"):
        build_detection_datasets(coco_cfg(scenes), 64, {"rand": "rand-m9"})


def test_degenerate_boxes_are_clipped_or_dropped(scenes, tmp_path, caplog):
    ann = json.loads((scenes / "train.json").read_text())
    bad = [[10, 10, -5, 5], [float("nan"), 1, 5, 5], [None, 1, 5, 5], [100, 100, 10, 10], [5, 5, 0, 3],
           [-5, -5, 20, 20], [50, 50, 30, 30]]
    for k, bbox in enumerate(bad):
        ann["annotations"].append({"id": 1000 + k, "image_id": 1, "category_id": 1, "bbox": bbox, "iscrowd": 0})
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(ann))
    with caplog.at_level(logging.WARNING, logger="vislora.tasks.detection"):
        records, _, _ = coco_records(path, scenes / "images")
    assert "bad.json" in caplog.text and "dropped 5" in caplog.text and "clipped 2" in caplog.text
    boxes = records[0]["boxes"]
    assert (boxes >= 0).all() and (boxes <= 64).all() and (boxes[:, 2:] > boxes[:, :2]).all()
    # YOLO: a box outside the image and a NaN size are dropped, an overhanging one is clipped
    (scenes_yolo := tmp_path / "yolo").mkdir()
    for sub in ("images/train", "labels/train"):
        (scenes_yolo / sub).mkdir(parents=True)
    (scenes_yolo / "images/train/a.jpg").write_bytes((scenes / "images/train/000000.jpg").read_bytes())
    (scenes_yolo / "labels/train/a.txt").write_text("0 1.3 0.5 0.1 0.1\n1 0.5 0.5 nan 0.2\n2 0.95 0.5 0.2 0.2\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vislora.tasks.detection"):
        (rec,) = yolo_records(scenes_yolo, "train", ["a", "b", "c"], {})
    assert "a.txt" in caplog.text and "dropped 2" in caplog.text and "clipped 1" in caplog.text
    assert rec["labels"].tolist() == [3] and rec["boxes"][0, 2] == 64


def test_bad_inputs_name_the_culprit(scenes, tmp_path):
    ann = json.loads((scenes / "val.json").read_text())
    ann["images"][2]["file_name"] = "val/nowhere.jpg"
    (tmp_path / "val.json").write_text(json.dumps(ann))
    with pytest.raises(FileNotFoundError, match="nowhere.jpg"):
        build_detection_datasets({**coco_cfg(scenes), "val_ann": str(tmp_path / "val.json")}, 64)
    with pytest.raises(ValueError, match="format"):
        build_detection_datasets({"format": "voc"}, 64)
    (tmp_path / "labels/train").mkdir(parents=True)
    (tmp_path / "images/train").mkdir(parents=True)
    (tmp_path / "images/train/a.jpg").write_bytes((scenes / "images/train/000000.jpg").read_bytes())
    (tmp_path / "labels/train/a.txt").write_text("7 0.5 0.5 0.1 0.1\n")
    with pytest.raises(ValueError, match=r"a.txt:1: class 7"):
        yolo_records(tmp_path, "train", ["x"], {})
    with pytest.raises(ValueError, match="unknown detector key"):
        build_detector(CNN, {"head": "fcos", "anchors": 3}, 2)
    with pytest.raises(ValueError, match="head 'yolo'"):
        build_detector(CNN, {"head": "yolo"}, 2)


# ---- models ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("head", ["fcos", "retinanet", "fasterrcnn"])
def test_lora_detector_trains_evaluates_and_unloads(head, data, tmp_path):
    train, val, names = data
    torch.manual_seed(0)
    detector = adapt_detector(build_detector(CNN, det_cfg(head), len(names)), LoraConfig(r=4, targets="all"))
    trained = tuple(detection_train_modules(detector))
    assert trained == (("backbone.fpn", "rpn", "roi_heads") if head == "fasterrcnn" else ("backbone.fpn", "head"))
    assert any(True for _ in lora_layers(detector.backbone.body))
    for name, p in detector.named_parameters():
        assert p.requires_grad == (".lora_" in name or name.startswith(trained)), name
    stem = detector.backbone.body.pretrained_cfg["first_conv"]
    assert type(detector.backbone.body.get_submodule(stem)) is torch.nn.Conv2d  # the stem is never adapted
    stats = bn_stats(detector)
    images, targets = fixed_batch(train)
    before, after = train_steps(detector, images, targets, steps=6)
    assert after < before, (before, after)
    for name, value in bn_stats(detector).items():
        assert torch.equal(value, stats[name]), f"BatchNorm statistics {name} changed in training"
    assert any(layer.lora_B.abs().sum() > 0 for _, layer in lora_layers(detector))

    loader = DataLoader(val, batch_size=4, collate_fn=detection_collate)
    metrics = evaluate_detection(detector, loader, names, max_images=6)
    assert metrics["num_images"] == 6 and set(metrics["per_class"]) == set(names)
    for key in ("map", "map50", "map75"):
        assert 0.0 <= metrics[key] <= 1.0
    assert all(math.isnan(v) or 0 <= v <= 1 for v in metrics["per_class"].values())
    val_images = [val[i][0] for i in range(3)]
    expected = predict_detections(detector, val_images)
    assert sum(len(d["boxes"]) for d in expected) > 0
    if head == "fcos":
        png = plot_detections(detector, val, names, tmp_path / "dets.png", n=4)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        save_adapter(detector, tmp_path / "adapter")  # a fresh detector with the same base weights gets it back
        torch.manual_seed(0)
        fresh = load_adapter(build_detector(CNN, det_cfg(head), len(names)), tmp_path / "adapter")
        assert_same_detections(expected, predict_detections(fresh, val_images))
    unload(detector)
    assert not any(True for _ in lora_layers(detector))
    detector.eval()
    assert_same_detections(expected, predict_detections(detector, val_images))
    with torch.no_grad():  # torchvision detectors and timm features_only CNNs are scriptable once merged
        _, scripted_out = torch.jit.script(detector)(val_images)
    assert_same_detections(expected, scripted_out)


def test_vit_simple_pyramid_lora_unload_script(data):
    train, val, names = data
    torch.manual_seed(0)
    detector = build_detector(VIT, det_cfg("fcos"), len(names))
    adapt_detector(detector, LoraConfig(r=4, targets="vit"))
    trained = tuple(detection_train_modules(detector))
    assert "backbone.pyramid" in trained
    for name, p in detector.named_parameters():
        assert p.requires_grad == (".lora_" in name or name.startswith(trained)), name
    images, targets = fixed_batch(train)
    before, after = train_steps(detector, images, targets, steps=5)
    assert after < before, (before, after)
    val_images = [val[i][0] for i in range(2)]
    expected = predict_detections(detector, val_images)
    assert sum(len(d["boxes"]) for d in expected) > 0
    unload(detector).eval()
    assert_same_detections(expected, predict_detections(detector, val_images))
    with torch.no_grad():
        _, scripted_out = torch.jit.script(detector)(val_images)
    assert_same_detections(expected, scripted_out)


def test_full_finetuning_keeps_backbone_bn_frozen(data):
    train, _, names = data
    torch.manual_seed(0)
    detector = adapt_detector(build_detector(CNN, det_cfg("fcos"), len(names)), None)
    assert all(p.requires_grad for p in detector.parameters())
    stats, stem = bn_stats(detector), detector.backbone.body.conv1[0].weight.detach().clone()
    images, targets = fixed_batch(train, size=2)
    train_steps(detector, images, targets, steps=1)
    assert all(torch.equal(v, stats[k]) for k, v in bn_stats(detector).items())
    assert not torch.equal(stem, detector.backbone.body.conv1[0].weight)


def test_checkpoint_is_loaded_and_checked(tmp_path, caplog):
    torch.manual_seed(3)
    source = timm.create_model("test_resnet", pretrained=False, num_classes=7)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(tmp_path / "ok.safetensors"))
    detector = build_detector({**CNN, "checkpoint": str(tmp_path / "ok.safetensors")}, det_cfg("fcos"), 2)
    body = detector.backbone.body.state_dict()
    assert body and all(torch.equal(v, state[k]) for k, v in body.items())
    save_file({k: v for k, v in state.items() if k != "layer2.0.conv1.weight"}, str(tmp_path / "cut.safetensors"))
    with pytest.raises(ValueError, match=r"cut.safetensors.*1 backbone key.*layer2.0.conv1.weight"):
        build_detector({**CNN, "checkpoint": str(tmp_path / "cut.safetensors")}, det_cfg("fcos"), 2)
    save_file({**state, "extra.weight": torch.zeros(1)}, str(tmp_path / "extra.safetensors"))
    with caplog.at_level(logging.WARNING, logger="vislora.tasks.detection"):
        build_detector({**CNN, "checkpoint": str(tmp_path / "extra.safetensors")}, det_cfg("fcos"), 2)
    assert "extra.weight" in caplog.text
    with pytest.raises(ValueError, match="safetensors"):
        (tmp_path / "w.pt").write_bytes(b"x")
        build_detector({**CNN, "checkpoint": str(tmp_path / "w.pt")}, det_cfg("fcos"), 2)


# ---- what a detection run reports (issue 18) --------------------------------------------------------
def test_detection_recipes_get_detection_defaults():
    recipe = resolve({"task": "detection"})
    assert recipe["data"]["augment"] == {"scale": [0.5, 1.0], "hflip": 0.5, "color_jitter": 0.2,
                                         "mixup": 0.0, "cutmix": 0.0, "rand": None, "erase": 0.0}  # #27: off
    assert resolve({"task": "classification"})["data"]["augment"]["scale"] == [0.7, 1.0]
    fcos = build_model(resolve({"task": "detection", "model": {"name": "test_resnet"},
                                "detector": {"anchor_sizes": [8, 16, 32, 64, 128], "representation_size": 32}}),
                       ["a", "b"])
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
    names, meta = yolo_names(root)
    records = yolo_records(root, "train", names, meta)
    item, target = DetectionDataset(records, names)[0]
    assert tuple(item.shape) == (3, 40, 80)
    torch.testing.assert_close(target["boxes"], torch.tensor([[5.0, 5.0, 35.0, 35.0]]))
    for bad in ("inf", "1.7"):
        (root / "labels/train/x.txt").write_text(f"{bad} 0.5 0.5 0.2 0.2\n")
        with pytest.raises(ValueError, match=r"x\.txt:1: class"):
            yolo_records(root, "train", names, meta)


@pytest.fixture(scope="module")
def det_run(tmp_path_factory):
    """A two-epoch FCOS run on YOLO scenes whose val split has no boxes (mAP is not a number)."""
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
    det = build_detector({"name": name, "kwargs": kwargs},
                         {"head": "fcos", "min_size": 128, "max_size": 128, "fpn_channels": 64}, 2)
    adapt_detector(det, LoraConfig(targets="vit", r=2))
    det.train()
    losses = det([torch.rand(3, 128, 128)], [{"boxes": torch.tensor([[10.0, 10, 60, 70]]),
                                              "labels": torch.tensor([1])}])
    sum(losses.values()).backward()
    assert any(layer.lora_A.grad is not None for _, layer in lora_layers(det))
