"""vislora.augment: one train pipeline whose data.augment keys mean the same for the three targets (image,
bboxes, mask), and the one eval transform (classification's crop, segmentation's whole image)."""

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from vislora.augment import BOX_PARAMS, INTERPOLATIONS, EvalTransform, train_pipeline
from vislora.defaults import TASK_DEFAULTS
from vislora.errors import VisloraError
from vislora.image import load_input as preprocess_image
from vislora.image import read_image

PRE = {"input_size": (3, 32, 32), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
       "interpolation": "bilinear", "crop_pct": 0.875}
TARGETS = ("image", "bboxes", "mask")
WHOLE = {"scale": [1.0, 1.0], "ratio": [1.0, 1.0]}  # the crop is the whole (square) image: no randomness left
BOXES = np.array([[2, 3, 12, 20], [16, 8, 30, 30]], dtype=np.float32)


def _scene(side: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (side, side, 3), dtype=np.uint8), rng.integers(0, 5, (side, side), dtype=np.uint8))


def _run(target: str, augment: dict, rgb: np.ndarray, mask: np.ndarray, pre: dict = PRE, seed: int = 0) -> dict:
    """The pipeline of `target` on one sample (boxes scaled to the image's side), its outputs as numpy."""
    pipeline = train_pipeline(pre, augment, target)
    pipeline.set_random_seed(seed)
    extra = {"image": {}, "mask": {"mask": mask},
             "bboxes": {"bboxes": BOXES * rgb.shape[1] / 32, "labels": np.array([1, 2])}}[target]
    out = pipeline(image=rgb, **extra)
    return {k: (v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in out.items()}


def _normalized(rgb: np.ndarray, pre: dict = PRE) -> np.ndarray:
    x = (rgb.astype(np.float32) / np.float32(255) - np.asarray(pre["mean"], np.float32)) / np.asarray(pre["std"],
                                                                                                      np.float32)
    return x.transpose(2, 0, 1)


@pytest.mark.parametrize("target", TARGETS)
def test_hflip_1_flips_the_image_and_its_targets(target):
    """scale [1, 1], hflip 1, color_jitter 0: the image is exactly mirrored for every target, boxes and mask too."""
    rgb, mask = _scene(32)
    out = _run(target, {**WHOLE, "hflip": 1.0, "color_jitter": 0.0}, rgb, mask)
    np.testing.assert_allclose(out["image"], _normalized(rgb[:, ::-1]), atol=1e-6)
    if target == "mask":
        assert np.array_equal(out["mask"], mask[:, ::-1])
    if target == "bboxes":
        flipped = np.stack([32 - BOXES[:, 2], BOXES[:, 1], 32 - BOXES[:, 0], BOXES[:, 3]], axis=1)
        np.testing.assert_allclose(out["bboxes"], flipped, atol=1e-4)
        assert out["labels"].tolist() == [1, 2]


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear", "bicubic", "area"])
@pytest.mark.parametrize("target", TARGETS)
def test_hflip_0_only_resizes_with_the_interpolation_and_the_mask_nearest(target, interpolation):
    """scale [1, 1], hflip 0, color_jitter 0: a 48 px image is only resized to 32 px with preprocess's
    interpolation, whatever the target; the mask always nearest, the boxes scaled by 32 / 48."""
    rgb, mask = _scene(48, seed=1)
    pre = {**PRE, "interpolation": interpolation}
    out = _run(target, {**WHOLE, "hflip": 0.0, "color_jitter": 0.0}, rgb, mask, pre)
    resized = cv2.resize(rgb, (32, 32), interpolation=INTERPOLATIONS[interpolation])
    np.testing.assert_allclose(out["image"], _normalized(resized, pre), atol=1e-6)
    if target == "mask":
        assert np.array_equal(out["mask"], cv2.resize(mask, (32, 32), interpolation=cv2.INTER_NEAREST))
    if target == "bboxes":
        np.testing.assert_allclose(out["bboxes"], BOXES, atol=1e-3)


@pytest.mark.parametrize("seed", range(3))
def test_every_key_draws_the_same_augmentation_for_every_target(seed):
    """The same seed, the same image: crop, flip and colour jitter give identical pixels for the three targets
    (the same steps with the same parameters in the same order), hue never moves and the jitter is always on."""
    rgb, mask = _scene(40, seed)
    augment = {"scale": [0.5, 1.0], "hflip": 0.5, "color_jitter": 0.3}
    images = [_run(target, augment, rgb, mask, seed=seed)["image"] for target in TARGETS]
    assert all(np.array_equal(images[0], other) for other in images[1:])
    steps = [[(type(s).__name__, {k: v for k, v in s.get_transform_init_args().items() if k != "strict"})
              for s in train_pipeline(PRE, augment, target).transforms] for target in TARGETS]
    assert steps[0] == steps[1] == steps[2]
    names = [name for name, _ in steps[0]]
    assert names == ["RandomResizedCrop", "HorizontalFlip", "ColorJitter", "Normalize", "ToTensorV2"]
    jitter = dict(steps[0])["ColorJitter"]
    assert jitter["hue"] == (0.0, 0.0) and jitter["p"] == 1.0 and jitter["brightness"] == (0.7, 1.3)


@pytest.mark.parametrize("target", TARGETS)
def test_defaults_are_the_targets_task_defaults(target):
    """None values take TASK_DEFAULTS of the target's task; the crop, flip and jitter steps follow them."""
    task = {"image": "classification", "bboxes": "detection", "mask": "segmentation"}[target]
    from_none = train_pipeline(PRE, {"scale": None, "hflip": None, "color_jitter": None}, target)
    crop = from_none.transforms[0]
    want = TASK_DEFAULTS[task]["data"]["augment"]
    assert tuple(crop.scale) == tuple(want["scale"]) and from_none.transforms[1].p == want["hflip"]


def test_boxes_move_with_the_crop_and_keep_their_labels():
    """Random crops: every kept box lies inside the output and keeps its label; a box loses out only when the crop
    leaves less than BOX_PARAMS' min_visibility of it (30%), as detection always did."""
    rgb, mask = _scene(64)
    assert BOX_PARAMS["min_visibility"] == 0.3 and BOX_PARAMS["clip"] is True
    pre = {"input_size": (3, 32, 32), "interpolation": "bilinear"}  # detection's: pixels in [0, 1], no mean/std
    kept = 0
    for seed in range(20):
        out = _run("bboxes", {"scale": [0.5, 1.0], "hflip": 0.5, "color_jitter": 0.2}, rgb, mask, pre, seed)
        boxes, labels = out["bboxes"].reshape(-1, 4), out["labels"].tolist()
        assert 0.0 <= out["image"].min() and out["image"].max() <= 1.0 and out["image"].shape == (3, 32, 32)
        assert (boxes >= 0).all() and (boxes <= 32).all() and len(boxes) == len(labels)
        assert labels in ([1, 2], [1], [2], [])
        kept += len(labels)
    assert kept >= 30  # scale >= 0.5 keeps most boxes


@pytest.mark.parametrize("target", ["bboxes", "mask"])
@pytest.mark.parametrize("key,value", [("rand", "rand-m9-mstd0.5"), ("erase", 0.5)])
def test_classification_only_keys_are_refused_for_other_targets(target, key, value):
    with pytest.raises(VisloraError, match=key):
        train_pipeline(PRE, {key: value}, target)
    assert train_pipeline(PRE, {"mixup": 0.8, "cutmix": 1.0}, target)  # batch mixing: not this pipeline's
    with pytest.raises(ValueError, match="target"):
        train_pipeline(PRE, {}, "keypoints")


def test_whole_eval_transform_resizes_the_mask_nearest_and_the_crop_one_refuses_it():
    rgb, mask = _scene(48)
    out = EvalTransform(PRE, whole=True)(image=rgb, mask=mask)
    assert out["image"].shape == (3, 32, 32) and out["mask"].shape == (32, 32)
    assert set(np.unique(out["mask"].numpy())) <= set(np.unique(mask))
    with pytest.raises(ValueError, match="whole"):
        EvalTransform(PRE)(image=rgb, mask=mask)


def test_train_and_eval_transforms_shape_and_normalization():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    train = train_pipeline(PRE, {"scale": [0.5, 1.0], "hflip": 0.5, "color_jitter": 0.3})
    out = train(image=image)["image"]
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    wide = train_pipeline({**PRE, "input_size": [3, 24, 40]})(image=image)["image"]
    assert wide.shape == (3, 24, 40)
    flat = np.full((40, 60, 3), 128, np.uint8)
    evaluated = EvalTransform(PRE)(image=flat)["image"]
    want = (128 / 255 - np.array(PRE["mean"])) / np.array(PRE["std"])
    assert evaluated.shape == (3, 32, 32)
    torch.testing.assert_close(evaluated, torch.tensor(want, dtype=torch.float32)[:, None, None].expand(3, 32, 32))
    # no colour jitter, no flip: a flat image stays flat and exactly normalized after the random crop too
    plain = train_pipeline(PRE, {"hflip": 0, "color_jitter": 0})
    assert [type(t).__name__ for t in plain.transforms] == ["RandomResizedCrop", "Normalize", "ToTensorV2"]
    torch.testing.assert_close(plain(image=flat)["image"], evaluated)


def test_eval_transform_matches_the_exported_preprocessing(tmp_path):
    path = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (45, 61, 3), dtype=np.uint8)).save(path)
    ours = EvalTransform(PRE)(image=read_image(path))["image"].numpy()
    np.testing.assert_allclose(ours, preprocess_image(path, PRE), atol=1e-6)


def test_bad_augment_and_preprocess_are_named():
    with pytest.raises(ValueError, match="jitter_strength"):
        train_pipeline(PRE, {"jitter_strength": 0.2})
    with pytest.raises(ValueError, match="scale"):
        train_pipeline(PRE, {"scale": (0.9, 0.1)})
    with pytest.raises(ValueError, match="interpolation"):
        train_pipeline({**PRE, "interpolation": "fancy"})
    with pytest.raises(ValueError, match="mean"):
        train_pipeline({"input_size": (3, 8, 8), "std": (1, 1, 1), "interpolation": "bilinear"})

