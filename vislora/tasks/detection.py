"""Object detection on a timm backbone: torchvision FCOS / RetinaNet / Faster R-CNN over an FPN, LoRA in the body.

The timm model sits at `backbone.body` of the detector, so `inject(detector, cfg, within="backbone.body")`
adapts only the backbone (its pretrained_cfg names the stem that presets leave alone) while the FPN and the
head train fully. CNNs use timm's features_only mode; a VisionTransformer gets ViTDet's simple feature pyramid
from its last token map. Anchors, heads, losses, resizing and box post-processing are torchvision's.
Data: COCO JSON or Ultralytics YOLO folders, albumentations pipelines that move boxes with the pixels,
COCO metrics from pycocotools.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import albumentations as A
import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn as nn
import yaml
from safetensors.torch import load_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from vislora import image
from vislora.files import listing
from vislora.inject import LoraConfig, classifier_names, freeze_bn_stats, inject, set_trainable
from vislora.recipe import TASK_DEFAULTS
from vislora.tasks.common import Setup, card_pretrained_cfg, drop_path, lora_config, seeded

log = logging.getLogger(__name__)

HEADS = ("fcos", "retinanet", "fasterrcnn")
DETECTOR_KEYS = {"head", "min_size", "max_size", "out_indices", "fpn_channels", "score_thresh", "nms_thresh",
                 "detections_per_img", "anchor_sizes", "representation_size"}
TINY_BACKBONE = 10_000_000  # backbones with fewer parameters get a 64-channel FPN, larger ones 256
_AUGMENT = TASK_DEFAULTS["detection"]["data"]["augment"]  # recipe keys -> train_transform's
DEFAULT_AUGMENT = {"hflip": _AUGMENT["hflip"], "scale": tuple(_AUGMENT["scale"]), "color": _AUGMENT["color_jitter"]}


# ---- backbone: timm body + (ViT pyramid) + FPN ----------------------------------------------------
class SimplePyramid(nn.Module):
    """ViTDet's simple feature pyramid: the stride-p token map to strides p/2 (deconv), p, 2p (max-pool)."""

    def __init__(self, channels: int):
        super().__init__()
        self.levels = nn.ModuleList([nn.ConvTranspose2d(channels, channels, 2, stride=2), nn.Identity(),
                                     nn.MaxPool2d(2)])

    def forward(self, x: Tensor) -> list[Tensor]:
        out: list[Tensor] = []
        for level in self.levels:
            out.append(level(x))
        return out


class CnnBackbone(nn.Module):
    """A features_only timm CNN (`body`) and an FPN; returns the FPN maps by name, as torchvision expects."""

    def __init__(self, body: nn.Module, fpn: FeaturePyramidNetwork, out_channels: int):
        super().__init__()
        self.body, self.fpn, self.out_channels = body, fpn, out_channels
        self.channels_last = str(getattr(body, "output_fmt", "NCHW")).endswith("NHWC")  # Swin, some MaxViTs

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        feats: dict[str, Tensor] = {}
        for i, f in enumerate(self.body(x)):
            feats[str(i)] = f.permute(0, 3, 1, 2) if self.channels_last else f
        return self.fpn(feats)


def is_plain_vit(model: nn.Module) -> bool:
    """A ViT whose blocks keep one token grid (timm's VisionTransformer, EVA, DeiT, BEiT ...): it gets ViTDet's
    simple pyramid from its last tokens. Hierarchical ViTs (Swin) go through features_only like CNNs."""
    return (isinstance(model, VisionTransformer) or
            all(hasattr(model, a) for a in ("patch_embed", "num_prefix_tokens", "blocks", "forward_features")))


def token_map(tokens: Tensor, x: Tensor, patch_h: int, patch_w: int, prefix_tokens: int) -> Tensor:
    """A plain ViT's output tokens for the images x as an N x C x H/patch x W/patch map (prefix tokens dropped)."""
    gh = (x.shape[-2] + patch_h - 1) // patch_h
    gw = (x.shape[-1] + patch_w - 1) // patch_w
    tokens = tokens[:, prefix_tokens:]
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], gh, gw)


class VitBackbone(nn.Module):
    """A plain timm ViT (`body`), its last tokens as a map, a simple pyramid and an FPN."""

    def __init__(self, body: nn.Module, pyramid: SimplePyramid, fpn: FeaturePyramidNetwork,
                 out_channels: int):
        super().__init__()
        self.body, self.pyramid, self.fpn, self.out_channels = body, pyramid, fpn, out_channels
        self.patch_h, self.patch_w = (int(p) for p in body.patch_embed.patch_size)
        self.prefix_tokens = int(body.num_prefix_tokens)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        fmap = token_map(self.body.forward_features(x), x, self.patch_h, self.patch_w, self.prefix_tokens)
        feats: dict[str, Tensor] = {}
        for i, f in enumerate(self.pyramid(fmap)):
            feats[str(i)] = f
        return self.fpn(feats)


def _read_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model checkpoint {path} not found")
    if path.suffix != ".safetensors":
        raise ValueError(f"model checkpoint {path} must be a .safetensors file (pickled checkpoints are not read)")
    return load_file(str(path))


def _check_checkpoint(full: nn.Module, state: dict[str, Tensor], path, name: str) -> None:
    """Missing backbone keys are an error (they would stay random); unexpected ones are reported, heads ignored."""
    heads = classifier_names(full)
    is_head = lambda k: any(k.startswith(h + ".") for h in heads)  # noqa: E731
    expected = {k for k in full.state_dict() if not is_head(k)}
    given = {k for k in state if not is_head(k)}
    missing = sorted(k for k in expected - given if not k.endswith("num_batches_tracked"))  # a counter, not weights
    unexpected = sorted(given - expected)
    if missing:
        raise ValueError(f"checkpoint {path} does not fit timm model '{name}': {len(missing)} backbone key(s) "
                         f"missing, e.g. {missing[:5]}" + (f"; {len(unexpected)} unexpected, e.g. {unexpected[:5]}"
                                                           if unexpected else ""))
    if unexpected:
        log.warning("checkpoint %s: %d key(s) unknown to timm model '%s' are ignored, e.g. %s", path,
                    len(unexpected), name, unexpected[:5])


@contextlib.contextmanager
def _quiet_unexpected_keys(source: str):
    """timm warns about the weights' head keys (e.g. conv_head) that a features_only body does not hold; they are
    expected (a checkpoint was already checked against the full model), so say it once at INFO level instead."""
    dropped: list[str] = []

    def keep(record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("Unexpected keys"):
            dropped.append(record.getMessage().split("(", 1)[1].split(")", 1)[0])
            return False
        return True

    builder = logging.getLogger("timm.models._builder")
    builder.addFilter(keep)
    try:
        yield
    finally:
        builder.removeFilter(keep)
    if dropped:
        log.info("%s: keys the backbone does not use are ignored (%s)", source, dropped[0])


def create_body(model_cfg: dict, out_indices: Sequence[int] | None = None) -> nn.Module:
    """The timm model: features_only for CNNs and hierarchical ViTs, the plain ViT (no classifier) otherwise.
    A checkpoint is checked against the full timm model, then loaded by timm (which adapts e.g. pos_embed)."""
    if "name" not in model_cfg:
        raise ValueError("model config needs 'name' (a timm model name)")
    name, kwargs = model_cfg["name"], {**(model_cfg.get("kwargs") or {}), **drop_path(model_cfg)}
    if not timm.is_model(name):
        raise ValueError(f"model.name '{name}' is not a timm model")
    probe = timm.create_model(name, pretrained=False, **kwargs)
    vit = is_plain_vit(probe)
    patch = tuple(int(p) for p in probe.patch_embed.patch_size) if vit else ()
    load: dict = {"pretrained": bool(model_cfg.get("pretrained", False))}
    if model_cfg.get("checkpoint"):
        state = _read_checkpoint(model_cfg["checkpoint"])
        _check_checkpoint(probe, state, model_cfg["checkpoint"], name)
        load = {"pretrained": True, "pretrained_cfg_overlay": {"state_dict": state, "source": ""}}
    del probe
    if vit:  # any input size; a patch that does not divide torchvision's padding to 32 pads inside timm
        kwargs = {"dynamic_img_size": True, **kwargs, "num_classes": 0}
        if any(32 % p for p in patch):
            kwargs.setdefault("dynamic_img_pad", True)
    else:
        kwargs.update(features_only=True, out_indices=tuple(out_indices or (-3, -2, -1)))
    try:
        with _quiet_unexpected_keys(f"checkpoint {model_cfg['checkpoint']}" if model_cfg.get("checkpoint")
                                    else f"pretrained weights of {name}"):
            body = timm.create_model(name, **load, **kwargs)
    except RuntimeError as e:  # e.g. a shape mismatch that timm's checkpoint filter cannot adapt
        if model_cfg.get("checkpoint"):
            raise ValueError(f"checkpoint {model_cfg['checkpoint']} cannot be loaded into '{name}': {e}") from e
        raise
    cfg = {k: v for k, v in (getattr(body, "pretrained_cfg", None) or {}).items() if k != "state_dict"}
    card = card_pretrained_cfg(model_cfg["checkpoint"]) if model_cfg.get("checkpoint") else {}
    body.pretrained_cfg = {**cfg, **card}  # the loaded tensors dropped; a local file's card names its preprocessing
    _fix_first_conv(body)
    return body


def _fix_first_conv(body: nn.Module) -> None:
    """features_only may flatten `stem.0` to `stem_0`: point pretrained_cfg['first_conv'] at the real name,
    so that inject() keeps leaving the stem alone."""
    first = body.pretrained_cfg.get("first_conv")
    modules = dict(body.named_modules())
    if isinstance(first, str) and first not in modules and first.replace(".", "_", 1) in modules:
        body.pretrained_cfg = {**body.pretrained_cfg, "first_conv": first.replace(".", "_", 1)}


def _param_count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def build_backbone(model_cfg: dict, out_indices: Sequence[int] | None, fpn_channels: int | None,
                   extra: str) -> tuple[nn.Module, list[int]]:
    """Body + FPN (extra = "p6p7" or "pool"); returns it and the nominal stride of every output map."""
    body = create_body(model_cfg, out_indices)
    channels = fpn_channels or (64 if _param_count(body) < TINY_BACKBONE else 256)
    blocks = LastLevelP6P7(channels, channels) if extra == "p6p7" else LastLevelMaxPool()
    if is_plain_vit(body):
        width = body.embed_dim
        patch = int(body.patch_embed.patch_size[0])
        strides = [max(1, patch // 2), patch, patch * 2]
        fpn = FeaturePyramidNetwork([width] * 3, channels, extra_blocks=blocks)
        backbone: nn.Module = VitBackbone(body, SimplePyramid(width), fpn, channels)
    else:
        strides = [int(r) for r in body.feature_info.reduction()]
        fpn = FeaturePyramidNetwork(list(body.feature_info.channels()), channels, extra_blocks=blocks)
        backbone = CnnBackbone(body, fpn, channels)
    strides += [strides[-1] * 2, strides[-1] * 4] if extra == "p6p7" else [strides[-1] * 2]
    return backbone, strides


def build_detector(model_cfg: dict, detector_cfg: dict, num_classes: int) -> nn.Module:
    """A torchvision detector (labels 1..num_classes, 0 = background) on a timm backbone at `backbone.body`.

    detector_cfg: head (fcos | retinanet | fasterrcnn), min_size, max_size, and optionally out_indices (CNN
    stages, default the last 3), fpn_channels (default 64 for backbones under 10M parameters, else 256),
    score_thresh (0.05), nms_thresh (torchvision's per head), detections_per_img (100), anchor_sizes (one base
    size per FPN level; default the stride for FCOS, 4x the stride otherwise), representation_size (Faster
    R-CNN box head, 1024).
    """
    unknown = sorted(set(detector_cfg) - DETECTOR_KEYS)
    if unknown:
        raise ValueError(f"unknown detector key(s) {unknown}; known: {sorted(DETECTOR_KEYS)}")
    head = detector_cfg.get("head", "fcos")
    if head not in HEADS:
        raise ValueError(f"detector head '{head}' is not one of {HEADS}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    backbone, strides = build_backbone(model_cfg, detector_cfg.get("out_indices"), detector_cfg.get("fpn_channels"),
                                       "pool" if head == "fasterrcnn" else "p6p7")
    base = detector_cfg.get("anchor_sizes") or [s if head == "fcos" else 4 * s for s in strides]
    if len(base) != len(strides):
        raise ValueError(f"anchor_sizes has {len(base)} entries but the FPN has {len(strides)} levels")
    cfg = getattr(backbone.body, "pretrained_cfg", {}) or {}
    common = {"min_size": detector_cfg.get("min_size", 800), "max_size": detector_cfg.get("max_size", 1333),
              "image_mean": list(cfg.get("mean", IMAGENET_DEFAULT_MEAN)),
              "image_std": list(cfg.get("std", IMAGENET_DEFAULT_STD))}
    score = float(detector_cfg.get("score_thresh", 0.05))
    per_img = int(detector_cfg.get("detections_per_img", 100))
    levels = len(strides)
    if head == "fcos":
        anchors = AnchorGenerator(tuple((int(a),) for a in base), ((1.0,),) * levels)
        return FCOS(backbone, num_classes + 1, anchor_generator=anchors, score_thresh=score,
                    nms_thresh=float(detector_cfg.get("nms_thresh", 0.6)), detections_per_img=per_img, **common)
    if head == "retinanet":
        sizes = tuple((int(a), round(a * 2 ** (1 / 3)), round(a * 2 ** (2 / 3))) for a in base)
        anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * levels)
        return RetinaNet(backbone, num_classes + 1, anchor_generator=anchors, score_thresh=score,
                         nms_thresh=float(detector_cfg.get("nms_thresh", 0.5)), detections_per_img=per_img, **common)
    anchors = AnchorGenerator(tuple((int(a),) for a in base), ((0.5, 1.0, 2.0),) * levels)
    roi_pool = MultiScaleRoIAlign([str(i) for i in range(levels - 1)], output_size=7, sampling_ratio=2)
    rep = int(detector_cfg.get("representation_size", 1024))
    return FasterRCNN(backbone, None, rpn_anchor_generator=anchors, box_roi_pool=roi_pool,
                      box_head=TwoMLPHead(backbone.out_channels * 7 * 7, rep),
                      box_predictor=FastRCNNPredictor(rep, num_classes + 1), box_score_thresh=score,
                      box_nms_thresh=float(detector_cfg.get("nms_thresh", 0.5)), box_detections_per_img=per_img,
                      **common)


# ---- what trains ----------------------------------------------------------------------------------
def detection_train_modules(detector: nn.Module) -> list[str]:
    """The modules trained fully next to a backbone adapter: the FPN (and ViT pyramid) and the head(s)."""
    names = ["backbone.fpn"] + (["backbone.pyramid"] if hasattr(detector.backbone, "pyramid") else [])
    if isinstance(detector, FasterRCNN):
        return names + ["rpn", "roi_heads"]
    if isinstance(detector, (FCOS, RetinaNet)):
        return names + ["head"]
    raise TypeError(f"{type(detector).__name__} is not a detector made by build_detector")


def adapt_detector(detector: nn.Module, lora_config: LoraConfig | None) -> nn.Module:
    """None: full fine-tuning (backbone BN frozen). Otherwise LoRA inside `backbone.body`, neck and head trained;
    entries of lora_config.train other than "head" (the timm classifier) are kept as extra trained modules."""
    if lora_config is None:
        detector.requires_grad_(True)
        freeze_bn_stats(detector.backbone.body)
        return detector
    train = detection_train_modules(detector)
    train += [t for t in lora_config.train if t != "head" and t not in train]
    return inject(detector, dataclasses.replace(lora_config, train=train), within="backbone.body")


# ---- data -----------------------------------------------------------------------------------------
def clean_boxes(boxes: np.ndarray, labels: np.ndarray, width: float, height: float
                ) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Clip xyxy boxes to the image, drop non-finite and empty ones; returns boxes, labels, clipped, dropped."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    finite = np.isfinite(boxes).all(axis=1)
    clipped = boxes.copy()
    clipped[:, 0::2] = np.clip(np.nan_to_num(clipped[:, 0::2]), 0, width)
    clipped[:, 1::2] = np.clip(np.nan_to_num(clipped[:, 1::2]), 0, height)
    keep = finite & (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    moved = (np.abs(clipped - np.nan_to_num(boxes)) > 0.01).any(axis=1)  # rounding of saved coordinates is no news
    n_clipped = int((keep & moved).sum())
    return clipped[keep].astype(np.float32), labels[keep], n_clipped, int((~keep).sum())


def _report(source, clipped: int, dropped: int) -> None:
    if clipped or dropped:
        log.warning("%s: dropped %d degenerate box(es) (zero/negative area, NaN/inf or outside the image), "
                    "clipped %d to the image", source, dropped, clipped)


class DetectionDataset(Dataset):
    """Images with boxes; item = (CHW float image in [0, 1], {boxes [N,4] xyxy pixels, labels [N] in 1..K,
    image_id}). An albumentations pipeline (with BboxParams pascal_voc, label_fields=['labels']) moves boxes."""

    def __init__(self, records: list[dict], class_names: list[str], transform: A.Compose | None = None,
                 skipped: Sequence[str] = ()):
        self.records, self.class_names, self.transform = records, list(class_names), transform
        self.skipped = list(skipped)  # image files set aside as unreadable when the records were read

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[Tensor, dict] | None:
        rec = self.records[index]
        try:
            pixels = image.read_image(rec["path"])
        except ValueError as e:  # a file that broke after the scan: skipped, as classification does
            log.warning("skipping %s", e)
            return None
        boxes, labels = rec["boxes"], rec["labels"]
        if self.transform is not None:
            out = self.transform(image=pixels, bboxes=boxes, labels=labels)
            pixels, boxes, labels = out["image"], out["bboxes"], out["labels"]
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # rounding in a resize can empty a box
        tensor = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float().div_(255)
        return tensor, {"boxes": torch.from_numpy(boxes[keep]), "labels": torch.from_numpy(labels[keep]),
                        "image_id": int(rec["image_id"])}


def _size(path: Path) -> tuple[int, int] | None:
    """(width, height) of an image, None for a file that cannot be read (it is skipped, not fatal)."""
    try:
        return image.image_size(path)
    except ValueError:
        return None


def usable_records(records: list[dict], source: str) -> tuple[list[dict], list[str]]:
    """The records whose image Pillow can read, and the paths of the others (reported once, by name)."""
    skipped = [str(r["path"]) for r in records if r.get("size") is None or not image.verifies(r["path"])]
    if skipped:
        log.warning("%s: skipping %d unreadable image(s): %s", source, len(skipped), listing(skipped))
    bad = set(skipped)
    return [r for r in records if str(r["path"]) not in bad], skipped


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def coco_categories(data: dict, path: Path) -> tuple[dict[int, int], list[str]]:
    """Category id -> label 1..K (in id order) and the class names."""
    try:
        cats = sorted(data["categories"], key=lambda c: c["id"])
        return {c["id"]: i + 1 for i, c in enumerate(cats)}, [str(c["name"]) for c in cats]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: 'categories' must be a list of {{id, name}} entries ({e!r})") from e


def coco_records(ann_path: str | os.PathLike, images_dir: str | os.PathLike, label_of: dict[int, int] | None = None
                 ) -> tuple[list[dict], list[str], dict[int, int]]:
    """Records of one COCO file, its class names and category id -> label map (label_of: use another file's).
    Crowd boxes are skipped; missing image files are an error at once."""
    ann_path, images_dir = Path(ann_path), Path(images_dir)
    data = _read_json(ann_path)
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise ValueError(f"{ann_path}: COCO key '{key}' is missing")
    own_labels, names = coco_categories(data, ann_path)
    label_of = label_of or own_labels
    images = {}
    for img in data["images"]:
        if "id" not in img or "file_name" not in img:
            raise ValueError(f"{ann_path}: image entry {img} needs 'id' and 'file_name'")
        images[img["id"]] = img
    missing = [img["file_name"] for img in images.values() if not (images_dir / img["file_name"]).is_file()]
    if missing:
        raise FileNotFoundError(f"{ann_path}: {len(missing)} image file(s) named in the annotations are missing "
                                f"under {images_dir}, e.g. {missing[:5]}")
    boxes: dict = {i: [] for i in images}
    for ann in data["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        if ann.get("image_id") not in images:
            raise ValueError(f"{ann_path}: annotation {ann.get('id')} refers to unknown image_id {ann.get('image_id')}")
        if ann.get("category_id") not in label_of:
            raise ValueError(f"{ann_path}: annotation {ann.get('id')} has unknown category_id "
                             f"{ann.get('category_id')}")
        bbox = ann.get("bbox")
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            raise ValueError(f"{ann_path}: annotation {ann.get('id')} needs a bbox [x, y, w, h], got {bbox!r}")
        try:
            x, y, w, h = (float(v) if v is not None else math.nan for v in bbox)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{ann_path}: annotation {ann.get('id')} has a non-numeric bbox {bbox!r}") from e
        boxes[ann["image_id"]].append(([x, y, x + w, y + h], label_of[ann["category_id"]]))
    records, clipped, dropped = [], 0, 0
    for position, (image_id, img) in enumerate(images.items()):
        path = images_dir / img["file_name"]
        size = (img["width"], img["height"]) if img.get("width") and img.get("height") else _size(path)
        if size is None:  # unreadable: usable_records sets it aside
            records.append({"path": path, "boxes": np.zeros((0, 4)), "labels": np.zeros(0, dtype=np.int64),
                            "size": None, "image_id": position})
            continue
        width, height = size
        b = np.array([x for x, _ in boxes[image_id]], dtype=np.float64).reshape(-1, 4)
        lab = np.array([c for _, c in boxes[image_id]], dtype=np.int64)
        b, lab, c, d = clean_boxes(b, lab, width, height)
        clipped, dropped = clipped + c, dropped + d
        records.append({"path": path, "boxes": b, "labels": lab, "size": size,
                        "image_id": image_id if isinstance(image_id, int) else position})
    _report(ann_path, clipped, dropped)
    return records, names, label_of


def yolo_names(root: Path) -> tuple[list[str], dict]:
    path = root / "data.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"YOLO dataset {root} has no data.yaml (it must list the class 'names')")
    data = yaml.safe_load(path.read_text()) or {}
    names = data.get("names")
    if isinstance(names, dict):
        keys = sorted(int(k) for k in names)
        if keys != list(range(len(keys))):
            raise ValueError(f"{path}: 'names' keys must be 0..{len(keys) - 1}, got {keys}")
        names = [str(names[k]) if k in names else str(names[str(k)]) for k in keys]
    if not isinstance(names, list) or not names:
        raise ValueError(f"{path}: 'names' must be a non-empty list or a dict {{index: name}}")
    return [str(n) for n in names], data


def _label_path(image: Path) -> Path:
    """Ultralytics' rule: the last /images/ of the path becomes /labels/, the suffix .txt."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return Path(sb.join(str(image).rsplit(sa, 1))).with_suffix(".txt")


def _yolo_boxes(label_file: Path, width: int, height: int, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    boxes, labels = [], []
    for lineno, line in enumerate(label_file.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            cls, values = float(parts[0]), [float(v) for v in parts[1:]]
        except ValueError as e:
            raise ValueError(f"{label_file}:{lineno}: not numbers: {line!r}") from e
        if not (math.isfinite(cls) and cls == int(cls)):
            raise ValueError(f"{label_file}:{lineno}: class {parts[0]!r} is not a whole number (0..{n_classes - 1})")
        cls = int(cls)
        if not 0 <= cls < n_classes:
            raise ValueError(f"{label_file}:{lineno}: class {cls} is outside 0..{n_classes - 1} (data.yaml names)")
        if len(values) == 4:
            cx, cy, w, h = values
            box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
        elif len(values) >= 6 and len(values) % 2 == 0:  # a segment polygon: its bounding box
            xs, ys = values[0::2], values[1::2]
            box = [min(xs), min(ys), max(xs), max(ys)]
        else:
            raise ValueError(f"{label_file}:{lineno}: expected 'class cx cy w h' (or a polygon), got {line!r}")
        boxes.append([box[0] * width, box[1] * height, box[2] * width, box[3] * height])
        labels.append(cls + 1)
    return np.array(boxes, dtype=np.float64).reshape(-1, 4), np.array(labels, dtype=np.int64)


def yolo_records(root: str | os.PathLike, split: str, names: list[str], data: dict) -> list[dict]:
    """Records of one split: images under data.yaml's `train`/`val` dir (default images/<split>); an image
    without a label file has no boxes."""
    root = Path(root)
    folder = data.get(split) or f"images/{split}"
    if not isinstance(folder, str):
        raise ValueError(f"{root / 'data.yaml'}: '{split}' must be one folder (relative to {root}), got {folder!r}")
    image_dir = root / folder
    if not image_dir.is_dir():
        raise FileNotFoundError(f"YOLO dataset {root}: image folder {image_dir} for split '{split}' not found")
    files = sorted(p for p in image_dir.rglob("*") if p.suffix.lower() in image.EXTENSIONS)
    records, clipped, dropped = [], 0, 0
    bad_files = []
    for i, path in enumerate(files):
        size = _size(path)
        if size is None:  # unreadable: usable_records sets it aside
            records.append({"path": path, "boxes": np.zeros((0, 4)), "labels": np.zeros(0, dtype=np.int64),
                            "size": None, "image_id": i})
            continue
        width, height = size
        label_file = _label_path(path)
        if label_file.is_file():
            b, lab = _yolo_boxes(label_file, width, height, len(names))
        else:
            b, lab = np.zeros((0, 4)), np.zeros(0, dtype=np.int64)
        b, lab, c, d = clean_boxes(b, lab, width, height)
        if c or d:
            bad_files.append(label_file.name)
        clipped, dropped = clipped + c, dropped + d
        records.append({"path": path, "boxes": b, "labels": lab, "size": size, "image_id": i})
    if bad_files:
        _report(f"{image_dir} labels {bad_files[:5]}{' ...' if len(bad_files) > 5 else ''}", clipped, dropped)
    return records


def train_transform(img_size: int, augment: dict | None = None) -> A.Compose:
    """Light detection augmentation: flip, random scale crop to img_size x img_size, colour jitter.
    augment overrides DEFAULT_AUGMENT ({"hflip": p, "scale": (min, max) area or None, "color": strength})."""
    unknown = sorted(set(augment or {}) - set(DEFAULT_AUGMENT))
    if unknown:
        raise ValueError(f"unknown augment key(s) {unknown}; known: {sorted(DEFAULT_AUGMENT)}")
    aug = {**DEFAULT_AUGMENT, **(augment or {})}
    ops: list = []
    if aug["hflip"]:
        ops.append(A.HorizontalFlip(p=float(aug["hflip"])))
    if aug["scale"]:
        lo, hi = aug["scale"]
        ops.append(A.RandomResizedCrop(size=(img_size, img_size), scale=(float(lo), float(hi)), p=1.0))
    if aug["color"]:
        c = float(aug["color"])
        ops.append(A.ColorJitter(brightness=c, contrast=c, saturation=c, hue=min(c / 4, 0.5), p=0.8))
    return A.Compose(ops, bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels"], min_visibility=0.3,
                                                   min_area=4.0, min_width=1.0, min_height=1.0, clip=True))


def _need(cfg: dict, *keys: str) -> None:
    missing = [k for k in keys if not cfg.get(k)]
    if missing:
        raise ValueError(f"data config (format {cfg.get('format')!r}) needs key(s) {missing}")


def build_detection_datasets(data_cfg: dict, img_size: int, augment: dict | None = None
                             ) -> tuple[DetectionDataset, DetectionDataset, list[str]]:
    """Train (augmented) and val (untouched: the detector resizes) datasets and the class names.

    {format: coco, images: DIR, train_ann: FILE, val_ann: FILE} (file_name relative to images) or
    {format: yolo, path: ROOT} (ROOT/images/{train,val}, ROOT/labels/{train,val}, ROOT/data.yaml names)."""
    fmt = data_cfg.get("format")
    if fmt == "coco":
        _need(data_cfg, "images", "train_ann", "val_ann")
        train, names, label_of = coco_records(data_cfg["train_ann"], data_cfg["images"])
        val, val_names, _ = coco_records(data_cfg["val_ann"], data_cfg["images"], label_of)
        if val_names != names:
            raise ValueError(f"{data_cfg['val_ann']}: categories {val_names} differ from {data_cfg['train_ann']}: "
                             f"{names}")
    elif fmt == "yolo":
        _need(data_cfg, "path")
        names, meta = yolo_names(Path(data_cfg["path"]))
        train = yolo_records(data_cfg["path"], "train", names, meta)
        val = yolo_records(data_cfg["path"], "val", names, meta)
    else:
        raise ValueError(f"data format {fmt!r} is not supported: use 'coco' or 'yolo'")
    (train, train_skipped), (val, val_skipped) = usable_records(train, "train"), usable_records(val, "val")
    return (DetectionDataset(train, names, train_transform(img_size, augment), train_skipped),
            DetectionDataset(val, names, None, val_skipped), names)


def detection_collate(batch: list) -> tuple[list[Tensor], list[dict]]:
    """Images differ in size: keep lists (torchvision's transform batches and pads them)."""
    batch = [b for b in batch if b is not None]  # unreadable files
    images, targets = zip(*batch, strict=True) if batch else ((), ())
    return list(images), list(targets)


# ---- loss, prediction, evaluation, plots ----------------------------------------------------------
def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def detection_loss(model: nn.Module, images: list[Tensor], targets: list[dict]) -> tuple[Tensor, dict[str, float]]:
    """The summed torchvision losses of a detector in train mode, and each part as a float for logging."""
    if not model.training:
        raise ValueError("detection_loss needs model.train(): in eval mode torchvision detectors return boxes")
    device = _device(model)
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets]
    losses = model(images, targets)
    total = sum(losses.values())
    return total, {k: float(v.detach()) for k, v in losses.items()}


@torch.no_grad()
def predict_detections(model: nn.Module, images: list[Tensor]) -> list[dict]:
    """Boxes (xyxy, input pixels), scores and labels per image, on the CPU; the train/eval mode is restored."""
    was_training = model.training
    model.eval()
    try:
        out = model([im.to(_device(model)) for im in images])
    finally:
        model.train(was_training)
    return [{k: v.detach().cpu() for k, v in o.items()} for o in out]


def _xywh(boxes: Tensor) -> list[list[float]]:
    b = boxes.double()
    return torch.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], dim=1).tolist()


def coco_eval(gt: dict, dets: list[dict], num_classes: int) -> dict:
    """COCOeval bbox metrics of in-memory ground truth and detections; -1 (no ground truth) becomes nan."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    nan = float("nan")
    has_gt = {a["category_id"] for a in gt["annotations"]}
    if not dets or not gt["annotations"]:
        zero = 0.0 if gt["annotations"] else nan
        return {"map": zero, "map50": zero, "map75": zero,
                "per_class": {k: (0.0 if k in has_gt else nan) for k in range(1, num_classes + 1)}}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dets)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stat = lambda v: float(v) if v >= 0 else nan  # noqa: E731
    precision = ev.eval["precision"][:, :, :, 0, -1]  # IoU x recall x class, area "all", 100 detections
    per_class = {}
    for k, cat in enumerate(ev.params.catIds):
        p = precision[:, :, k]
        per_class[cat] = float(p[p > -1].mean()) if (p > -1).any() else nan
    return {"map": stat(ev.stats[0]), "map50": stat(ev.stats[1]), "map75": stat(ev.stats[2]), "per_class": per_class}


def _gathered(items: list) -> list:
    """Every rank's items, in rank order (the items themselves when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return items
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, items)
    return [item for part in everyone for item in part]


@torch.no_grad()
def evaluate_detection(model: nn.Module, loader, class_names: list[str], device=None,
                       max_images: int | None = None) -> dict:
    """COCO mAP (IoU .50:.95), mAP50, mAP75 as fractions and AP per class (nan for a class without ground
    truth in the evaluated images), via pycocotools on ground truth built in memory from the loader.
    device: move the model there first (None: run where the model is); the train/eval mode is restored.
    Under torch.distributed every rank evaluates its shard and the metrics cover all of them."""
    if device is not None:
        model.to(device)
    seen: list[tuple[tuple[int, int], dict, dict]] = []  # ((height, width), target, prediction) per image
    for images, targets in loader:
        if max_images is not None:
            images, targets = images[:max_images - len(seen)], targets[:max_images - len(seen)]
        for image_, target, pred in zip(images, targets, predict_detections(model, images), strict=True):
            seen.append(((int(image_.shape[-2]), int(image_.shape[-1])), target, pred))
        if max_images is not None and len(seen) >= max_images:
            break
    gt = {"images": [], "annotations": [], "categories": [{"id": i + 1, "name": n} for i, n in
                                                          enumerate(class_names)]}
    dets: list[dict] = []
    for n, ((height, width), target, pred) in enumerate(_gathered(seen), 1):
        gt["images"].append({"id": n, "width": width, "height": height})
        for box, label in zip(_xywh(target["boxes"]), target["labels"].tolist(), strict=True):
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": n, "category_id": int(label),
                                      "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
        for box, score, label in zip(_xywh(pred["boxes"]), pred["scores"].tolist(), pred["labels"].tolist(),
                                     strict=True):
            dets.append({"image_id": n, "category_id": int(label), "bbox": box, "score": float(score)})
    result = coco_eval(gt, dets, len(class_names))
    result["per_class"] = {name: result["per_class"][i + 1] for i, name in enumerate(class_names)}
    result["num_images"] = len(gt["images"])
    return result


@torch.no_grad()
def plot_detections(model: nn.Module, dataset: Dataset, class_names: list[str], path: str | os.PathLike,
                    n: int = 8, score_thresh: float = 0.3) -> Path:
    """A PNG grid of the first n images: ground truth (green, dashed) and predictions with scores (red)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    items = [dataset[i] for i in range(min(n, len(dataset)))]
    preds = predict_detections(model, [im for im, _ in items]) if items else []
    cols = max(1, min(4, len(items)))
    rows = max(1, math.ceil(len(items) / cols))
    fig = Figure(figsize=(3 * cols, 3 * rows + 0.4))
    FigureCanvasAgg(fig)
    name = lambda label: class_names[label - 1] if 0 < label <= len(class_names) else str(label)  # noqa: E731
    for k, ((pixels, target), pred) in enumerate(zip(items, preds, strict=True)):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.imshow(pixels.permute(1, 2, 0).clamp(0, 1).numpy())
        ax.set_axis_off()
        ax.set_title(f"image {target['image_id']}", fontsize=8)
        for (x0, y0, x1, y1), label in zip(target["boxes"].tolist(), target["labels"].tolist(), strict=True):
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="lime", linestyle="--", lw=1))
            ax.text(x0, y1, name(label), color="lime", fontsize=6, va="top")
        for (x0, y0, x1, y1), label, score in zip(pred["boxes"].tolist(), pred["labels"].tolist(),
                                                  pred["scores"].tolist(), strict=True):
            if score >= score_thresh:
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="red", lw=1))
                ax.text(x0, y0, f"{name(label)} {score:.2f}", color="red", fontsize=6, va="bottom")
    fig.suptitle(f"green dashed: ground truth, red: predicted (score >= {score_thresh})", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


# ---- the task interface (vislora/tasks/__init__.py) -----------------------------------------------
NAME = "detection"
SCORE = "val_map"  # the validation metric that picks the best epoch (higher is better)
EXPORT = {"torchscript": "script", "input": "list",
          "onnx": "ONNX export of torchvision detectors is not supported (list-of-images input, post-processing "
                  "with data-dependent shapes): use --format torchscript",
          "served": "an exported detector is not evaluated or run from its file by vislora: use the run directory "
                    "(vislora eval RUN, vislora predict RUN IMAGE...)"}


def detector_config(recipe: dict) -> dict:
    """The recipe's detector section without unset (None) fields, so each head keeps torchvision's defaults."""
    return {k: v for k, v in recipe["detector"].items() if v is not None}


def augment_config(augment: dict) -> dict:
    """The recipe's data.augment (scale, hflip, color_jitter; None = the detection default) as train_transform's."""
    given = {"hflip": augment.get("hflip"), "scale": augment.get("scale"), "color": augment.get("color_jitter")}
    return {k: v for k, v in given.items() if v is not None}


def build_model(recipe: dict, classes: Sequence[str]) -> nn.Module:
    """The recipe's detector for these classes (seeded: the same neck and head every time the run is rebuilt)."""
    return seeded(recipe, lambda: build_detector(recipe["model"], detector_config(recipe), len(classes)))


def adapt(model: nn.Module, recipe: dict) -> nn.Module:
    """LoRA in the backbone with neck and head trained; linear_probe: neck and head only; null: everything."""
    if recipe["adapter"] == "linear_probe":
        set_trainable(model, detection_train_modules(model))
        return model
    return adapt_detector(model, lora_config(recipe))


def build(recipe: dict) -> Setup:
    d, det = recipe["data"], recipe["detector"]
    train_set, val_set, names = build_detection_datasets(d, det["min_size"], augment_config(d["augment"]))
    model = build_model(recipe, names)
    pre = {"input_size": [3, det["min_size"], det["min_size"]], "class_names": names, "task": "detection"}
    return Setup(model, train_set, val_set, detection_collate, names, pre)


def loss(model: nn.Module, batch, device: torch.device, recipe: dict) -> tuple[Tensor, dict, int]:
    images, targets = batch
    value, logs = detection_loss(model, images, targets)
    return value, logs, len(images)


def validate(model: nn.Module, loader, device: torch.device, amp_dtype, world: int) -> dict:
    report = evaluate_detection(model, loader, loader.dataset.class_names, device=device)
    return {"val_map": report["map"], "val_map50": report["map50"]}


def health(row: dict, num_classes: int) -> str | None:
    return None


def preview(batch, preprocess: dict, classes: list[str]) -> list[tuple[np.ndarray, str]]:
    """A training batch as the detector gets it (augmented), its boxes drawn, captioned with their classes."""
    images, targets = batch
    tiles = []
    for x, target in zip(images, targets, strict=True):
        rgb = (x.permute(1, 2, 0).numpy() * 255).clip(0, 255).astype(np.uint8)
        for box in target["boxes"].round().int().tolist():
            draw_box(rgb, box)
        names = sorted({classes[int(k) - 1] for k in target["labels"]})
        tiles.append((rgb, f"{len(target['boxes'])} boxes: {', '.join(names)[:40]}"))
    return tiles


def draw_box(rgb: np.ndarray, box: Sequence[int], colour=(255, 0, 0)) -> None:
    """Draw a 1-pixel xyxy rectangle into an HxWx3 image, in place (clipped to the image)."""
    h, w = rgb.shape[:2]
    x0, y0, x1, y1 = (max(0, min(v, limit - 1)) for v, limit in zip(box, (w, h, w, h), strict=True))
    rgb[y0, x0:x1 + 1] = rgb[y1, x0:x1 + 1] = colour
    rgb[y0:y1 + 1, x0] = rgb[y0:y1 + 1, x1] = colour


def predictor(model: nn.Module) -> nn.Module:
    """A detector is run as itself: a list of CHW float images in [0, 1] -> boxes, scores, labels per image."""
    return model.eval()


def example_inputs(recipe: dict, preprocess: dict) -> None:
    return None  # random images of the input size: the detector resizes whatever it gets


def predict(predictor: nn.Module, preprocess: dict, image_paths: Sequence[str | os.PathLike], topk: int = 5,
            out_dir: str | os.PathLike | None = None, score_thresh: float = 0.3) -> list[dict]:
    """Up to topk boxes per image (xyxy pixels of the upright image) scoring at least score_thresh; an unreadable
    image gets {"path", "error"}. Nothing is written (out_dir: the interface's place for files)."""
    names = preprocess["class_names"]
    results = []
    for path, pixels, error in image.read_each(image_paths):
        if error:
            results.append({"path": path, "error": error})
            continue
        tensor = torch.from_numpy(pixels).permute(2, 0, 1).float().div_(255)
        pred = predict_detections(predictor, [tensor])[0]
        keep = [i for i in range(len(pred["scores"])) if pred["scores"][i] >= score_thresh][:topk]
        results.append({"path": str(path), "boxes": [
            {"label": names[int(pred["labels"][i]) - 1], "score": float(pred["scores"][i]),
             "box": [round(float(v), 1) for v in pred["boxes"][i]]} for i in keep]})
    return results


def format_prediction(result: dict) -> str:
    boxes = [f"{b['label']} {b['score']:.2f} {b['box']}" for b in result["boxes"]]
    return f"{result['path']}: " + ("; ".join(boxes) if boxes else "no box")


def _eval_data(recipe: dict, data: str | os.PathLike | None) -> dict:
    """The data section to evaluate: the run's own, or --data as a YOLO folder (its val split)."""
    if data is None:
        return recipe["data"]
    root = Path(data)
    if not (root / "data.yaml").is_file():
        raise ValueError(f"--data {root}: a detection run evaluates a YOLO folder (ROOT/data.yaml with the class "
                         "names); for COCO data, set data.val_ann in a recipe")
    return {**recipe["data"], "format": "yolo", "path": str(root)}


def evaluate(predictor: nn.Module, preprocess: dict, recipe: dict | None, data, out: Path, batch_size: int,
             workers: int = 2, run_dir: Path | None = None) -> dict:
    """COCO mAP of the run's detector on its val split (or --data, a YOLO folder); draws OUT_boxes.png beside OUT."""
    _, val_set, names = build_detection_datasets(_eval_data(recipe, data), recipe["detector"]["min_size"])
    if names != preprocess["class_names"]:
        raise ValueError(f"the classes of {data} differ from the run's: {names} vs {preprocess['class_names']}")
    loader = torch.utils.data.DataLoader(val_set, batch_size, num_workers=workers, collate_fn=detection_collate)
    report = evaluate_detection(predictor, loader, names)
    plot_detections(predictor, val_set, names, out.with_name(out.stem + "_boxes.png"))
    return report


def format_report(report: dict) -> str:
    lines = [f"mAP@[.5:.95] {report['map']:.4f}  mAP@.5 {report['map50']:.4f}  mAP@.75 {report['map75']:.4f}"]
    lines += [f"  {name:<20} AP {ap:.4f}" for name, ap in report["per_class"].items()]
    return "\n".join(lines)
