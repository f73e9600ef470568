"""The timm backbone every task builds on: the one timm constructor, the one checkpoint reader, the
body of a dense task (features_only CNN or plain ViT), its feature maps, the FPN width, and how a
backbone is adapted.

Detection and segmentation share all of it: `Features` turns a CNN (NCHW or NHWC) or a plain ViT
(its last token map, optionally through ViTDet's simple pyramid) into a list of maps; their models
subclass it, so the timm model always sits at `<prefix>.body` and `inject(model, cfg, within=...)`
adapts only the backbone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import timm
import torch.nn as nn
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from vislora import hub
from vislora.config import LoraConfig
from vislora.errors import VisloraError
from vislora.inject import freeze_bn_stats, inject, set_trainable
from vislora.targets import classifier_names
from vislora.tasks.common import card_pretrained_cfg

log = logging.getLogger(__name__)

TINY_BACKBONE = 10_000_000  # backbones with fewer parameters get a 64-channel FPN, larger ones 256


# ---- timm models and checkpoints -----------------------------------------------------------------
def similar_models(name: str) -> str:
    """'; did you mean ...?' with the timm architectures closest to a mistyped name (difflib), or a
    hint."""
    close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=3, cutoff=0.6)
    if close:
        return f"; did you mean {' or '.join(repr(c) for c in close)}?"
    return f" (timm.list_models('*{name[:6]}*') lists similar names)"


def check_name(model_cfg: dict) -> str:
    """model.name, refused with the closest timm names when timm does not know it."""
    name = model_cfg.get("name")
    if not name:
        raise VisloraError("model.name is not set (a timm model name)")
    if not timm.is_model(name):
        raise VisloraError(f"model.name '{name}' is not a timm model{similar_models(name)}")
    return name


def drop_path(model_cfg: dict) -> dict:
    """model.drop_path as timm's drop_path_rate argument ({} when None: the model's default)."""
    rate = model_cfg.get("drop_path")
    return {} if rate is None else {"drop_path_rate": float(rate)}


def create_timm(model_cfg: dict, defaults: dict | None = None, pretrained: bool | None = None,
                **kwargs) -> nn.Module:
    """timm.create_model(model.name, pretrained, **defaults, **model.kwargs, **kwargs), the errors a
    user can fix named by recipe key: an unknown name, kwargs that clash with vislora's or do not
    fit, hub weights offline. pretrained: None = model.pretrained; kwargs: what vislora sets and
    model.kwargs must not."""
    name, given = check_name(model_cfg), dict(model_cfg.get("kwargs") or {})
    clash = sorted(set(given) & set(kwargs))
    if clash:
        raise VisloraError(f"model.kwargs must not set {clash}: vislora sets {'them' if len(clash) > 1 else 'it'} "
                           "(num_classes comes from the class names)")
    pretrained = bool(model_cfg.get("pretrained")) if pretrained is None else pretrained
    if pretrained and "pretrained_cfg_overlay" not in kwargs:
        hub.check_pretrained(model_cfg)
    try:
        return timm.create_model(name, pretrained=pretrained, **{**(defaults or {}), **drop_path(model_cfg), **given},
                                 **kwargs)
    except TypeError as e:
        raise VisloraError(f"model.kwargs {given} do not fit timm model '{name}': {e}") from e
    except OSError as e:  # huggingface_hub's download, offline and cache errors are OSErrors
        if not pretrained:
            raise
        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise VisloraError(f"model.pretrained: true: timm could not get the weights of '{name}' "
                           f"({type(e).__name__}: {why}). Offline, {hub.OFFLINE_OPTIONS}") from None


def read_checkpoint(path: str | os.PathLike, what: str = "model.checkpoint") -> dict[str, Tensor]:
    """The tensors of a timm weights file (`what`: the recipe field or argument that named it), a
    .safetensors file (pickles are never read: they run code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    if path.suffix != ".safetensors":
        raise VisloraError(f"{what} {path} must be a .safetensors file (pickled checkpoints are not read)")
    return load_file(str(path))


def load_weights(model: nn.Module, path: str | os.PathLike, skip: Sequence[str] = ()) -> set[str]:
    """Load model.checkpoint into `model`; returns the keys loaded. Keys under the modules `skip` (a
    classifier the run replaces) are dropped; any other missing, unknown or mis-shaped key is an
    error that names it."""
    skipped = lambda k: any(k.startswith(s + ".") for s in skip)  # noqa: E731
    own = model.state_dict()
    state = {k: v for k, v in read_checkpoint(path).items() if not skipped(k)}
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and own[k].shape != v.shape]
    unknown = [k for k in state if k not in own]
    missing = [k for k in own if k not in state and not skipped(k)]
    if wrong or unknown or missing:
        raise VisloraError(f"{path} does not fit {type(model).__name__}: missing {missing[:5]}, "
                           f"unknown {unknown[:5]}, shape mismatch {wrong[:5]}")
    model.load_state_dict(state, strict=False)
    return set(state)


def check_backbone_keys(full: nn.Module, state: dict[str, Tensor], path, name: str) -> None:
    """Missing backbone keys are an error (they would stay random); unexpected ones are reported,
    heads ignored."""
    heads = classifier_names(full)
    is_head = lambda k: any(k.startswith(h + ".") for h in heads)  # noqa: E731
    expected = {k for k in full.state_dict() if not is_head(k)}
    given = {k for k in state if not is_head(k)}
    missing = sorted(k for k in expected - given if not k.endswith("num_batches_tracked"))  # a counter
    unexpected = sorted(given - expected)
    if missing:
        extra = f"; {len(unexpected)} unexpected, e.g. {unexpected[:5]}" if unexpected else ""
        raise VisloraError(f"checkpoint {path} does not fit timm model '{name}': {len(missing)} backbone key(s) "
                           f"missing, e.g. {missing[:5]}{extra}")
    if unexpected:
        log.warning("checkpoint %s: %d key(s) unknown to timm model '%s' are ignored, e.g. %s", path,
                    len(unexpected), name, unexpected[:5])


@contextlib.contextmanager
def _quiet_unexpected_keys(source: str):
    """timm warns about the weights' head keys (e.g. conv_head) that a features_only body does not
    hold; they are expected (a checkpoint was already checked against the full model), so say it
    once at INFO level instead."""
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


# ---- the body of a dense task --------------------------------------------------------------------
def is_plain_vit(model: nn.Module) -> bool:
    """A ViT whose blocks keep one token grid (timm's VisionTransformer, EVA, DeiT, BEiT ...): it
    gets ViTDet's simple pyramid from its last tokens. Hierarchical ViTs (Swin) go through
    features_only like CNNs."""
    return (isinstance(model, VisionTransformer) or
            all(hasattr(model, a) for a in ("patch_embed", "num_prefix_tokens", "blocks", "forward_features")))


def _body_kwargs(vit: bool, patch: tuple[int, ...], out_indices: Sequence[int] | None) -> tuple[dict, dict]:
    """(defaults model.kwargs may override, what vislora sets) for a plain ViT (any input size; a
    patch that does not divide torchvision's padding to 32 pads inside timm) or a features_only
    CNN."""
    if vit:
        return {"dynamic_img_size": True, **({"dynamic_img_pad": True} if any(32 % p for p in patch) else {})}, \
            {"num_classes": 0}
    return {}, {"features_only": True, "out_indices": tuple(out_indices or (-3, -2, -1))}


def create_body(model_cfg: dict, out_indices: Sequence[int] | None = None) -> nn.Module:
    """The timm model: features_only for CNNs and hierarchical ViTs, the plain ViT (no classifier)
    otherwise. A checkpoint is checked against the full timm model, then loaded by timm (which
    adapts e.g. pos_embed)."""
    name, checkpoint = check_name(model_cfg), model_cfg.get("checkpoint")
    probe = create_timm(model_cfg, pretrained=False)
    vit = is_plain_vit(probe)
    patch = tuple(int(p) for p in probe.patch_embed.patch_size) if vit else ()
    load: dict = {}
    if checkpoint:
        state = read_checkpoint(checkpoint)
        check_backbone_keys(probe, state, checkpoint, name)
        load = {"pretrained": True, "pretrained_cfg_overlay": {"state_dict": state, "source": ""}}
    del probe
    defaults, forced = _body_kwargs(vit, patch, out_indices)
    try:
        with _quiet_unexpected_keys(f"checkpoint {checkpoint}" if checkpoint else f"pretrained weights of {name}"):
            body = create_timm(model_cfg, defaults, **load, **forced)
    except RuntimeError as e:  # e.g. a shape mismatch that timm's checkpoint filter cannot adapt
        if checkpoint:
            raise VisloraError(f"checkpoint {checkpoint} cannot be loaded into '{name}': {e}") from e
        raise
    cfg = {k: v for k, v in (getattr(body, "pretrained_cfg", None) or {}).items() if k != "state_dict"}
    body.pretrained_cfg = {**cfg, **(card_pretrained_cfg(checkpoint) if checkpoint else {})}  # a card's preprocessing
    _fix_first_conv(body)
    return body


def _fix_first_conv(body: nn.Module) -> None:
    """features_only may flatten `stem.0` to `stem_0`: point pretrained_cfg['first_conv'] at the
    real name, so that inject() keeps leaving the stem alone."""
    first = body.pretrained_cfg.get("first_conv")
    modules = dict(body.named_modules())
    if isinstance(first, str) and first not in modules and first.replace(".", "_", 1) in modules:
        body.pretrained_cfg = {**body.pretrained_cfg, "first_conv": first.replace(".", "_", 1)}


def body_channels(body: nn.Module, pyramid: bool) -> list[int]:
    """The channels of each map Features gives: a CNN's feature_info, a ViT's width once (or thrice:
    pyramid)."""
    if is_plain_vit(body):
        return [body.embed_dim] * (3 if pyramid else 1)
    return list(body.feature_info.channels())


def body_strides(body: nn.Module) -> list[int]:
    """The nominal stride of each map Features gives with a pyramid (a ViT: patch/2, patch, 2
    patch)."""
    if is_plain_vit(body):
        patch = int(body.patch_embed.patch_size[0])
        return [max(1, patch // 2), patch, patch * 2]
    return [int(r) for r in body.feature_info.reduction()]


def fpn_width(body: nn.Module, channels: int | None) -> int:
    """The FPN's channels: the recipe's, else 64 for a backbone under TINY_BACKBONE parameters and
    256 above."""
    return int(channels or (64 if sum(p.numel() for p in body.parameters()) < TINY_BACKBONE else 256))


class SimplePyramid(nn.Module):
    """ViTDet's simple feature pyramid: the stride-p token map to strides p/2 (deconv), p, 2p
    (max-pool)."""

    def __init__(self, channels: int):
        super().__init__()
        self.levels = nn.ModuleList([nn.ConvTranspose2d(channels, channels, 2, stride=2), nn.Identity(),
                                     nn.MaxPool2d(2)])

    def forward(self, x: Tensor) -> list[Tensor]:
        out: list[Tensor] = []
        for level in self.levels:
            out.append(level(x))
        return out


def token_map(tokens: Tensor, x: Tensor, patch_h: int, patch_w: int, prefix_tokens: int) -> Tensor:
    """A plain ViT's output tokens for the images x as an N x C x H/patch x W/patch map (prefix
    tokens dropped)."""
    gh = (x.shape[-2] + patch_h - 1) // patch_h
    gw = (x.shape[-1] + patch_w - 1) // patch_w
    tokens = tokens[:, prefix_tokens:]
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], gh, gw)


class Features(nn.Module):
    """A timm `body` as a list of NCHW maps: a features_only CNN's stages (NHWC ones permuted,
    Swin), or a plain ViT's last token map, through ViTDet's simple `pyramid` when one is given.
    Task models subclass it."""

    def __init__(self, body: nn.Module, pyramid: SimplePyramid | None = None):
        super().__init__()
        self.body = body
        if pyramid is not None:
            self.pyramid = pyramid
        self.channels_last = str(getattr(body, "output_fmt", "NCHW")).endswith("NHWC")
        if is_plain_vit(body):  # hasattr(self, "patch_h") picks the branch, TorchScript included
            self.patch_h, self.patch_w = (int(p) for p in body.patch_embed.patch_size)
            self.prefix_tokens = int(body.num_prefix_tokens)

    def features(self, x: Tensor) -> list[Tensor]:
        if hasattr(self, "patch_h"):
            fmap = token_map(self.body.forward_features(x), x, self.patch_h, self.patch_w, self.prefix_tokens)
            if hasattr(self, "pyramid"):
                return self.pyramid(fmap)
            return [fmap]
        out: list[Tensor] = []
        for f in self.body(x):
            out.append(f.permute(0, 3, 1, 2) if self.channels_last else f)
        return out


# ---- what trains ---------------------------------------------------------------------------------
def adapt_backbone(model: nn.Module, lora: LoraConfig | None, within: str, train: Sequence[str],
                   probe: bool = False) -> nn.Module:
    """LoRA inside the backbone at `within`, the `train` modules (neck, head) trained fully; entries
    of lora.train other than "head" (the timm classifier) train too. None: full fine-tuning; probe:
    the `train` modules alone. Backbone BatchNorm keeps its pretrained statistics in every mode."""
    train = list(train)
    if probe:
        set_trainable(model, train)
        return model
    if lora is None:
        model.requires_grad_(True)
        freeze_bn_stats(model.get_submodule(within))
        return model
    train += [t for t in lora.train if t != "head" and t not in train]
    return inject(model, dataclasses.replace(lora, train=train), within=within)
