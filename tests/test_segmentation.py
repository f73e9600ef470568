"""Segmentation: scenes with exact masks, aligned augmentation, training, mIoU, export, eval and predict."""

import importlib.util
import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import vislora
from vislora.augment import EvalTransform, train_pipeline
from vislora.cli import main
from vislora.config import LoraConfig
from vislora.evaluate import evaluate, predict
from vislora.export import export_model, export_run
from vislora.image import read_mask, write_mask
from vislora.inject import FROZEN_BN, unload
from vislora.recipe import load_recipe, resolve
from vislora.tasks import segmentation as seg
from vislora.tasks import segmentation_data, segmentation_model
from vislora.train import train

TOOLS = Path(__file__).resolve().parents[1] / "tools"
_spec = importlib.util.spec_from_file_location("make_segmentation_data", TOOLS / "make_segmentation_data.py")
seg_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(seg_tool)

# timm's shape asserts warn when traced; export_model re-checks every file at a second batch size instead
pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")

SIZE = 64
CLASSES = ["background", *seg_tool.scenes.SHAPES]
PRE = {"input_size": [3, 32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear",
       "crop_pct": 1.0}
VIT = {"name": "vit_tiny_patch16_224", "kwargs": {"img_size": 32, "patch_size": 8, "depth": 1}}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Small models on a shared 2-core machine: one thread (conftest.one_thread)."""


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("seg_scenes")
    seg_tool.make_segmentation_scenes(root, 16, 8, SIZE, seed=0, empty_fraction=0.1)
    return root


@pytest.fixture(scope="module")
def run(scenes, tmp_path_factory) -> Path:
    """A LoRA (conv preset) FPN segmenter on test_resnet, trained for 4 epochs through vislora.train."""
    recipe = resolve({
        "task": "segmentation", "model": {"name": "test_resnet"}, "adapter": {"r": 4, "targets": "conv", "train": []},
        "segmenter": {"head": "fpn", "img_size": SIZE}, "data": {"path": str(scenes), "workers": 0},
        "train": {"epochs": 4, "batch_size": 4, "lr": 3e-3, "warmup_epochs": 0, "weight_decay": 0.0}})
    return train(recipe, tmp_path_factory.mktemp("seg_run") / "run")


def _colour_scene(height: int, width: int, block: int, colours: np.ndarray, seed: int):
    """Blocks of one class each; a pixel's colour says its class."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, len(colours), (height // block + 1, width // block + 1))
    mask = np.kron(cells, np.ones((block, block), dtype=np.int64))[:height, :width].astype(np.uint8)
    return colours[mask], mask


# ---- scenes and data ------------------------------------------------------------------------------
def test_scenes_are_deterministic_with_exact_masks(scenes, tmp_path):
    seg_tool.make_segmentation_scenes(tmp_path, 2, 1, SIZE, seed=0, empty_fraction=0.1)
    assert (tmp_path / "classes.txt").read_text().split() == CLASSES == seg.read_classes(scenes)
    for part in ("train/masks/000001.png", "train/images/000001.jpg", "val/masks/000000.png"):
        assert (tmp_path / part).read_bytes() == (scenes / part).read_bytes()
    # the masks are the detection tool's scenes: every object pixel lies in its own box, every box holds its class
    rng = np.random.default_rng([0, 0, 1])
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    pools = seg_tool.scenes._split_sprites(seg_tool.scenes.shape_sprites(seed=0))[0]
    _, objects = seg_tool.scenes.compose(SIZE, pools, rng, 4, 0.1, mask=mask)
    assert np.array_equal(mask, read_mask(scenes / "train/masks/000001.png")) and objects
    inside = np.zeros_like(mask, dtype=bool)
    for (x0, y0, x1, y1), cls in objects:
        assert (mask[y0:y1, x0:x1] == cls + 1).any()
        inside[y0:y1, x0:x1] = True
    assert not mask[~inside].any()


@pytest.mark.parametrize("seed", range(4))
def test_mask_and_image_stay_aligned_under_augmentation(seed):
    """Each block's colour names its class: after the train transform (crop, resize, flip) every pixel away from a
    block edge still has its class's colour, and the eval transform keeps them aligned too."""
    colours = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], dtype=np.uint8)
    rgb, mask = _colour_scene(48, 40, 6, colours, seed)
    augment = {"scale": [0.2, 1.0], "hflip": 1.0, "color_jitter": 0.0}
    train = train_pipeline(PRE, augment, "mask")
    train.set_random_seed(seed)
    for transform in (train, EvalTransform(PRE, whole=True)):
        out = transform(image=rgb, mask=mask)
        pixels = seg.denormalize(out["image"].numpy(), PRE).astype(np.int64)
        labels = out["mask"].numpy()
        assert out["mask"].shape == (32, 32) and len(np.unique(labels)) >= 2
        nearest = np.abs(pixels[:, :, None, :] - colours[None, None].astype(np.int64)).sum(-1).argmin(-1)
        padded = np.pad(labels, 1, mode="edge")
        windows = np.stack([padded[dy:dy + 32, dx:dx + 32] for dy in range(3) for dx in range(3)])
        interior = (windows == labels).all(0)
        assert interior.mean() > 0.4
        assert (nearest[interior] == labels[interior]).mean() == 1.0
    flipped = train_pipeline(PRE, {"scale": [1.0, 1.0], "hflip": 1.0, "color_jitter": 0.0}, "mask")
    out = flipped(image=rgb[:32, :32], mask=mask[:32, :32])
    assert np.array_equal(out["mask"].numpy(), mask[:32, :32][:, ::-1])


def _bad_copy(scenes: Path, root: Path) -> dict[str, Path]:
    """A copy of the scenes' val split with four kinds of bad input, each under its own name."""
    shutil.copytree(scenes / "val", root / "val")
    shutil.copy(scenes / "classes.txt", root / "classes.txt")
    masks = root / "val" / "masks"
    bad = {"no_mask": root / "val/images/000001.jpg", "small": masks / "000002.png",
           "index": masks / "000003.png", "rgb": masks / "000004.png", "orphan": masks / "extra.png",
           "unreadable_image": root / "val/images/000005.jpg"}  # its mask is fine: the image is named
    (masks / "000001.png").unlink()
    write_mask(bad["small"], np.zeros((SIZE, SIZE - 4), dtype=np.uint8))
    wrong = read_mask(bad["index"])
    wrong[0, 0], wrong[1, 1] = 9, 255  # 9 is outside the 5 classes; 255 (ignore) is fine
    write_mask(bad["index"], wrong)
    Image.new("RGB", (SIZE, SIZE)).save(bad["rgb"])
    write_mask(bad["orphan"], np.zeros((SIZE, SIZE), dtype=np.uint8))
    bad["unreadable_image"].write_bytes(b"not a jpeg")
    return bad


def test_bad_input_is_skipped_and_reported_by_path(scenes, tmp_path, caplog):
    bad = _bad_copy(scenes, tmp_path)
    with caplog.at_level(logging.WARNING, logger="vislora.tasks.segmentation"):
        pairs, skipped = segmentation_data.scan_pairs(tmp_path / "val", len(CLASSES))
    assert sorted(p for p, _ in skipped) == sorted(str(p) for p in bad.values())
    assert len(pairs) == 8 - 5
    for kind, path in bad.items():
        assert str(path) in caplog.text, kind
    reasons = dict(skipped)
    assert "has no mask" in reasons[str(bad["no_mask"])] and "60x64" in reasons[str(bad["small"])]
    assert "[9]" in reasons[str(bad["index"])] and "mode RGB" in reasons[str(bad["rgb"])]
    (tmp_path / "classes.txt").write_text("background\n\ncircle\n")
    with pytest.raises(ValueError, match="line 2 is empty"):
        seg.read_classes(tmp_path)


# ---- model ----------------------------------------------------------------------------------------
def test_metrics_come_from_one_accumulated_confusion_matrix():
    """Image 1: class 1 everywhere, predicted right; image 2: a few class-2 pixels, all wrong. Averaging per image
    would give (1 + 0.5) / 2; over the whole set class 2 scores 0 and class 1 almost 1."""
    n = 3
    truth = [torch.ones(10, 10, dtype=torch.long), torch.zeros(10, 10, dtype=torch.long)]
    truth[1][0, :2] = 2
    truth[1][9, 9] = seg.IGNORE
    pred = [torch.ones(10, 10, dtype=torch.long), torch.zeros(10, 10, dtype=torch.long)]
    matrix = sum(seg.pixel_confusion(p, t, n) for p, t in zip(pred, truth, strict=True)).numpy()
    assert matrix.sum() == 199 and matrix[2, 0] == 2
    report = seg.segmentation_report(matrix, ["bg", "a", "b"])
    assert report["per_class"]["a"] == {"iou": 1.0, "support": 100}
    assert report["per_class"]["b"] == {"iou": 0.0, "support": 2}
    assert math.isclose(report["miou"], (97 / 99 + 1 + 0) / 3)
    assert math.isclose(report["pixel_acc"], 197 / 199)
    assert seg.segmentation_report(np.diag([5, 0]), ["bg", "a"])["per_class"]["a"]["iou"] is None


def test_heads_adapters_and_frozen_batchnorm():
    """LoRA stays inside the backbone, the decoder trains; full fine-tuning and the probe keep backbone BN stats."""
    torch.manual_seed(0)
    cfg = {"head": "deeplabv3", "atrous_rates": [1, 2, 3]}
    lora = seg.adapt_segmenter(seg.build_segmenter({"name": "test_resnet"}, cfg, 3), LoraConfig(r=2, targets="conv"))
    assert all(name.startswith("body.") for name, _ in vislora.lora_layers(lora))
    for name, p in lora.named_parameters():
        assert p.requires_grad == (".lora_" in name or name.startswith("decoder.")), name
    assert lora(torch.randn(2, 3, 40, 48)).shape == (2, 3, 40, 48)
    full = seg.adapt_segmenter(seg.build_segmenter({"name": "test_resnet"}, cfg, 3), None)
    probe = seg.adapt_segmenter(seg.build_segmenter({"name": "test_resnet"}, cfg, 3), None, probe=True)
    assert all(p.requires_grad for p in full.parameters())
    assert not any(p.requires_grad for p in probe.body.parameters())
    for model in (full, probe):
        frozen = [type(m) in FROZEN_BN.values() for m in model.body.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert frozen and all(frozen)
        assert not any(type(m) in FROZEN_BN.values() for m in model.decoder.modules())  # the head's BN trains
    with pytest.raises(ValueError, match="segmenter.head 'unet'"):
        seg.build_segmenter({"name": "test_resnet"}, {"head": "unet"}, 3)


def test_vit_segmenter_exports_merged(tmp_path):
    """A depth-1 ViT under the simple pyramid and FPN, LoRA with random B, merged: TorchScript and ONNX match."""
    torch.manual_seed(0)
    model = seg.adapt_segmenter(seg.build_segmenter(VIT, {"head": "fpn", "channels": 16}, 3), LoraConfig(r=2))
    assert segmentation_model.segmenter_train_modules(model) == ["decoder", "pyramid"]
    with torch.no_grad():
        for _, layer in vislora.lora_layers(model):
            layer.lora_B.normal_(std=0.05)
    unload(model).eval()
    report = export_model(model, {**PRE, "class_names": ["a", "b", "c"], "task": "segmentation"}, tmp_path,
                          repeats=2, spec=seg.EXPORT)
    assert report["torchscript"]["max_abs_diff"] <= 1e-4 and report["onnx"]["max_abs_diff"] <= 1e-4


# ---- a trained run: loss, eval, export, predict ---------------------------------------------------
def test_loss_falls_and_validation_scores_miou(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train_loss"] < 0.7 * rows[0]["train_loss"], [r["train_loss"] for r in rows]
    assert all(0 <= r["val_miou"] <= 1 and 0 <= r["val_pixel_acc"] <= 1 for r in rows)
    assert json.loads((run / "preprocess.json").read_text())["task"] == "segmentation"


def test_eval_report_and_plots(run, scenes):
    report = evaluate(run, workers=0)
    assert {"miou", "pixel_acc", "per_class", "confusion_matrix", "num_images", "skipped"} <= set(report)
    assert report["num_images"] == 8 and report["skipped"] == []
    assert list(report["per_class"]) == CLASSES
    assert all(set(m) == {"iou", "support"} for m in report["per_class"].values())
    assert np.asarray(report["confusion_matrix"]).sum() == 8 * SIZE * SIZE
    assert json.loads((run / "eval/report.json").read_text())["miou"] == report["miou"]
    for png in ("report_masks.png", "report_confusion.png"):
        assert (run / "eval" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_export_matches_and_exported_files_evaluate_alike(run, scenes, tmp_path):
    report = export_run(run)
    for fmt in ("torchscript", "onnx"):
        assert report[fmt]["max_abs_diff"] <= 1e-4, report[fmt]
    assert report["inputs"]["source"] == "given"  # real val images
    own = evaluate(run, out=tmp_path / "run.json", workers=0)
    reference = np.asarray(own["confusion_matrix"])
    for name in ("model.pt", "model.onnx"):
        exported = evaluate(run / "export" / name, data=scenes, out=tmp_path / f"{name}.json", workers=0)
        assert np.abs(np.asarray(exported["confusion_matrix"]) - reference).sum() <= 0.001 * reference.sum()
        assert abs(exported["miou"] - own["miou"]) < 0.01


def test_bad_masks_in_eval_data_are_reported(run, scenes, tmp_path):
    bad = _bad_copy(scenes, tmp_path / "data")
    report = evaluate(run, data=tmp_path / "data", out=tmp_path / "bad.json", workers=0)
    assert sorted(report["skipped"]) == sorted(str(p) for p in bad.values()) and report["num_images"] == 3


def test_predict_writes_masks_from_a_run_and_an_export(run, scenes, tmp_path, monkeypatch, capsys):
    if not (run / "export/model.pt").is_file():
        export_run(run, formats="torchscript")
    monkeypatch.chdir(tmp_path)
    images = [scenes / "val/images/000000.jpg", scenes / "val/images/000005.jpg"]
    shares = []
    for target, where in ((run, run / "predictions"), (run / "export/model.pt", run / "export/predictions")):
        task, results = predict(target, images + [tmp_path / "missing.jpg"], topk=2)  # default: beside the model
        assert task is seg and "error" in results[-1]
        for r in results[:-1]:
            mask = read_mask(r["mask"])
            assert mask.shape == (SIZE, SIZE) and mask.max() < len(CLASSES)
            assert math.isclose(sum(r["shares"].values()), 1.0) and len(r["top"]) <= 2
        shares.append([r["shares"] for r in results[:-1]])
        assert json.loads((where / "predictions.json").read_text())[0]["mask"] == results[0]["mask"]
    assert shares[0][0].keys() == shares[1][0].keys()
    assert main(["predict", str(run), str(images[0]), "--out", "masks"]) == 0
    assert "-> masks/000000_mask.png" in capsys.readouterr().out


def test_recipe_defaults_and_shipped_recipe():
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes/seg_mobilenetv2_fpn.yaml")
    assert recipe["task"] == "segmentation" and recipe["segmenter"]["head"] == "fpn"
    assert recipe["adapter"]["targets"] == "conv"
    assert recipe["model"]["checkpoint"].endswith(".cache/weights/mobilenetv2_100.safetensors")
    defaults = resolve({"task": "segmentation"})
    assert defaults["data"]["augment"] == {"scale": [0.5, 1.0], "hflip": 0.5, "color_jitter": 0.2,
                                           "mixup": 0.0, "cutmix": 0.0, "rand": None, "erase": 0.0}  # #27: off
    assert yaml.safe_load(yaml.safe_dump(defaults))["segmenter"]["img_size"] == 512


def test_deeplabv3_at_batch_one_is_refused_before_any_work(scenes):
    recipe = resolve({"task": "segmentation", "model": {"name": "test_resnet"}, "adapter": {"r": 2, "targets": "conv"},
                      "segmenter": {"head": "deeplabv3", "img_size": SIZE}, "data": {"path": str(scenes)},
                      "train": {"batch_size": 1}})
    with pytest.raises(ValueError, match="train.batch_size=1 .* deeplabv3"):
        seg.build(recipe)
