"""Classification data: folder layouts and splits, odd and broken files, preprocess config, loaders
(the transforms: tests/test_augment.py)."""

import json
import logging
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from sklearn.linear_model import LogisticRegression

from vislora import data as vdata
from vislora.augment import EvalTransform, train_pipeline
from vislora.image import read_image
from vislora.recipe import resolve
from vislora.tasks import backbone, classification

from zoo import RUN_VIT

ODD = ("odd_gray.png", "odd_cmyk.jpg", "odd_palette.png", "odd_rgba.png", "odd_upper.JPG", "odd_photo.webp")
PRE = {"input_size": (3, 32, 32), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
       "interpolation": "bilinear", "crop_pct": 0.875}


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory):
    return vdata.make_synthetic_folder(tmp_path_factory.mktemp("odd"), classes=3, per_class=8, size=32,
                                       oddities=True)


def labels_match_folders(split: vdata.Split) -> bool:
    return all(split.classes[y] == p.parent.name for p, y in split.items)


# ---- layouts and splits ----------------------------------------------------------------------------------------
def test_synthetic_folder_is_fast_and_complete(tmp_path):
    start = time.perf_counter()
    root = vdata.make_synthetic_folder(tmp_path / "flat", classes=3, per_class=20, size=40)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"60 images took {elapsed:.2f} s"  # ~0.3 s measured; slack for a loaded machine
    assert sorted(p.name for p in root.iterdir()) == ["class_0", "class_1", "class_2"]
    assert all(len(list((root / c).iterdir())) == 20 for c in ("class_0", "class_1", "class_2"))
    many = vdata.make_synthetic_folder(tmp_path / "many", classes=12, per_class=1, size=16)
    assert vdata._class_dirs(many)[:3] == [many / "class_00", many / "class_01", many / "class_02"]  # label = k


def test_split_layout(tmp_path):
    root = vdata.make_synthetic_folder(tmp_path, classes=3, per_class=20, split=True)
    train, val = vdata.scan_folder(root)
    assert train.classes == val.classes == ["class_0", "class_1", "class_2"]
    assert Counter(y for _, y in train.items) == {0: 15, 1: 15, 2: 15}
    assert Counter(y for _, y in val.items) == {0: 5, 1: 5, 2: 5}
    assert all(p.parts[-3] == "train" for p, _ in train.items) and all(p.parts[-3] == "val" for p, _ in val.items)
    assert labels_match_folders(train) and labels_match_folders(val)


def test_flat_layout_stratified_seeded_split(tmp_path):
    root = vdata.make_synthetic_folder(tmp_path, classes=3, per_class=20)
    train, val = vdata.scan_folder(root, val_fraction=0.2, seed=0)
    assert Counter(y for _, y in val.items) == {0: 4, 1: 4, 2: 4}  # stratified: every class in val, in proportion
    assert Counter(y for _, y in train.items) == {0: 16, 1: 16, 2: 16}
    assert not {p for p, _ in train.items} & {p for p, _ in val.items}
    assert len({p for p, _ in train.items + val.items}) == 60
    assert labels_match_folders(train) and labels_match_folders(val)
    assert vdata.scan_folder(root, 0.2, seed=0)[1].items == val.items
    assert vdata.scan_folder(root, 0.2, seed=1)[1].items != val.items
    everything, empty = vdata.scan_folder(root, val_fraction=0.0)
    assert len(everything.items) == 60 and empty.items == [] and empty.classes == everything.classes


def test_train_folder_without_val_is_split(tmp_path):
    root = vdata.make_synthetic_folder(tmp_path, classes=2, per_class=20, split=True)
    for f in (root / "val").rglob("*.png"):
        f.unlink()
    for d in sorted((root / "val").rglob("*"), reverse=True):
        d.rmdir()
    (root / "val").rmdir()
    train, val = vdata.scan_folder(root, val_fraction=0.25)
    assert Counter(y for _, y in val.items) == {0: 4, 1: 4} and len(train.items) == 22


def test_file_discovery_rules(tmp_path):
    for cls in ("b", "a"):
        (tmp_path / cls / "nested").mkdir(parents=True)
        (tmp_path / cls / ".thumbs").mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / cls / "x.png")
        Image.new("RGB", (8, 8)).save(tmp_path / cls / "nested" / "y.JPEG", format="JPEG")
        Image.new("RGB", (8, 8)).save(tmp_path / cls / ".thumbs" / "z.png")
        (tmp_path / cls / "._x.png").write_bytes(b"macOS resource fork")
        (tmp_path / cls / "notes.txt").write_text("not an image")
    (tmp_path / ".git").mkdir()
    full, _ = vdata.scan_folder(tmp_path, val_fraction=0.0)
    assert full.classes == ["a", "b"]
    assert [(p.relative_to(tmp_path).as_posix(), y) for p, y in full.items] == [
        ("a/nested/y.JPEG", 0), ("a/x.png", 0), ("b/nested/y.JPEG", 1), ("b/x.png", 1)]


def make_classes(root: Path, **counts: int) -> Path:
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (i * 40 % 255, 0, 0)).save(root / name / f"{i}.png")
    return root


def test_empty_class_folder_is_named(tmp_path):
    make_classes(tmp_path, cat=3, dog=0)
    (tmp_path / "dog" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="holds no images") as e:
        vdata.scan_folder(tmp_path)
    assert str(tmp_path / "dog") in str(e.value)


def test_single_class_is_refused(tmp_path):
    make_classes(tmp_path, cat=4)
    with pytest.raises(ValueError, match="at least 2") as e:
        vdata.scan_folder(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_unknown_val_class_is_named(tmp_path):
    make_classes(tmp_path / "train", cat=2, dog=2)
    make_classes(tmp_path / "val", cat=1, fox=1)
    with pytest.raises(ValueError, match="not one of the training classes") as e:
        vdata.scan_folder(tmp_path)
    assert str(tmp_path / "val" / "fox") in str(e.value)


def test_other_bad_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        vdata.scan_folder(tmp_path / "nowhere")
    make_classes(tmp_path / "one", cat=1, dog=5)
    with pytest.raises(ValueError, match="at least 2 per class") as e:
        vdata.scan_folder(tmp_path / "one", val_fraction=0.2)
    assert str(tmp_path / "one" / "cat") in str(e.value)
    make_classes(tmp_path / "ok", cat=5, dog=5)
    with pytest.raises(ValueError, match="val_fraction"):
        vdata.scan_folder(tmp_path / "ok", val_fraction=1.0)
    with pytest.raises(ValueError, match="cannot split"):  # 1 val image for 2 classes
        vdata.scan_folder(tmp_path / "ok", val_fraction=0.05)


def test_scan_eval_folder(tmp_path):
    root = vdata.make_synthetic_folder(tmp_path / "data", classes=3, per_class=8, split=True)
    classes = ["class_0", "class_1", "class_2"]
    from_root, from_val = vdata.scan_eval_folder(root, classes), vdata.scan_eval_folder(root / "val", classes)
    assert from_root.items == from_val.items and len(from_val.items) == 6 and labels_match_folders(from_val)
    only_two = make_classes(tmp_path / "plain", class_2=2)
    split = vdata.scan_eval_folder(only_two, classes)
    assert split.classes == classes and [y for _, y in split.items] == [2, 2]  # training label indices kept
    make_classes(tmp_path / "plain", zebra=1)
    with pytest.raises(ValueError, match="not one of the training classes") as e:
        vdata.scan_eval_folder(only_two, classes)
    assert str(only_two / "zebra") in str(e.value)


# ---- reading odd and broken files ------------------------------------------------------------------------------
def test_every_odd_file_loads_as_rgb(odd_folder):
    paths = {p.name: p for p in odd_folder.rglob("odd_*")}
    assert set(paths) == {*ODD, "odd_corrupt.jpg"}
    for name in ODD:
        rgb = read_image(paths[name])
        assert rgb.shape == (32, 32, 3) and rgb.dtype == np.uint8, name
        assert rgb.max() > 150, name  # the class shape survived the conversion
    gray = read_image(paths["odd_gray.png"])
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    with pytest.raises(ValueError, match="unreadable image") as e:
        read_image(paths["odd_corrupt.jpg"])
    assert str(paths["odd_corrupt.jpg"]) in str(e.value)
    with pytest.raises(ValueError, match="missing.png"):
        read_image(odd_folder / "missing.png")


def test_alpha_16bit_and_exif_orientation(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = 200, 255
    rgba[0, 0, 3] = 0  # fully transparent white-ish pixel -> black
    rgba[0, 1, 3] = 128
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out[0, 0].tolist() == [0, 0, 0] and 95 <= out[0, 1, 0] <= 105 and out[1, 1].tolist() == [200] * 3
    Image.fromarray(np.full((3, 5), 65535, np.uint16)).save(tmp_path / "w.png")
    Image.fromarray(np.full((3, 5), 32768, np.uint16)).save(tmp_path / "h.png")
    assert read_image(tmp_path / "w.png").min() == 255 and read_image(tmp_path / "h.png").max() == 128
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.new("RGB", (20, 10)).save(tmp_path / "r.jpg", exif=exif)
    assert read_image(tmp_path / "r.jpg").shape == (20, 10, 3)


def test_dataset_skips_the_corrupt_file_at_scan(odd_folder, caplog):
    split, _ = vdata.scan_folder(odd_folder, val_fraction=0.0)
    with caplog.at_level(logging.WARNING, logger="vislora.data"):
        ds = vdata.ImageDataset(split, EvalTransform(PRE))
    corrupt = str(next(odd_folder.rglob("odd_corrupt.jpg")))
    assert ds.skipped == [corrupt] and corrupt in caplog.text
    assert len(ds) == len(split.items) - 1 == 3 * 8 + len(ODD)
    for i in range(len(ds)):
        image, label = ds[i]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and 0 <= label < 3
    assert ds.load_failures == 0


def test_file_broken_after_scan_is_dropped_not_fatal(tmp_path, caplog):
    root = vdata.make_synthetic_folder(tmp_path, classes=2, per_class=6, size=16)
    split, _ = vdata.scan_folder(root, val_fraction=0.0)
    ds = vdata.ImageDataset(split, train_pipeline(PRE))
    broken = split.items[0][0]
    broken.write_bytes(b"truncated")
    with caplog.at_level(logging.WARNING, logger="vislora.data"):
        assert ds[0] is None
    assert str(broken) in caplog.text and ds.load_failures == 1
    images, labels = vdata.collate_skip([ds[0], ds[1], ds[2]])
    assert images.shape == (2, 3, 32, 32) and labels.tolist() == [0, 0]
    images, labels = vdata.collate_skip([None, None])
    assert images.shape[0] == 0 and labels.numel() == 0 and labels.dtype == torch.long


def test_loader_with_workers_completes_an_epoch_over_odd_files(odd_folder, tmp_path):
    split, _ = vdata.scan_folder(odd_folder, val_fraction=0.0)
    copy_dir = tmp_path / "late"
    copy_dir.mkdir()
    late = copy_dir / "late.png"  # readable at scan, broken before the epoch: fails inside a worker
    Image.new("RGB", (16, 16)).save(late)
    split.items.append((late, 1))
    ds = vdata.ImageDataset(split, train_pipeline(PRE, {"scale": (0.5, 1.0)}))
    late.write_bytes(b"gone bad")
    loader = vdata.build_loader(ds, batch_size=8, train=True, workers=2, seed=0, drop_last=False)
    seen = 0
    for images, labels in loader:
        assert images.shape[1:] == (3, 32, 32) and images.dtype == torch.float32 and images.shape[0] == len(labels)
        seen += len(labels)
    assert len(ds.skipped) == 1 and seen == len(ds) - 1 and ds.load_failures == 1


# ---- preprocess config and transforms --------------------------------------------------------------------------
def test_preprocess_config_reads_the_timm_model():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=1)
    cfg = model.pretrained_cfg
    pre = vdata.preprocess_config(model)
    assert pre == {"input_size": (3, 32, 32), "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"]),
                   "interpolation": cfg["interpolation"], "crop_pct": cfg["crop_pct"]}
    from_cfg = vdata.preprocess_config(cfg)  # the pretrained_cfg alone keeps its own 224
    assert from_cfg["input_size"] == (3, 224, 224) and from_cfg["mean"] == tuple(cfg["mean"])
    over = vdata.preprocess_config(model, {"img_size": 48, "mean": [0.1, 0.2, 0.3], "std": 0.25,
                                           "interpolation": "bilinear", "crop_pct": 1.0})
    assert over == {"input_size": (3, 48, 48), "mean": (0.1, 0.2, 0.3), "std": (0.25, 0.25, 0.25),
                    "interpolation": "bilinear", "crop_pct": 1.0}
    assert vdata.preprocess_config(model, {"img_size": None, "mean": None}) == pre
    assert vdata.preprocess_config(model, {"img_size": [24, 40]})["input_size"] == (3, 24, 40)
    resnet = vdata.preprocess_config(timm.create_model("resnet10t", pretrained=False))
    assert resnet["mean"] == (0.485, 0.456, 0.406) and resnet["input_size"][0] == 3


def test_a_local_checkpoint_brings_its_cards_preprocessing(tmp_path):
    """WEIGHTS.json beside a checkpoint (as import_weights.py and pretrain.py write it) is its pretrained_cfg."""
    source = timm.create_model("vit_tiny_patch16_224", num_classes=3, **RUN_VIT["kwargs"])
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    (tmp_path / "w.json").write_text(json.dumps({"pretrained_cfg": {"mean": [0.1, 0.2, 0.3], "crop_pct": 1.0}}))
    recipe = resolve({"model": {**RUN_VIT, "checkpoint": str(tmp_path / "w.safetensors")},
                      "data": {"std": [2, 2, 2]}})
    model = classification.build_model(recipe, ["a", "b", "c"])
    pre = vdata.preprocess_config(model, {"std": recipe["data"]["std"]})
    assert pre["mean"] == (0.1, 0.2, 0.3) and pre["crop_pct"] == 1.0 and pre["std"] == (2.0, 2.0, 2.0)
    body = backbone.create_body(recipe["model"])  # detection's and segmentation's backbone
    assert body.pretrained_cfg["mean"] == [0.1, 0.2, 0.3] and "state_dict" not in body.pretrained_cfg


@pytest.mark.parametrize("overrides,key", [
    ({"size": 32}, "size"), ({"interpolation": "cubic-ish"}, "interpolation"), ({"crop_pct": 1.5}, "crop_pct"),
    ({"std": [1, 0, 1]}, "std"), ({"mean": [0.5, 0.5]}, "mean"), ({"img_size": 0}, "img_size"),
])
def test_preprocess_config_bad_overrides_name_the_key(overrides, key):
    with pytest.raises(ValueError, match=key):
        vdata.preprocess_config({"mean": (0.5, 0.5, 0.5)}, overrides)


# ---- loaders ---------------------------------------------------------------------------------------------------
class Indices(torch.utils.data.Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return torch.zeros(1), i


def test_build_loader_is_seeded_and_honours_a_sampler():
    def order(seed):
        return torch.cat([y for _, y in vdata.build_loader(Indices(), 4, True, workers=0, seed=seed)]).tolist()

    assert order(0) == order(0) != order(1)
    assert len(order(0)) == 8  # drop_last for training when there is more than one batch
    loader = vdata.build_loader(Indices(), 4, False, workers=0)
    assert torch.cat([y for _, y in loader]).tolist() == list(range(10))
    assert loader.pin_memory == torch.cuda.is_available()
    sampler = torch.utils.data.distributed.DistributedSampler(Indices(), num_replicas=2, rank=1, shuffle=False)
    with_sampler = vdata.build_loader(Indices(), 4, True, workers=0, sampler=sampler, drop_last=False)
    assert torch.cat([y for _, y in with_sampler]).tolist() == [1, 3, 5, 7, 9]


@pytest.mark.parametrize("n,batch,epochs,min_steps,accum,world,passes", [
    (60, 64, 10, None, 1, 1, 1),   # no floor
    (1000, 64, 10, 100, 1, 1, 1),  # 15 steps an epoch x 10 already >= 100
    (1000, 64, 4, 60, 1, 1, 1),    # the selection set's shortest runs: a floor of 60 adds no pass
    (60, 64, 10, 100, 1, 1, 11),   # one partial batch an epoch; 11 passes = 660 images = 10 full batches
    (120, 64, 10, 100, 1, 1, 6),   # 720 -> 11 batches an epoch
    (120, 64, 10, 100, 2, 1, 11),  # grad_accum 2 halves the steps of a pass
    (120, 64, 10, 100, 1, 2, 11),  # two ranks share the images
    (48, 16, 2, 10, 1, 1, 2),
    (60, 64, 1, 100, 1, 1, 5),     # train.max_steps 4 caps the floor (fewshot's one-epoch cells)
], ids=["off", "met", "selection-set", "tiny", "small", "accum", "ranks", "test-size", "max-steps"])
def test_min_steps_passes_over_a_small_folder_until_the_floor(n, batch, epochs, min_steps, accum, world, passes):
    t = {"min_steps": min_steps, "epochs": epochs, "batch_size": batch, "grad_accum": accum,
         "max_steps": 4 if epochs == 1 else None}
    assert vdata.passes_for(n, t, world) == passes
    if passes > 1:  # the fewest passes that reach the floor
        floor = min(min_steps, t["max_steps"] or min_steps)
        assert epochs * vdata.optimizer_steps(n * passes, batch, accum, world) >= floor
        assert epochs * vdata.optimizer_steps(n * (passes - 1), batch, accum, world) < floor


def test_repeated_dataset_cycles_its_items_and_keeps_the_augmentation():
    source = Indices()
    source.transform = "the pipeline"
    repeated = vdata.Repeated(source, 3)
    assert len(repeated) == 30 and [repeated[i][1] for i in (0, 9, 10, 29)] == [0, 9, 0, 9]
    assert repeated.transform == "the pipeline"


def test_synthetic_classes_are_learnable(tmp_path):
    root = vdata.make_synthetic_folder(tmp_path, classes=4, per_class=20, size=32, seed=3)
    train, val = vdata.scan_folder(root, val_fraction=0.25, seed=0)

    def features(split):  # 8x8 colour thumbnails: a linear model must separate the classes
        x = [np.asarray(Image.fromarray(read_image(p)).resize((8, 8), Image.BILINEAR), np.float32).ravel() / 255
             for p, _ in split.items]
        return np.stack(x), np.array([y for _, y in split.items])

    clf = LogisticRegression(max_iter=500).fit(*features(train))
    assert clf.score(*features(val)) >= 0.9


def test_class_folders_named_like_splits_are_classes(tmp_path):
    """ROOT/<class> with a class called `train` (or `valid`) is a class layout, not ROOT/train + ROOT/val."""
    root = vdata.make_synthetic_folder(tmp_path / "flat", classes=3, per_class=6, size=16)
    (root / "class_0").rename(root / "train")
    (root / "class_1").rename(root / "valid")
    train, val = vdata.scan_folder(root, 0.5, 0)
    assert train.classes == ["class_2", "train", "valid"] and len(train.items) == len(val.items) == 9
    assert vdata.scan_eval_folder(root, train.classes).classes == train.classes
    assert len(vdata.scan_eval_folder(root, train.classes).items) == 18  # all of ROOT, not ROOT/valid alone
    split = vdata.make_synthetic_folder(tmp_path / "split", classes=2, per_class=4, size=16, split=True)
    assert len(vdata.scan_eval_folder(split, ["class_0", "class_1"]).items) < 8  # a real split layout: val only
