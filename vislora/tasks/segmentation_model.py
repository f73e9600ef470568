"""The segmenter: a light decoder (torchvision's FPN with every level convolved and summed, or
DeepLabV3's head) on the timm backbone (tasks/backbone.py); logits are upsampled (bilinear) to the
input size, so the model maps an NCHW batch to N x C x H x W logits and traces and exports to ONNX
like a classifier."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from torchvision.ops import FeaturePyramidNetwork

from vislora.config import LoraConfig
from vislora.errors import VisloraError
from vislora.tasks.backbone import (
    Features,
    SimplePyramid,
    adapt_backbone,
    body_channels,
    create_body,
    fpn_width,
    is_plain_vit,
)

HEADS = ("fpn", "deeplabv3")
SEGMENTER_KEYS = {"head", "img_size", "out_indices", "channels", "output_stride", "atrous_rates"}


class FpnDecoder(nn.Module):
    """torchvision's FPN over the feature maps, each level through a 3x3 conv (GroupNorm, ReLU),
    upsampled to the finest level and summed, then a 1x1 classifier: Panoptic FPN's semantic branch,
    one conv per level."""

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int):
        super().__init__()
        self.fpn = FeaturePyramidNetwork(list(in_channels), channels)
        self.levels = nn.ModuleList([
            nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                          nn.GroupNorm(math.gcd(32, channels), channels), nn.ReLU(inplace=True))
            for _ in in_channels])
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: list[Tensor]) -> Tensor:
        maps = list(self.fpn({str(i): f for i, f in enumerate(feats)}).values())
        out = self.levels[0](maps[0])
        for level, m in zip(self.levels[1:], maps[1:], strict=True):
            out = out + F.interpolate(level(m), size=out.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(out)


class DeepLabDecoder(nn.Module):
    """torchvision's DeepLabV3 head (ASPP, 3x3 conv, classifier) on the last feature map."""

    def __init__(self, in_channels: int, num_classes: int, atrous_rates: Sequence[int]):
        super().__init__()
        self.head = DeepLabHead(in_channels, num_classes, tuple(int(r) for r in atrous_rates))

    def forward(self, feats: list[Tensor]) -> Tensor:
        return self.head(feats[-1])


class Segmenter(Features):
    """A timm `body` (features_only CNN or plain ViT), a ViT's optional simple `pyramid`, a
    `decoder`; NCHW images -> N x num_classes x H x W logits."""

    def __init__(self, body: nn.Module, decoder: nn.Module, pyramid: SimplePyramid | None = None):
        super().__init__(body, pyramid)
        self.decoder = decoder

    def forward(self, x: Tensor) -> Tensor:
        logits = self.decoder(self.features(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def build_segmenter(model_cfg: dict, segmenter_cfg: dict, num_classes: int) -> Segmenter:
    """The recipe's timm backbone (detection's create_body: checkpoint checked, stem named) under
    the chosen head. segmenter_cfg: the recipe's `segmenter` section (see vislora/defaults.py for
    every key's meaning)."""
    unknown = sorted(set(segmenter_cfg) - SEGMENTER_KEYS)
    if unknown:
        raise VisloraError(f"unknown segmenter key(s) {unknown}; known: {sorted(SEGMENTER_KEYS)}")
    head = segmenter_cfg.get("head") or "fpn"
    if head not in HEADS:
        raise VisloraError(f"segmenter.head '{head}' is not one of {HEADS}")
    if num_classes < 2:
        raise VisloraError(f"segmentation needs at least 2 classes (background and one more), got {num_classes}")
    cfg = dict(model_cfg)
    if segmenter_cfg.get("output_stride"):
        cfg["kwargs"] = {**(model_cfg.get("kwargs") or {}), "output_stride": int(segmenter_cfg["output_stride"])}
    indices = segmenter_cfg.get("out_indices") or ((-4, -3, -2, -1) if head == "fpn" else (-1,))
    body = create_body(cfg, indices)
    pyramid = SimplePyramid(body.embed_dim) if is_plain_vit(body) and head == "fpn" else None
    in_channels = body_channels(body, pyramid is not None)
    if head == "fpn":
        decoder: nn.Module = FpnDecoder(in_channels, fpn_width(body, segmenter_cfg.get("channels")), num_classes)
    else:
        decoder = DeepLabDecoder(in_channels[-1], num_classes, segmenter_cfg.get("atrous_rates") or (12, 24, 36))
    return Segmenter(body, decoder, pyramid)


def segmenter_train_modules(model: Segmenter) -> list[str]:
    """The modules trained fully next to a backbone adapter: the decoder (and a ViT's pyramid)."""
    return ["decoder"] + (["pyramid"] if hasattr(model, "pyramid") else [])


def adapt_segmenter(model: Segmenter, lora: LoraConfig | None, probe: bool = False) -> Segmenter:
    """LoRA inside `body` with the decoder trained; None: full fine-tuning; probe: the decoder
    alone."""
    return adapt_backbone(model, lora, "body", segmenter_train_modules(model), probe)

