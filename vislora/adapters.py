"""Adapter files in PEFT's layout: adapter_model.safetensors + adapter_config.json. No pickle
anywhere.

Keys are PEFT's: `base_model.model.<layer>.lora_A.weight` (conv A as [R, in/groups, kh, kw], B as
[out, R, 1, 1]), `<layer>.lora_magnitude_vector` for DoRA ([out], conv [1, out, 1, 1]) and
`base_model.model.<module>.<param>` for the fully trained (`modules_to_save`) modules.
Per-projection qkv adapters are written as one fused adapter of rank parts*r with a block-diagonal
B, which is the same update, so PEFT loads it and gives the same outputs.
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from vislora.config import LoraConfig
from vislora.errors import VisloraError
from vislora.files import atomic_write, read_json, write_json
from vislora.inject import eject, inject, replace_module
from vislora.layers import DEFAULT, LoraLayer
from vislora.named import active_adapter, adapter_names, add_adapter, delete_adapter, set_adapter
from vislora.svd import pissa_as_lora
from vislora.targets import PRESETS, find_targets, is_parameter_pattern, lora_layers, pattern_value, wrapped_layers

log = logging.getLogger(__name__)

PREFIX = "base_model.model."
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
VISLORA_NAME = "vislora.json"  # vislora's exact layers, ranks and config, which PEFT's LoraConfig has no field for
MAGNITUDE = "lora_magnitude_vector"  # PEFT's file key of a DoRA layer's magnitude
__version__ = "0.1.0"
_WARNED: set[str] = set()  # modules_to_save names already reported as ambiguous for PEFT


def _peft_shapes(layer: LoraLayer, rank: int) -> tuple[torch.Size, torch.Size]:
    """Shapes of A and B as PEFT stores them for a fused adapter of the given rank."""
    w = layer.raw_weight()
    if isinstance(layer.base_layer, (nn.Conv1d, nn.Conv2d)):
        return torch.Size((rank, *w.shape[1:])), torch.Size((w.shape[0], rank, *[1] * (w.dim() - 2)))
    return torch.Size((rank, w.shape[1])), torch.Size((w.shape[0], rank))  # Linear, MultiheadAttention in_proj


def _magnitude_shape(layer: LoraLayer) -> torch.Size:
    """PEFT's shape of a DoRA magnitude: [out] for Linear, [1, out, 1, 1] for Conv2d ([1, out, 1]
    for Conv1d)."""
    w = layer.raw_weight()
    conv = isinstance(layer.base_layer, (nn.Conv1d, nn.Conv2d))
    return torch.Size((1, w.shape[0], *[1] * (w.dim() - 2)) if conv else (w.shape[0],))


def file_factors(layer: LoraLayer) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, PEFT alpha) of one layer as a plain fused adapter relative to the ORIGINAL base
    weight.

    Per-projection qkv adapters become one adapter of rank parts*r with a block-diagonal B; a PiSSA
    layer (whose base weight holds a residual) becomes [A; A0], [B, -B0] of rank 2r (see
    vislora.svd.pissa_as_lora).
"""
    if layer.update.pissa:
        a, b, scaling = pissa_as_lora(layer)
    else:
        a, b, scaling = layer.lora_A, layer.full_B(), layer.scaling
    rank = a.shape[0]
    alpha = scaling * (math.sqrt(rank) if layer.rslora else rank)
    shape_a, shape_b = _peft_shapes(layer, rank)
    return a.detach().reshape(shape_a), b.detach().reshape(shape_b), alpha


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter and the `train` modules as PEFT-named tensors."""
    state = {}
    for name, layer in lora_layers(model):
        state[f"{PREFIX}{name}.lora_A.weight"], state[f"{PREFIX}{name}.lora_B.weight"], _ = file_factors(layer)
        if not layer.additive:
            magnitude = layer.update.full_magnitude(layer.raw_weight())
            state[f"{PREFIX}{name}.{MAGNITUDE}"] = magnitude.reshape(_magnitude_shape(layer))
    for module_name in getattr(model, "vislora_train", []):
        for key, value in model.get_submodule(module_name).state_dict().items():
            state[f"{PREFIX}{module_name}.{key}"] = value.detach()
    for name in getattr(model, "vislora_train_params", []):
        state[f"{PREFIX}{name}"] = model.get_parameter(name).detach()
    return {k: v.contiguous().clone() for k, v in state.items()}


def _all_biases(model: nn.Module) -> bool:
    """The trained parameters are exactly every bias outside the adapters and trained modules:
    PEFT's bias='all'."""
    trained = set(getattr(model, "vislora_train_params", []))
    biases = {n for n, _ in model.named_parameters() if n.endswith(".bias") and
              not any(n.startswith(m + ".") for m in model.vislora_train)}
    return bool(trained) and trained == biases


def _warn_suffix_clash(model: nn.Module) -> None:
    """PEFT takes every module whose name ends with a modules_to_save entry: say so when that is
    more modules than vislora trained (e.g. ResNet's stem `conv1` is also the end of
    `layer1.0.conv1`); vislora loads it exactly."""
    names = [n for n, _ in model.named_modules()]
    for module in getattr(model, "vislora_train", []):
        others = [n for n in names if n.endswith("." + module)]
        if others and module not in _WARNED:
            _WARNED.add(module)
            log.warning("modules_to_save '%s' also names %d other module(s) for PEFT (e.g. %s): vislora loads "
                        "this adapter exactly, PEFT would treat those as trained too", module, len(others), others[0])


def exact_pattern(name: str) -> str:
    """A pattern that matches the layer `name` and no other: anchored, dots escaped (PEFT's
    rank_pattern and alpha_pattern read `^...$` keys that way, and so does
    vislora.inject.matches)."""
    return f"^{re.escape(name)}$"


def adapter_config(model: nn.Module) -> dict:
    """PEFT's LoraConfig fields with the exact layers, ranks and alphas; vislora's own under
    'vislora'."""
    config: LoraConfig = model.vislora_config
    layers = list(lora_layers(model))
    factors = {n: file_factors(layer) for n, layer in layers}
    ranks = {n: f[0].shape[0] for n, f in factors.items()}
    alphas = {n: f[2] for n, f in factors.items()}
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    trained = {"train_params": [t for t in config.train if is_parameter_pattern(t)],
               "train_modules": list(model.vislora_train)}  # exact names: PEFT reads modules_to_save by suffix
    ours = {"config": config.to_dict(), **trained, "ranks": {n: layer.r for n, layer in layers},
            "alphas": {n: layer.alpha for n, layer in layers}, "within": getattr(model, "vislora_within", None)}
    if any(layer.update.pissa for _, layer in layers):  # saved as the equivalent plain adapter
        ours = {"config": {**config.to_dict(), "qkv": None, "init": "default"}, **trained, "ranks": ranks,
                "alphas": {n: alphas[n] for n in ranks}, "within": ours["within"]}
    _warn_suffix_clash(model)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": cfg.get("architecture"),
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.rslora,
        "target_modules": [n for n, _ in layers],
        "exclude_modules": None,
        "modules_to_save": list(model.vislora_train) or None,
        "rank_pattern": {exact_pattern(n): v for n, v in ranks.items() if v != r},
        "alpha_pattern": {exact_pattern(n): v for n, v in alphas.items() if v != alpha},
        "bias": "all" if _all_biases(model) else "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": config.use_dora,
        "vislora": {"version": __version__, **ours},
    }


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the adapters of `model` to `directory` (created if missing) in PEFT's layout: the first
    ("default") at the top, every other named one in DIRECTORY/<name>/; each file is written then
    renamed."""
    if not hasattr(model, "vislora_config"):
        raise VisloraError("model carries no vislora adapter: inject() or load_adapter() first")
    names = adapter_names(model)
    if len(names) > 1:
        previous = active_adapter(model)
        try:
            for i, name in enumerate(names):
                set_adapter(model, name)
                _save_active(model, Path(directory) if i == 0 else Path(directory) / name)
        finally:
            set_adapter(model, previous)
        return Path(directory)
    return _save_active(model, Path(directory))


def _save_active(model: nn.Module, directory: Path) -> Path:
    """The active adapter's files: adapter_model.safetensors and adapter_config.json."""
    directory.mkdir(parents=True, exist_ok=True)
    config = adapter_config(model)
    ours = config.pop("vislora")  # beside PEFT's file: PEFT warns about keys of adapter_config.json it does not know
    atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(adapter_state(model), str(p), {"format": "pt"}))
    write_json(directory / VISLORA_NAME, ours)
    write_json(directory / CONFIG_NAME, config)
    return directory


def read_config(directory: str | os.PathLike) -> dict:
    path = Path(directory) / CONFIG_NAME
    data = read_json(path, "adapter config")
    if data.get("peft_type", "LORA") != "LORA":
        raise VisloraError(f"{path}: peft_type {data.get('peft_type')!r} is not LORA")
    for key, plain in (("lora_bias", False), ("fan_in_fan_out", False)):
        if data.get(key, plain) not in (plain, None):
            raise VisloraError(f"{path}: {key}={data[key]!r} is not supported by vislora")
    if data.get("bias", "none") not in ("none", "all", None):  # "all": every bias trained, saved in the file
        raise VisloraError(f"{path}: bias={data['bias']!r} is not supported by vislora (none or all)")
    ours = Path(directory) / VISLORA_NAME  # vislora's own fields (files before it: inside adapter_config.json)
    if ours.is_file():
        data["vislora"] = read_json(ours, "adapter's vislora fields")
    return data


def config_from_file(data: dict) -> LoraConfig:
    """A LoraConfig that re-creates the saved layout: vislora's own fields (exact layer names), else
    PEFT's (suffix and regex patterns, read as PEFT reads them). A PEFT file saved relative to a
    PiSSA-initialised base (init_lora_weights "pissa") re-creates that init, as
    PeftModel.from_pretrained does."""
    ours = data.get("vislora") or {}
    targets = data.get("target_modules")
    if targets is None or "r" not in data:
        raise VisloraError("adapter config needs 'target_modules' and 'r'")
    init = data.get("init_lora_weights", True)
    if init not in (True, False, None, "gaussian", "pissa") and not ours:
        raise VisloraError(f"adapter config has init_lora_weights={init!r}: PEFT saved it relative to a base that this "
                         "init changed, which vislora does not re-create; convert it with PEFT (save_pretrained("
                         "path_initial_model_for_weight_conversion=...)) or load it with PeftModel")
    if ours:  # vislora's own file: the exact layers, ranks and alphas it was saved with
        targets = [exact_pattern(n) for n in targets]
        ranks = {exact_pattern(n): v for n, v in (ours.get("ranks") or {}).items()}
        alphas = {exact_pattern(n): v for n, v in (ours.get("alphas") or {}).items()}
    else:
        ranks, alphas = dict(data.get("rank_pattern") or {}), dict(data.get("alpha_pattern") or {})
    return LoraConfig(
        r=data["r"], alpha=data.get("lora_alpha", data["r"]), dropout=data.get("lora_dropout", 0.0),
        targets=targets if isinstance(targets, str) else list(targets),
        exclude=list(data.get("exclude_modules") or []), rslora=bool(data.get("use_rslora", False)),
        train=_train_entries(data, ours),
        qkv=ours.get("config", {}).get("qkv"),
        rank_pattern=ranks, alpha_pattern=alphas, init="pissa" if init == "pissa" and not ours else "default",
        use_dora=bool(data.get("use_dora", False)),
    )


def _train_entries(data: dict, ours: dict) -> list[str]:
    """The file's fully trained modules and parameter patterns: vislora's exact module names where
    it wrote them, else PEFT's modules_to_save (suffixes) and bias='all' as '*.bias'."""
    if "train_modules" in ours:
        modules = [exact_pattern(n) for n in ours["train_modules"]]
    else:
        modules = list(data.get("modules_to_save") or [])
    params = ours.get("train_params") or (["*.bias"] if data.get("bias") == "all" else [])
    return modules + list(params)


def _file_scaling(data: dict, name: str, layer: LoraLayer) -> tuple[float, float, bool]:
    """(scaling, alpha, rslora) the file gives the layer `name`: its own fields for vislora files,
    else PEFT's lora_alpha / alpha_pattern over the stored rank (parts*r for fused qkv adapters)."""
    ours = data.get("vislora") or {}
    rslora = bool(data.get("use_rslora", False))
    if ours and name in (ours.get("alphas") or {}):
        alpha = float(ours["alphas"][name])
        return alpha / (math.sqrt(layer.r) if rslora else layer.r), alpha, rslora
    rank = layer.r * (len(layer.qkv_parts) if layer.qkv_parts else 1)
    file_alpha = float(pattern_value(name, data.get("alpha_pattern") or {}, data.get("lora_alpha", data["r"])))
    scaling = file_alpha / (math.sqrt(rank) if rslora else rank)
    return scaling, scaling * (math.sqrt(layer.r) if rslora else layer.r), rslora


def _use_file_scaling(model: nn.Module, data: dict, path: Path) -> None:
    """An injected model takes the scaling (alpha, rslora) of the file it loads: the file defines
    the update."""
    for name, layer in lora_layers(model):
        scaling, alpha, rslora = _file_scaling(data, name, layer)
        if math.isclose(scaling, layer.scaling, rel_tol=1e-6) and rslora == layer.rslora:
            continue
        if layer.merged:
            raise VisloraError(f"{path}: layer '{name}' is merged with scaling {layer.scaling:g}, the file's is "
                             f"{scaling:g} (lora_alpha / alpha_pattern, use_rslora): unmerge() before loading")
        layer.update.set_scaling(alpha, rslora, scaling)


def _check_architecture(model: nn.Module, data: dict, path: Path) -> None:
    """Warn when the file names another timm architecture; refuse when the preset it was made with
    would adapt other layers of this model (e.g. a resnet18 adapter in a resnet34)."""
    saved = data.get("base_model_name_or_path")
    here = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if saved and here and saved != here:
        log.warning("adapter %s was saved for '%s'; loading it into '%s'", path, saved, here)
    ours = data.get("vislora") or {}
    original = ours.get("config") or {}
    targets = original.get("targets")
    if not (isinstance(targets, str) and targets in PRESETS):
        return
    config = LoraConfig(targets=targets, exclude=list(original.get("exclude") or []),
                        train=_train_entries(data, ours))
    try:
        expected = set(find_targets(model, config, ours.get("within")))
    except ValueError as e:
        raise VisloraError(f"{path} was made with targets '{targets}', which do not fit this model: {e}") from None
    saved_layers = set(data["target_modules"])
    if expected != saved_layers:
        extra, absent = sorted(expected - saved_layers), sorted(saved_layers - expected)
        raise VisloraError(f"{path} adapts {len(saved_layers)} layers chosen by targets '{targets}' on "
                         f"'{saved or 'another model'}', and this model has {len(expected)}: "
                         + "; ".join(part for part in (
                             f"{len(extra)} not in the file, e.g. {extra[:3]}" if extra else "",
                             f"{len(absent)} missing here, e.g. {absent[:3]}" if absent else "") if part))


def _fused_to_parts(layer: LoraLayer, b: torch.Tensor) -> torch.Tensor:
    """Inverse of full_B: the diagonal blocks of a fused block-diagonal B."""
    chunk, r = layer.lora_B.shape[0] // len(layer.qkv_parts), layer.r
    return torch.cat([b[c * chunk:(c + 1) * chunk, i * r:(i + 1) * r] for i, c in enumerate(layer.qkv_parts)])


def _targets_for(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Size]]:
    """File key -> (tensor in the model, shape expected in the file)."""
    out = {}
    for name, layer in lora_layers(model):
        n = len(layer.qkv_parts) if layer.qkv_parts else 1
        shape_a, shape_b = _peft_shapes(layer, n * layer.r)
        out[f"{PREFIX}{name}.lora_A.weight"] = (layer.lora_A, shape_a)
        out[f"{PREFIX}{name}.lora_B.weight"] = (layer.lora_B, shape_b)
        if not layer.additive:
            out[f"{PREFIX}{name}.{MAGNITUDE}"] = (layer.update.lora_magnitude, _magnitude_shape(layer))
    for module_name in getattr(model, "vislora_train", []):
        for key, value in model.get_submodule(module_name).state_dict(keep_vars=True).items():
            out[f"{PREFIX}{module_name}.{key}"] = (value, value.shape)
    for name in getattr(model, "vislora_train_params", []):
        value = model.get_parameter(name)
        out[f"{PREFIX}{name}"] = (value, value.shape)
    return out


def _mismatch_report(path: Path, missing, unexpected, wrong) -> str:
    lines = [f"adapter {path} does not fit this model:"]
    for label, keys in (("missing in file", missing), ("unknown to model", unexpected), ("shape mismatch", wrong)):
        if keys:
            lines.append(f"  {label} ({len(keys)}): " + ", ".join(keys[:5]) + (" ..." if len(keys) > 5 else ""))
    return "\n".join(lines)


def load_adapter(model: nn.Module, directory: str | os.PathLike, name: str | None = None) -> nn.Module:
    """Load a vislora or PEFT adapter into `model`: a plain model gets injected from the saved
    config, an injected one must have the same layout. With `name`, the adapter goes in beside the
    ones the model carries (inactive: vislora.set_adapter switches to it). All or nothing: on any
    mismatch the model is unchanged."""
    directory = Path(directory)
    data = read_config(directory)
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.is_file():
        raise FileNotFoundError(f"no adapter weights at {weights_path}")
    tensors = load_file(str(weights_path))
    plain = not any(True for _ in wrapped_layers(model))
    if plain or name is not None:
        _check_architecture(model, data, directory)
    if name is not None and not plain:
        return _load_beside(model, data, tensors, directory, name)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    if plain:
        inject(model, config_from_file(data), verify=False, name=name or DEFAULT)
    try:
        _copy_tensors(model, data, tensors, directory, injected_here=plain)
    except ValueError:
        if plain:
            eject(model)
            for n, p in model.named_parameters():
                p.requires_grad_(flags.get(n, True))
        raise
    return model


def _load_beside(model: nn.Module, data: dict, tensors: dict, directory: Path, name: str) -> nn.Module:
    """A named adapter beside the model's others (vislora.named.add_adapter), its tensors loaded
    while it is active, the previous adapter active again after."""
    add_adapter(model, config_from_file(data), name, (data.get("vislora") or {}).get("within"))
    previous = active_adapter(model)
    set_adapter(model, name)
    try:
        _fit_classifiers(model, tensors)
        _copy_tensors(model, data, tensors, directory, injected_here=True)
    except ValueError:
        set_adapter(model, previous)
        delete_adapter(model, name)
        raise
    set_adapter(model, previous)
    return model


def _fit_classifiers(model: nn.Module, tensors: dict) -> None:
    """A trained nn.Linear whose file weight has another number of outputs (another task's classes)
    becomes a Linear of that size: each named adapter has its own head."""
    for module_name in model.vislora_train:
        module, weight = model.get_submodule(module_name), tensors.get(f"{PREFIX}{module_name}.weight")
        if type(module) is nn.Linear and weight is not None and weight.shape[0] != module.out_features:
            head = nn.Linear(module.in_features, weight.shape[0], bias=module.bias is not None,
                             device=module.weight.device, dtype=module.weight.dtype)
            replace_module(model, module_name, head)


def _copy_tensors(model: nn.Module, data: dict, tensors: dict, directory: Path, injected_here: bool) -> None:
    """The file's tensors into the active adapter's layers and modules; a missing, unknown or
    mis-shaped key is a ValueError naming them, before anything is copied."""
    weights_path = directory / WEIGHTS_NAME
    targets = _targets_for(model)
    missing = sorted(set(targets) - set(tensors))
    unexpected = sorted(set(tensors) - set(targets))
    wrong = sorted(f"{k} {tuple(tensors[k].shape)} vs {tuple(shape)}" for k, (_, shape) in targets.items()
                   if k in tensors and tensors[k].shape != shape)
    if missing or unexpected or wrong:
        raise VisloraError(_mismatch_report(weights_path, missing, unexpected, wrong))
    if not injected_here:
        _use_file_scaling(model, data, directory)
    layers = dict(lora_layers(model))
    with torch.no_grad():
        for key, (target, _) in targets.items():
            value = tensors[key]
            name, _, leaf = key[len(PREFIX):].rpartition(".lora_")
            layer = layers.get(name) if leaf in ("A.weight", "B.weight", "magnitude_vector") else None
            if layer is not None and leaf == "magnitude_vector":
                value = layer.update.magnitude_from_full(value)
            elif layer is not None:
                value = value.reshape(value.shape[0], -1)
                if leaf == "B.weight" and layer.qkv_parts:
                    value = _fused_to_parts(layer, value)
            target.copy_(value.to(target.dtype))
