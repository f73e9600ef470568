"""The detector: torchvision FCOS / RetinaNet / Faster R-CNN over an FPN on the timm backbone
(tasks/backbone.py).

The timm model sits at `backbone.body`, so `inject(detector, cfg, within="backbone.body")` adapts
only the backbone while the FPN and the head train fully. Anchors, heads, losses, resizing and box
post-processing are torchvision's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from vislora.errors import VisloraError
from vislora.tasks.backbone import (
    Features,
    SimplePyramid,
    body_channels,
    body_strides,
    create_body,
    fpn_width,
    is_plain_vit,
)

HEADS = ("fcos", "retinanet", "fasterrcnn")
DETECTOR_KEYS = {"head", "min_size", "max_size", "out_indices", "fpn_channels", "score_thresh", "nms_thresh",
                 "detections_per_img", "anchor_sizes", "representation_size"}


class FpnBackbone(Features):
    """The timm `body` (and a ViT's simple `pyramid`) under an `fpn`; returns the FPN maps by name,
    as torchvision's detectors expect."""

    def __init__(self, body: nn.Module, pyramid: SimplePyramid | None, fpn: FeaturePyramidNetwork,
                 out_channels: int):
        super().__init__(body, pyramid)
        self.fpn, self.out_channels = fpn, out_channels

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        feats: dict[str, Tensor] = {}
        for i, f in enumerate(self.features(x)):
            feats[str(i)] = f
        return self.fpn(feats)


def build_backbone(model_cfg: dict, out_indices: Sequence[int] | None, fpn_channels: int | None,
                   extra: str) -> tuple[FpnBackbone, list[int]]:
    """Body + FPN (extra = "p6p7" or "pool"); returns it and the nominal stride of every output
    map."""
    body = create_body(model_cfg, out_indices)
    channels = fpn_width(body, fpn_channels)
    blocks = LastLevelP6P7(channels, channels) if extra == "p6p7" else LastLevelMaxPool()
    pyramid = SimplePyramid(body.embed_dim) if is_plain_vit(body) else None
    fpn = FeaturePyramidNetwork(body_channels(body, pyramid is not None), channels, extra_blocks=blocks)
    strides = body_strides(body)
    strides += [strides[-1] * 2, strides[-1] * 4] if extra == "p6p7" else [strides[-1] * 2]
    return FpnBackbone(body, pyramid, fpn, channels), strides


def build_detector(model_cfg: dict, detector_cfg: dict, num_classes: int) -> nn.Module:
    """A torchvision detector (labels 1..num_classes, 0 = background) on a timm backbone at
    `backbone.body`.

    detector_cfg: head (fcos | retinanet | fasterrcnn), min_size, max_size, and optionally
    out_indices (CNN stages, default the last 3), fpn_channels (default 64 for backbones under 10M
    parameters, else 256), score_thresh (0.05), nms_thresh (torchvision's per head),
    detections_per_img (100), anchor_sizes (one base size per FPN level; default the stride for
    FCOS, 4x the stride otherwise), representation_size (Faster R-CNN box head, 1024).
"""
    unknown = sorted(set(detector_cfg) - DETECTOR_KEYS)
    if unknown:
        raise VisloraError(f"unknown detector key(s) {unknown}; known: {sorted(DETECTOR_KEYS)}")
    head = detector_cfg.get("head", "fcos")
    if head not in HEADS:
        raise VisloraError(f"detector head '{head}' is not one of {HEADS}")
    if num_classes < 1:
        raise VisloraError(f"num_classes must be at least 1, got {num_classes}")
    backbone, strides = build_backbone(model_cfg, detector_cfg.get("out_indices"), detector_cfg.get("fpn_channels"),
                                       "pool" if head == "fasterrcnn" else "p6p7")
    base = detector_cfg.get("anchor_sizes") or [s if head == "fcos" else 4 * s for s in strides]
    if len(base) != len(strides):
        raise VisloraError(f"anchor_sizes has {len(base)} entries but the FPN has {len(strides)} levels")
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



def detection_train_modules(detector: nn.Module) -> list[str]:
    """The modules trained fully next to a backbone adapter: the FPN (and ViT pyramid) and the
    head(s)."""
    names = ["backbone.fpn"] + (["backbone.pyramid"] if hasattr(detector.backbone, "pyramid") else [])
    if isinstance(detector, FasterRCNN):
        return names + ["rpn", "roi_heads"]
    if isinstance(detector, (FCOS, RetinaNet)):
        return names + ["head"]
    raise TypeError(f"{type(detector).__name__} is not a detector made by build_detector")

