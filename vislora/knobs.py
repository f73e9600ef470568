"""The training knobs a timm user expects, each from timm or torch itself (issue #27): the optimizer
by timm name with layer-wise lr decay (timm.optim) beside the head and LoRA+ groups, its warm-up +
cosine schedule, the EMA of the trained weights (timm's ModelEmaV3), Mixup / CutMix
(timm.data.Mixup), gradient checkpointing, channels_last and torch.compile; and the device and
autocast precision. vislora.train calls these; the recipe fields are checked in vislora.recipe.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn
from timm.data import Mixup
from timm.data.mixup import mixup_target
from timm.optim import create_optimizer_v2, list_optimizers, param_groups_layer_decay
from timm.utils import ModelEmaV3

from vislora.errors import VisloraError
from vislora.targets import classifier_names, lora_layers

logger = logging.getLogger(__name__)


# ---- device and precision: train.device, train.amp -----------------------------------------------
def resolve_device(name: str) -> torch.device:
    """train.device: auto (CUDA if present, else CPU), cpu, cuda, cuda:N or mps; one that is missing
    is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise VisloraError(f"train.device={name!r} is not a device: use auto, cpu, cuda, cuda:N or mps") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, False):
        have = ", ".join(k for k, ok in available.items() if ok)
        raise VisloraError(f"train.device={name!r} is not available on this machine (available: {have})")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise VisloraError(f"train.device={name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPUs that support it ('auto'), fp16 or bf16 on request, none on CPU by
    default."""
    if amp == "none" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "fp16":
        return torch.float16
    if amp in ("bf16", "auto"):
        return torch.bfloat16 if device.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float16
    raise VisloraError(f"train.amp must be auto, bf16, fp16 or none, not {amp!r}")


# ---- parameter groups, the optimizer and its schedule --------------------------------------------
def param_groups(model: nn.Module, weight_decay: float, head: set[int] = frozenset(),
                 fast: set[int] = frozenset(), fast_scale: float = 1.0, layer: dict[int, float] | None = None
                 ) -> list[dict]:
    """Only requires_grad parameters; no decay on biases, norm weights and DoRA magnitudes (1-d),
    decay on LoRA factors. The parameters whose id is in `head` (the new classifier) get groups of
    their own, flagged "head"; those in `fast` (LoRA+'s B factors) a group at `fast_scale` x the lr;
    `layer` maps ids to a layer-decay scale (layer_scales). "lr_scale" is the product of both."""
    layer = layer or {}
    groups: dict[tuple[bool, bool, bool, float], list] = {}
    for _, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((id(p) in head, p.ndim > 1, id(p) in fast, layer.get(id(p), 1.0)), []).append(p)
    order = sorted(groups, key=lambda k: (k[0], not k[1], k[2], -k[3]))
    return [{"params": groups[key], "weight_decay": weight_decay if key[1] else 0.0, "head": key[0],
             "layer_scale": key[3], "lr_scale": (fast_scale if key[2] else 1.0) * key[3]} for key in order]


def lora_plus_ids(model: nn.Module) -> set[int]:
    """LoRA+ (Hayou et al. 2024): the adapters' B factors, which it trains at a higher lr than A.
    Only those: not the head, norms or DoRA magnitudes (PEFT's helper puts every 1-d parameter in
    the fast group)."""
    return {id(p) for _, layer in lora_layers(model) for p in layer.update.factor_roles()["B"] if p.requires_grad}


def head_parameter_ids(model: nn.Module) -> set[int]:
    """The trainable parameters of the model's classifier (timm's get_classifier(), through wrappers
    such as PEFT's); empty for models without one (detectors, segmenters)."""
    return {id(p) for name in classifier_names(model) for p in model.get_submodule(name).parameters()
            if p.requires_grad}


def layer_scales(model: nn.Module, decay: float | None) -> dict[int, float]:
    """id(parameter) -> timm's layer-wise lr scale (param_groups_layer_decay, by the model's
    group_matcher): a LoRA factor inside blocks.N gets block N's scale, the head 1. {} without
    train.layer_decay."""
    if decay is None:
        return {}
    scales = {id(p): g["lr_scale"] for g in param_groups_layer_decay(model, 0.0, layer_decay=decay)
              for p in g["params"]}
    if len(set(scales.values())) < 2 and decay < 1:
        raise VisloraError(f"train.layer_decay={decay}: timm finds one depth for every trained parameter of "
                           f"{type(model).__name__} (no group_matcher), so it would change nothing; set it to null")
    return scales


def check_opt(name: str) -> str:
    """train.opt as timm names it; an unknown name is one line with the closest and a few common
    ones."""
    known = list_optimizers()
    if name.lower() in known:
        return name.lower()
    close = difflib.get_close_matches(name.lower(), known, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise VisloraError(f"train.opt={name!r} is not a timm optimizer ({hint}e.g. adamw, sgd, lion, lamb, adamp, "
                       f"lars; all {len(known)}: timm.optim.list_optimizers())")


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def staged(head: bool, step: int, total: int, head_steps: int, warmup: int, min_ratio: float,
           head_scale: float) -> float:
    """The lr factor of one parameter group. Head stage (LP-FT, Kumar et al. 2022), steps [0,
    head_steps): the head alone at head_scale x lr, its own warmup (at most half the stage) and
    cosine; the rest wait at 0. Then every group: warmup + cosine over the remaining steps.
    head_steps 0 is the plain warmup + cosine."""
    if step < head_steps:
        return head_scale * warmup_cosine(step, head_steps, min(warmup, head_steps // 2), 0.0) if head else 0.0
    return warmup_cosine(step - head_steps, total - head_steps, warmup, min_ratio)


def build_optimizer(model: nn.Module, t: dict, steps_per_epoch: int):
    """timm's train.opt (create_optimizer_v2; adamw = torch's AdamW) over the trainable parameters
    and its schedule (`staged`): train.head_epochs of the new classifier alone at train.head_lr
    first, when anything besides it trains (LoRA, full fine-tuning), then all of them; layer decay
    and LoRA+ scale each group's lr."""
    head = head_parameter_ids(model)
    ratio = t["lora_plus_ratio"]
    fast = lora_plus_ids(model) if ratio else set()
    if ratio and not fast:
        raise VisloraError(f"train.lora_plus_ratio={ratio}: {type(model).__name__} has no vislora adapter whose B "
                         "factors it could speed up; set it to null")
    groups = param_groups(model, t["weight_decay"], head, fast, ratio or 1.0, layer_scales(model, t["layer_decay"]))
    staging = t["head_epochs"] > 0 and any(not g["head"] for g in groups)
    if staging and not any(g["head"] for g in groups):
        raise VisloraError(f"train.head_epochs={t['head_epochs']}: {type(model).__name__} has no classifier to train "
                         "first; set train.head_epochs: 0")
    head_steps = round(t["head_epochs"] * steps_per_epoch) if staging else 0
    total = min(steps_per_epoch * t["epochs"], t["max_steps"] or math.inf)
    warmup, min_ratio = int(t["warmup_epochs"] * steps_per_epoch), t["min_lr"] / t["lr"] if t["lr"] else 0.0
    head_scale = t["head_lr"] / t["lr"] if t["lr"] else 0.0
    for group in groups:
        group["lr"] = t["lr"] * group["lr_scale"]
    optimizer = create_optimizer_v2(groups, opt=check_opt(t["opt"]), lr=t["lr"], weight_decay=t["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [
        functools.partial(staged, g["head"], total=total, head_steps=head_steps, warmup=warmup,
                          min_ratio=min_ratio, head_scale=head_scale) for g in groups])
    return optimizer, scheduler


# ---- EMA of the trained weights ------------------------------------------------------------------
class _Trained(nn.Module):
    """A model's trained tensors as a module of their own (parameters that require grad, floating
    buffers), so ModelEmaV3 copies and averages those alone, not the frozen base."""

    def __init__(self, model: nn.Module):
        super().__init__()
        params = [p for p in model.parameters() if p.requires_grad]
        for i, p in enumerate(params):
            self.register_parameter(f"p{i}", p)
        for i, b in enumerate(b for _, b in model.named_buffers() if b.is_floating_point()):
            self.register_buffer(f"b{i}", b)


class TrainedEma:
    """timm's ModelEmaV3 of the trained weights (adapters and head under LoRA): updated every
    optimizer step, evaluated each epoch by swapping it in (`applied`); its state goes in the
    checkpoint, so --resume is exact."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool):
        self.live = _Trained(model)
        self.ema = ModelEmaV3(self.live, decay=decay, use_warmup=warmup)
        self.ema.module.requires_grad_(False)

    def update(self, step: int) -> None:
        self.ema.update(self.live, step)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.ema.module.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.ema.module.load_state_dict(state)

    @contextlib.contextmanager
    @torch.no_grad()
    def applied(self) -> Iterator[None]:
        """The EMA weights in the model for the block (validation, saving the kept model), then the
        raw ones."""
        live = list(self.live.state_dict().values())
        raw = [t.clone() for t in live]
        for t, e in zip(live, self.ema.module.state_dict().values(), strict=True):
            t.copy_(e)
        try:
            yield
        finally:
            for t, r in zip(live, raw, strict=True):
                t.copy_(r)


def build_ema(model: nn.Module, ema: dict | None) -> TrainedEma | None:
    return TrainedEma(model, ema["decay"], ema["warmup"]) if ema else None


def ema_metrics(ema: TrainedEma, validate: Callable[[], dict]) -> dict:
    """validate() with the EMA weights in, its keys as val_ema_*."""
    with ema.applied():
        return {k.replace("val_", "val_ema_", 1): v for k, v in validate().items()}


def kept_score(row: dict, score: str) -> tuple[float, bool]:
    """The epoch's score and whether it is the EMA's: the better of the raw and the EMA weights."""
    raw, ema = row.get(score, math.nan), row.get(score.replace("val_", "val_ema_", 1), math.nan)
    use_ema = math.isfinite(ema) and (not math.isfinite(raw) or ema > raw)
    return (ema if use_ema else raw), use_ema


# ---- Mixup / CutMix ------------------------------------------------------------------------------
class BatchMix:
    """timm's Mixup / CutMix on a classification batch: (images, labels) -> (mixed images, soft
    targets), which the task's loss scores with SoftTargetCrossEntropy. Its draws are numpy's global
    ones, which the loop reseeds each epoch, so --resume replays them. An odd batch loses its last
    image (timm mixes pairs)."""

    def __init__(self, mixup: float, cutmix: float, num_classes: int, smoothing: float):
        self.mix = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=smoothing, num_classes=num_classes)
        self.num_classes, self.smoothing = num_classes, smoothing

    def __call__(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = batch
        even = len(labels) // 2 * 2
        if even == 0:
            return images, mixup_target(labels, self.num_classes, 1.0, self.smoothing)
        return self.mix(images[:even], labels[:even])


def build_mixup(recipe: dict, num_classes: int) -> BatchMix | None:
    a = recipe["data"]["augment"]
    if not (a.get("mixup") or a.get("cutmix")):
        return None
    return BatchMix(a["mixup"], a["cutmix"], num_classes, recipe["train"]["label_smoothing"])


# ---- memory and speed: gradient checkpointing, channels_last, torch.compile ----------------------
def to_channels_last(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: 4-d inputs as NHWC, the layout of channels_last weights."""
    return tuple(a.contiguous(memory_format=torch.channels_last) if isinstance(a, torch.Tensor) and a.ndim == 4
                 else a for a in args)


def prepare(model: nn.Module, t: dict) -> nn.Module:
    """train.grad_checkpointing (timm's set_grad_checkpointing on the outermost timm module that has
    it: the model, or a detector's backbone) and train.channels_last (weights and inputs NHWC)."""
    if t["grad_checkpointing"]:
        owner = next((m for m in model.modules() if hasattr(m, "set_grad_checkpointing")), None)
        try:
            if owner is None:
                raise NotImplementedError("no set_grad_checkpointing()")
            owner.set_grad_checkpointing(True)
        except (NotImplementedError, AssertionError) as e:
            raise VisloraError(f"train.grad_checkpointing: timm cannot checkpoint {type(model).__name__} ({e}); "
                               "set it to false") from None
    if t["channels_last"]:
        model.to(memory_format=torch.channels_last)
        model.register_forward_pre_hook(to_channels_last)
    return model


class Compiled(nn.Module):
    """The training forward through torch.compile, eager from the first failure on (one warning)
    where the platform cannot compile. The eager net is the only submodule: nothing compiled (no
    `_orig_mod.` key) is in a state_dict, and evaluation, saving and export use the eager model
    itself."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.__dict__["compiled"] = torch.compile(net)  # not registered: its state_dict would say _orig_mod.

    def forward(self, *args, **kwargs):
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - any compiler failure: the eager net raises real errors again
                reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                logger.warning("train.compile: torch.compile failed on this platform (%s: %s); training runs eager",
                               type(e).__name__, reason)
                self.__dict__["compiled"] = None
        return self.net(*args, **kwargs)
