"""Several named adapters on one model: add, switch, delete, and a batch whose images belong to
different ones.

The model stays a plain timm module. Each LoraLayer keeps one update per adapter (`updates[name]`);
the modules an adapter trains fully (its head, neck or decoder: PEFT's modules_to_save) sit in place
for the active adapter and in `model.vislora_modules[name]` for the others, so switching moves
modules, never numbers: A -> B -> A is bit-identical to A alone. The first adapter keeps today's
names (no `vislora_modules` until a second one comes).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn as nn

from vislora.config import Adapter, LoraConfig
from vislora.errors import VisloraError
from vislora.inject import inject_layers, replace_module, set_trainable, verify_layers
from vislora.layers import DEFAULT
from vislora.targets import resolve_train, resolve_train_params, wrapped_layers

STORE = "vislora_modules"


def adapter_names(model: nn.Module) -> list[str]:
    """The adapters the model carries, in the order they were added."""
    return list(getattr(model, "vislora_adapters", {}))


def active_adapter(model: nn.Module) -> str | None:
    return getattr(model, "vislora_active", None)


def _registry(model: nn.Module) -> dict[str, Adapter]:
    if not getattr(model, "vislora_adapters", None):
        raise VisloraError(f"{type(model).__name__} carries no vislora adapter: inject() or load_adapter() first")
    return model.vislora_adapters


def _store(model: nn.Module) -> nn.ModuleDict:
    if STORE not in model._modules:
        model.add_module(STORE, nn.ModuleDict())
    return model._modules[STORE]


def add_adapter(model: nn.Module, config: LoraConfig, name: str, within: str | None = None) -> nn.Module:
    """A second (third ...) adapter beside the others, inactive until set_adapter(model, name). It
    must train the same modules as the others (each gets its own copy of them) and no single
    parameters (biases)."""
    adapters = _registry(model)
    if name in adapters:
        raise VisloraError(f"the model already carries an adapter named '{name}' ({', '.join(adapters)})")
    if not name or "." in name:
        raise VisloraError(f"adapter name {name!r} must be a non-empty name without dots")
    if config.init == "pissa":
        raise VisloraError(f"adapter '{name}' is PiSSA-initialised: PiSSA rewrites the base weights, which the "
                         "other adapters share; load it into a model of its own")
    first = adapters[active_adapter(model)]
    train = resolve_train(model, config.train)
    if resolve_train_params(model, config.train, train) or first.train_params:
        raise VisloraError(f"adapter '{name}': several adapters on one model keep whole modules per adapter, not "
                         "single parameters (train patterns such as '*.bias'); load it into a model of its own")
    if sorted(train) != sorted(first.train):
        raise VisloraError(f"adapter '{name}' trains modules {train}, the model's adapters {first.train}: "
                         "adapters on one model must train the same modules (each keeps its own copy)")
    inject_layers(model, config, name, within)
    _store(model)[name] = nn.ModuleDict({str(i): copy.deepcopy(model.get_submodule(m))
                                         for i, m in enumerate(first.train)})
    adapters[name] = Adapter(config, list(first.train), [], within)
    return model


def set_adapter(model: nn.Module, name: str) -> nn.Module:
    """Make `name` the active adapter: its updates act in every layer and its trained modules sit in
    place (they are moved, not copied: switching back is bit-exact). Refused while an adapter is
    merged."""
    adapters = _registry(model)
    if name not in adapters:
        raise VisloraError(f"no adapter named '{name}': the model carries {', '.join(adapters)}")
    current = active_adapter(model)
    if name == current:
        return model
    if any(layer.merged for _, layer in wrapped_layers(model)):
        raise VisloraError(f"adapter '{current}' is merged: unmerge(model) before switching to '{name}'")
    store, train = _store(model), adapters[current].train
    kept = nn.ModuleDict({str(i): replace_module(model, m, store[name][str(i)]) for i, m in enumerate(train)})
    del store[name]
    store[current] = kept
    for _, layer in wrapped_layers(model):
        layer.active = name
    a = adapters[name]
    model.vislora_active, model.vislora_config, model.vislora_within = name, a.config, a.within
    model.vislora_train, model.vislora_train_params = list(a.train), list(a.train_params)
    set_trainable(model, a.train, a.train_params)
    return model


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove an inactive adapter: its updates, its modules; a layer no other adapter adapts becomes
    plain."""
    adapters = _registry(model)
    if name not in adapters:
        raise VisloraError(f"no adapter named '{name}': the model carries {', '.join(adapters)}")
    if name == active_adapter(model):
        raise VisloraError(f"adapter '{name}' is active: set_adapter(model, another) before deleting it")
    for layer_name, layer in list(wrapped_layers(model)):
        if name in layer.updates:
            del layer.updates[name]
        if not len(layer.updates):
            replace_module(model, layer_name, layer.base_layer)
    del _store(model)[name]
    del adapters[name]
    if not len(_store(model)):
        del model._modules[STORE]
    return model


class _Dispatch(nn.Module):
    """A trained module of several adapters at once: each group of samples through its own adapter's
    copy."""

    def __init__(self, modules: dict[str, nn.Module], groups: list[tuple[str, slice]]):
        super().__init__()
        self.copies, self.groups = modules, groups

    def forward(self, x: torch.Tensor):
        if not torch.is_tensor(x):
            raise VisloraError("mixed_forward: a trained module takes a non-tensor input: run the adapters apart")
        parts = [self.copies[name](x[part]) for name, part in self.groups]
        if len({tuple(p.shape[1:]) for p in parts}) > 1:  # heads of other widths: one output per sample
            return [row for part in parts for row in part]
        return torch.cat(parts)


def _groups(model: nn.Module, names: Sequence[str], batch: int
            ) -> tuple[torch.Tensor, list[tuple[str, slice]]]:
    """The order that sorts the batch by adapter (first-seen order, stable) and each adapter's slice
    of it."""
    known = adapter_names(model)
    if len(names) != batch:
        raise VisloraError(f"mixed_forward: {len(names)} adapter names for a batch of {batch} images")
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise VisloraError(f"mixed_forward: no adapter named {unknown} (the model carries {', '.join(known)})")
    order, groups = [], []
    for name in dict.fromkeys(names):
        members = [i for i, m in enumerate(names) if m == name]
        groups.append((name, slice(len(order), len(order) + len(members))))
        order += members
    return torch.tensor(order), groups


def _unsort(y, order: torch.Tensor):
    """Undo the sort by adapter: a tensor (or a list of per-image outputs) back in the caller's
    order."""
    if isinstance(y, list):
        out: list = [None] * len(y)
        for i, row in zip(order.tolist(), y, strict=True):
            out[i] = row
        return out
    out = torch.empty_like(y)
    out[order] = y
    return out


@torch.no_grad()
def mixed_forward(model: nn.Module, x: torch.Tensor, names: Sequence[str]):
    """One forward of a batch whose image i belongs to adapter names[i]: the base once, each image
    through its own adapter's updates and its own trained modules (head ...). A tensor, or a list of
    per-image outputs where the adapters' heads differ in width. Each image's output equals its
    adapter's merged model on it."""
    adapters = _registry(model)
    order, groups = _groups(model, names, x.shape[0])
    if any(layer.merged for _, layer in wrapped_layers(model)):
        raise VisloraError("mixed_forward: an adapter is merged: unmerge(model) first")
    current, store = active_adapter(model), model._modules.get(STORE, {})
    train = adapters[current].train
    copies = [{n: (model.get_submodule(m) if n == current else store[n][str(i)]) for n in adapters}
              for i, m in enumerate(train)]
    originals = [replace_module(model, m, _Dispatch(copies[i], groups)) for i, m in enumerate(train)]
    for _, layer in wrapped_layers(model):
        layer._mixed = groups
    try:
        return _unsort(model(x[order]), order)
    finally:
        for _, layer in wrapped_layers(model):
            layer._mixed = None
        for m, original in zip(train, originals, strict=True):
            replace_module(model, m, original)


def verify_adapter(model: nn.Module, name: str = DEFAULT) -> None:
    """verify_layers on one named adapter (merged == unmerged for each of its layers)."""
    current = active_adapter(model)
    set_adapter(model, name)
    try:
        verify_layers(model)
    finally:
        set_adapter(model, current)
