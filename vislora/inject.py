"""Model-level LoRA: injection into the layers vislora.targets finds, trainable selection and frozen
BatchNorm, the exactness check, merge and unload. The config lives in vislora.config, the target
rules in vislora.targets."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn as nn
from timm.layers import BatchNormAct2d, use_reentrant_ckpt

from vislora.config import Adapter, LoraConfig
from vislora.errors import VisloraError
from vislora.layers import ADAPTABLE, DEFAULT, LoraLayer, adapter_exceeds_layer, dora_refusal
from vislora.targets import (
    PRESETS,
    classifier_names,
    find_targets,
    is_within,
    layer_rank,
    lora_layers,
    pattern_value,
    resolve_qkv_parts,
    resolve_train,
    resolve_train_params,
    stem_names,
    wrapped_layers,
)

log = logging.getLogger(__name__)


# ---- layers no preset adapts
# ---------------------------------------------------------------------- layers with weights that no
# preset adapts, because LoraLayer wraps ADAPTABLE only: type -> why
UNADAPTABLE = {
    nn.modules.conv._ConvNd: "only nn.Conv1d and nn.Conv2d are adapted, not 3-d or transposed convolutions",
    nn.Embedding: "embeddings are not adapted",
}


def unadaptable_layers(model: nn.Module, within: str | None = None) -> dict[str, str]:
    """Layers with weights (outside the stem and classifier) that no preset can adapt: name ->
    "Type: why"."""
    scope = model.get_submodule(within) if within else model
    prefix = within + "." if within else ""
    edges = stem_names(scope) + classifier_names(scope)
    found = {}
    for name, m in scope.named_modules():
        if isinstance(m, (*ADAPTABLE, LoraLayer)) or is_within(name, edges):
            continue
        why = next((w for t, w in UNADAPTABLE.items() if isinstance(m, t)), None)
        if why:
            found[prefix + name] = f"{type(m).__name__}: {why}"
    return found


def warn_unadaptable(model: nn.Module, config: LoraConfig, within: str | None = None) -> None:
    """One warning naming the layers a preset leaves because vislora cannot adapt them (never a
    silent skip)."""
    if not (isinstance(config.targets, str) and config.targets in PRESETS):
        return
    skipped = unadaptable_layers(model, within)
    if skipped:
        first, why = next(iter(skipped.items()))
        log.warning("preset '%s' leaves %d layer(s) that vislora cannot adapt, e.g. '%s' (%s)", config.targets,
                    len(skipped), first, why)



def replace_module(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put `module` at the dotted `name` (names as plain_modules gives them: through adapter
    wrappers) and wherever else the model holds the same module (a shared one stays shared); returns
    the module that was there."""
    parent, _, child = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    owner = owner.base_layer if isinstance(owner, LoraLayer) else owner
    old = owner._modules[child]
    for holder in [m.base_layer if isinstance(m, LoraLayer) else m for m in model.modules()]:
        for key, held in list(holder._modules.items()):
            if held is old and holder is not module:
                setattr(holder, key, module)
    return old



# ---- inject / trainable selection ----------------------------------------------------------------
def _eval_mode_hook(module: nn.Module, args) -> None:
    module.training = False  # frozen BatchNorm normalises with its running statistics, which never change


def frozen_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Batch norm with the running statistics as one per-channel multiply-add, y = x * scale +
    shift: the numbers of eval-mode batch_norm, with a backward that is a single multiply (several
    times cheaper on CPU)."""
    scale = (bn.running_var + bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return torch.addcmul(shift.to(x.dtype).view(shape), x, scale.to(x.dtype).view(shape))


class FrozenStatsBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that normalises with its running statistics in train mode too. freeze_bn_stats
    swaps a module's class to it in place (same parameters, buffers and state_dict); unload/eject
    swap it back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return frozen_batch_norm(self, x)


class FrozenStatsBatchNormAct2d(BatchNormAct2d):
    """timm's BatchNormAct2d (norm, dropout, activation: EfficientNet, MobileNet) with frozen
    statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(frozen_batch_norm(self, x)))


FROZEN_BN = {nn.BatchNorm2d: FrozenStatsBatchNorm2d, BatchNormAct2d: FrozenStatsBatchNormAct2d}


def freeze_bn_stats(model: nn.Module, keep: Sequence[str] = ()) -> None:
    """BatchNorm layers (except those inside `keep`) use their running statistics even in train
    mode.

    BatchNorm2d and timm's BatchNormAct2d become their FrozenStats classes (a multiply-add); other
    BatchNorm types (1d, 3d, subclasses, no running statistics) get a hook that keeps them in eval
    mode."""
    for name, m in model.named_modules():
        if not isinstance(m, nn.modules.batchnorm._BatchNorm) or is_within(name, keep):
            continue
        if type(m) in FROZEN_BN and m.track_running_stats:
            m.__class__ = FROZEN_BN[type(m)]
        elif type(m) not in FROZEN_BN.values() and not hasattr(m, "_vislora_bn_hook"):
            m._vislora_bn_hook = m.register_forward_pre_hook(_eval_mode_hook)


def _input_needs_grad_hook(model: nn.Module, args: tuple):
    """Reentrant gradient checkpointing (timm.layers.set_reentrant_ckpt(True)) gives no gradient to
    a segment whose inputs do not require grad, so frozen-base LoRA would train nothing: make the
    input require grad then (what PEFT's enable_input_require_grads does for embeddings).
    Non-reentrant checkpointing needs nothing."""
    if not (model.training and torch.is_grad_enabled() and args and torch.is_tensor(args[0])):
        return None
    if args[0].requires_grad or not use_reentrant_ckpt():
        return None
    if not any(getattr(m, "grad_checkpointing", False) for m in model.modules()):
        return None
    return (args[0].detach().requires_grad_(True), *args[1:])


def set_trainable(model: nn.Module, train_names: Sequence[str], train_params: Sequence[str] = ()) -> None:
    """Only adapters, the `train` modules and the `train_params` parameters require grad; BatchNorm
    outside the train modules keeps its eval statistics."""
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in lora_layers(model):
        for p in layer.adapter_parameters():
            p.requires_grad_(True)
    for name in train_names:
        model.get_submodule(name).requires_grad_(True)
    for name in train_params:
        model.get_parameter(name).requires_grad_(True)
    freeze_bn_stats(model, train_names)


def _plan(model: nn.Module, config: LoraConfig, within: str | None) -> list[tuple]:
    """(name, base layer, qkv parts, rank) of every layer the config adapts: everything checked
    before any change."""
    if config.use_dora and config.init == "pissa":
        raise VisloraError("init: pissa with use_dora: PiSSA moves the top singular part of W into the adapter, and "
                         "DoRA's magnitude is not an additive part; use one of them")
    plan = []
    for name in find_targets(model, config, within):
        module = model.get_submodule(name)
        module = module.base_layer if isinstance(module, LoraLayer) else module
        if config.use_dora and dora_refusal(module):
            raise VisloraError(f"use_dora: '{name}' ({type(module).__name__}) cannot carry DoRA: "
                             f"{dora_refusal(module)}; add it to adapter.exclude, or use plain LoRA")
        parts = resolve_qkv_parts(name, module, config.qkv)
        plan.append((name, module, parts, layer_rank(name, module, config, parts)))
    return plan


def inject_layers(model: nn.Module, config: LoraConfig, name: str = DEFAULT, within: str | None = None) -> None:
    """The adapter `name` on every layer the config targets: a new LoraLayer where none is, or an
    update beside the others where one is (several named adapters). Wrappers added here start at the
    model's active adapter."""
    active = getattr(model, "vislora_active", name)
    for target, module, parts, r in _plan(model, config, within):
        alpha = pattern_value(target, config.alpha_pattern, config.alpha)
        existing = model.get_submodule(target)
        if isinstance(existing, LoraLayer):
            existing.add_update(name, r, alpha, config.rslora, parts, use_dora=config.use_dora)
            continue
        layer = LoraLayer(module, r, alpha, config.dropout, config.rslora, qkv_parts=parts,
                          use_dora=config.use_dora, name=name)
        layer.train(module.training)
        layer.active = active
        if layer.carries_active and adapter_exceeds_layer(layer):  # a logged note: `vislora train` lists them
            log.info("adapter on '%s' has %d parameters, more than the layer itself (%d): lower r for it", target,
                     layer.adapter_numel(), layer.raw_weight().numel())
        replace_module(model, target, layer)


def inject(model: nn.Module, config: LoraConfig, verify: bool | None = None, within: str | None = None,
           name: str = DEFAULT) -> nn.Module:
    """Wrap every target layer of `model` in a LoraLayer, in place, and select the trainable
    parameters.

    within: search targets only in this submodule (e.g. a detector's timm backbone); its own
    pretrained_cfg names the stem and classifier that presets leave alone. `train` is resolved on
    the whole model. verify (default: on for models under 30M parameters) checks each layer once:
    with a random B, merged and unmerged outputs agree on a random input; a layer that fails is
    named in the error.
"""
    if any(True for _ in wrapped_layers(model)):
        raise VisloraError("model already carries vislora adapters: unload() it first, load_adapter() into it, or "
                         "add one beside it with vislora.add_adapter(model, config, name)")
    train_names = resolve_train(model, config.train)
    resolve_train_params(model, config.train, train_names)
    inject_layers(model, config, name, within)
    warn_unadaptable(model, config, within)
    model.vislora_config = config
    model.vislora_train = list(train_names)
    model.vislora_train_params = resolve_train_params(model, config.train, train_names)  # names after wrapping
    model.vislora_within = within
    model.vislora_active = name
    model.vislora_adapters = {name: Adapter(config, list(train_names), list(model.vislora_train_params), within)}
    model._vislora_input_hook = model.register_forward_pre_hook(_input_needs_grad_hook)
    set_trainable(model, train_names, model.vislora_train_params)
    if config.init == "pissa":
        for _, layer in lora_layers(model):
            layer.init_pissa()
    elif config.init != "default":
        raise VisloraError(f"unknown init '{config.init}': use 'default' or 'pissa'")
    if verify is None:
        verify = sum(p.numel() for p in model.parameters()) < 30_000_000
    if verify and not any(p.is_meta for p in model.parameters()):  # a meta model has no numbers to compare
        verify_layers(model)
    return model


def _probe_input(layer: LoraLayer) -> torch.Tensor:
    """A random input of the layer's kind (nn.MultiheadAttention: 2 sequences of 4 tokens)."""
    base, w = layer.base_layer, layer.raw_weight()
    if isinstance(base, nn.MultiheadAttention):
        return torch.randn(2, 4, base.embed_dim, device=w.device, dtype=w.dtype)
    if isinstance(base, nn.Linear):
        return torch.randn(2, base.in_features, device=w.device, dtype=w.dtype)
    reach = [d * (k - 1) + 1 + s for k, d, s in zip(base.kernel_size, base.dilation, base.stride, strict=True)]
    side = max(8, *reach)
    return torch.randn(1, base.in_channels, *[side] * len(reach), device=w.device, dtype=w.dtype)


def _probe(layer: LoraLayer, x: torch.Tensor) -> torch.Tensor:
    """The layer's output on x (self-attention for nn.MultiheadAttention), in fp32."""
    if isinstance(layer.base_layer, nn.MultiheadAttention):
        return layer(x, x, x, need_weights=False)[0].float()
    return layer(x).float()


@torch.no_grad()
def verify_layers(model: nn.Module, tol: float | None = None) -> None:
    """Check every LoraLayer: merged == unmerged (relative tolerance) with a random update (B, and
    DoRA's magnitude); the adapter's tensors are restored."""
    for name, layer in lora_layers(model):
        if layer.merged:
            continue
        saved = [p.detach().clone() for p in layer.adapter_parameters()]
        was_training = layer.training
        layer.eval()
        try:
            layer.update.perturb_()  # a random B (and, for DoRA, magnitude): a non-zero update to merge
            x = _probe_input(layer)
            unmerged = _probe(layer, x)
            layer.merge()
            merged = _probe(layer, x)
            layer.unmerge()
        finally:
            for p, value in zip(layer.adapter_parameters(), saved, strict=True):
                p.copy_(value)
            layer.train(was_training)
        limit = tol or (1e-4 if layer.raw_weight().dtype in (torch.float32, torch.float64) else 2e-2)
        err = ((merged - unmerged).abs().max() / unmerged.abs().max().clamp_min(1e-12)).item()
        if not err <= limit:
            raise VisloraError(f"LoRA on '{name}' ({type(layer.base_layer).__name__}) is not exact: merged and "
                             f"unmerged outputs differ by {err:.2e} (relative), above {limit:.0e}")


# ---- merge / unload / summary --------------------------------------------------------------------
def merge(model: nn.Module) -> nn.Module:
    """Add every update into its base weight (in place; unmerge() restores the weights exactly)."""
    for _, layer in lora_layers(model):
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def _strip(model: nn.Module, merge_first: bool) -> nn.Module:
    for name, layer in list(wrapped_layers(model)):
        if merge_first:
            layer.merge(keep_original=False)
        else:
            layer.unmerge()
        replace_module(model, name, layer.base_layer)
    plain_bn = {frozen: bn for bn, frozen in FROZEN_BN.items()}
    for m in model.modules():
        for key in ("_vislora_bn_hook", "_vislora_input_hook"):
            hook = m.__dict__.pop(key, None)
            if hook is not None:
                hook.remove()
        if type(m) in plain_bn:
            m.__class__ = plain_bn[type(m)]
    model._modules.pop("vislora_modules", None)  # the trained modules of the other named adapters
    for attr in ("vislora_config", "vislora_train", "vislora_train_params", "vislora_within", "vislora_adapters",
                 "vislora_active"):
        model.__dict__.pop(attr, None)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Merge and replace every wrapper by its plain torch module: no vislora class is left in the
    model."""
    return _strip(model, merge_first=True)


def eject(model: nn.Module) -> nn.Module:
    """Remove the adapters without merging them: the model is the base model again."""
    return _strip(model, merge_first=False)


def trainable_summary(model: nn.Module) -> dict:
    """Counts of total, trainable and adapter parameters, and the trainable share of the total."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adapter = sum(layer.adapter_numel() for _, layer in lora_layers(model))
    return {"total": total, "trainable": trainable, "adapter": adapter, "fully_trained": trainable - adapter,
            "trainable_share": trainable / max(total, 1), "adapted_layers": sum(1 for _ in lora_layers(model))}
