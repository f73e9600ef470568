"""Which layers an adapter config names: the model walk that sees through adapters, name patterns
(PEFT's rules), the target presets, the trainable `train` entries, and each layer's rank and qkv
chunks."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterator, Sequence

import torch.nn as nn

from vislora.config import LoraConfig
from vislora.errors import VisloraError
from vislora.layers import ADAPTABLE, LoraLayer, max_rank

QKV_CHUNKS = {"q": 0, "k": 1, "v": 2}


# ---- names and patterns --------------------------------------------------------------------------
def matches(name: str, pattern: str) -> bool:
    """PEFT's rule: the name ends with the pattern at a dot boundary; or the pattern, as a regex,
    full-matches."""
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def _cfg_names(model: nn.Module, key: str) -> list[str]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    value = cfg.get(key)
    return [value] if isinstance(value, str) else list(value or [])


def classifier_names(model: nn.Module) -> list[str]:
    """Names of the classifier modules: timm's get_classifier(), else
    pretrained_cfg['classifier']."""
    names = []
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        try:
            heads = get_classifier()
        except Exception:  # some timm models (features_only) have no classifier
            heads = None
        heads = heads if isinstance(heads, (tuple, list)) else [heads]
        by_id = {id(m): n for n, m in model.named_modules()}
        names = [by_id[id(h)] for h in heads if h is not None and id(h) in by_id and by_id[id(h)]]
        names = [n for n in names if not isinstance(model.get_submodule(n), nn.Identity)]
    if not names:
        modules = dict(model.named_modules())
        names = [n for n in _cfg_names(model, "classifier") if n in modules]
    return names


def stem_names(model: nn.Module) -> list[str]:
    """The first conv (pretrained_cfg['first_conv']): it sees raw pixels and is never adapted by a
    preset."""
    modules = dict(model.named_modules())
    return [n for n in _cfg_names(model, "first_conv") if n in modules]


def is_within(name: str, roots: Sequence[str]) -> bool:
    """The module `name` is one of `roots` or inside one of them."""
    return any(name == r or name.startswith(r + ".") for r in roots)


def _is_conv(m: nn.Module) -> bool:
    return isinstance(m, (nn.Conv1d, nn.Conv2d))


def _is_pointwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (_is_conv(m) and set(m.kernel_size) == {1})


def _is_factorized(m: nn.Module) -> bool:
    """Depthwise or grouped convs, kx1 / 1xk convs, and 1-d convs (ECA, EfficientViM)."""
    return _is_conv(m) and (m.groups > 1 or 1 in tuple(m.kernel_size) or isinstance(m, nn.Conv1d))


# attention and MLP projections of transformer blocks: ViT/DeiT/Swin/EVA/BEiT, ConViT's GPSA (qk,
# v), CrossViT's cross-attention (wq, wk, wv), TNT's inner and outer blocks (attn_in, attn_out,
# mlp_in)
_VIT = re.compile(r"(^|.*\.)(attn(_in|_out)?\.(qkv|qk|proj|out_proj|q_proj|k_proj|v_proj|q|k|v|kv|wq|wk|wv)"
                  r"|mlp(_in|_out)?\.(fc1|fc2|fc1_g|fc1_x))$")

# preset name -> predicate(name, module); stem and classifier are excluded for every preset
PRESETS = {
    "vit": lambda n, m: (isinstance(m, nn.Linear) and _VIT.match(n) is not None)
    or isinstance(m, nn.MultiheadAttention),  # OpenCLIP-style blocks: in_proj (q, k, v) and out_proj
    "conv1x1": lambda n, m: _is_pointwise(m),
    "conv": lambda n, m: _is_pointwise(m) or _is_factorized(m),
    "all": lambda n, m: isinstance(m, ADAPTABLE),
    "all-linear": lambda n, m: isinstance(m, nn.Linear),
}



# ---- finding targets -----------------------------------------------------------------------------
def _walk(module: nn.Module, prefix: str = "", seen: set[int] | None = None) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) with the names of the model without adapters: below a LoraLayer the walk goes
    on into its base layer's children (an adapted nn.MultiheadAttention's out_proj is
    `attn.out_proj`, not `attn.base_layer.out_proj`); the modules other named adapters keep
    (vislora_modules) are left out. A module held by several parents (CoaT's shared conv position
    encodings) comes once, under its first name, as in named_modules()."""
    seen = set() if seen is None else seen
    if id(module) in seen:
        return
    seen.add(id(module))
    yield prefix, module
    children = module.base_layer._modules if isinstance(module, LoraLayer) else module._modules
    for name, child in children.items():
        if child is not None and not (not prefix and name == "vislora_modules"):
            yield from _walk(child, f"{prefix}.{name}" if prefix else name, seen)


def wrapped_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """Every (name, LoraLayer) in the model, whichever adapters it carries."""
    for name, module in _walk(model):
        if isinstance(module, LoraLayer):
            yield name, module


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """Every (name, LoraLayer) the active adapter adapts (all of them with a single adapter)."""
    for name, module in wrapped_layers(model):
        if module.carries_active:
            yield name, module


def plain_modules(scope: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """named_modules() as if no adapter were there: a LoraLayer shows as its base layer under its
    own name."""
    for name, module in _walk(scope):
        yield name, module.base_layer if isinstance(module, LoraLayer) else module


def is_parameter_pattern(entry: str) -> bool:
    """A `train` entry naming parameters (it ends in .weight or .bias, e.g. "*.bias"), not
    modules."""
    return entry.endswith((".weight", ".bias"))


def _glob(entry: str) -> bool:
    return any(c in entry for c in "*?[")


def resolve_train(model: nn.Module, train: Sequence[str]) -> list[str]:
    """Module names that stay fully trainable: "head" (the classifier), names, suffix / regex
    patterns, globs ("*norm*"). Parameter patterns are resolve_train_params'. Unknown entries
    raise."""
    modules = [n for n, _ in plain_modules(model) if n]
    found: list[str] = []
    for entry in train:
        if is_parameter_pattern(entry):
            continue
        hits = classifier_names(model) if entry == "head" else []
        hits = hits or [n for n in modules if matches(n, entry) or (_glob(entry) and fnmatch.fnmatchcase(n, entry))]
        if not hits and entry == "head":
            continue  # a model without a classifier (a backbone) has no head to train
        if not hits:
            raise VisloraError(f"train entry '{entry}' matches no module of {type(model).__name__}")
        found += [h for h in hits if not is_within(h, found)]
    return [n for n in found if not any(n != o and is_within(n, [o]) for o in found)]


def resolve_train_params(model: nn.Module, train: Sequence[str], modules: Sequence[str] = ()) -> list[str]:
    """Parameter names matched by the `train` entries that end in .weight / .bias (exact names or
    globs, e.g. "*.bias"), outside the adapters and the fully trained `modules`. A pattern that
    matches nothing raises."""
    names = [n for n, _ in model.named_parameters() if ".lora_" not in f".{n}"]
    found: list[str] = []
    for entry in (e for e in train if is_parameter_pattern(e)):
        hits = [n for n in names if fnmatch.fnmatchcase(n, entry) or n == entry or
                fnmatch.fnmatchcase(n.replace(".base_layer.", "."), entry)]
        if not hits:
            raise VisloraError(f"train entry '{entry}' matches no parameter of {type(model).__name__}")
        found += [h for h in hits if h not in found and not is_within(h, modules)]  # those modules train whole
    return found


def pattern_value(name: str, pattern_map: dict, default):
    """The value of the first rank/alpha pattern matching the layer name (PEFT's rank_pattern
    rules), else default."""
    for key, value in pattern_map.items():
        if matches(name, key) or re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def find_targets(model: nn.Module, config: LoraConfig, within: str | None = None) -> list[str]:
    """Names of the modules the config adapts (only inside the submodule `within`, if given). Raises
    ValueError for patterns that match nothing and for modules that cannot carry an adapter."""
    scope = model.get_submodule(within) if within else model
    prefix = within + "." if within else ""
    trained = resolve_train(model, config.train)
    candidates = [(prefix + n, m) for n, m in plain_modules(scope) if n and not is_within(prefix + n, trained)]
    excluded = {n for n, _ in candidates for p in config.exclude if matches(n, p)}
    if isinstance(config.targets, str) and config.targets in PRESETS:
        keep, edges = PRESETS[config.targets], [prefix + n for n in stem_names(scope) + classifier_names(scope)]
        names = [n for n, m in candidates if n not in excluded and not is_within(n, edges) and keep(n, m)]
        if not names:
            raise VisloraError(f"target preset '{config.targets}' matches no layer of {type(scope).__name__}")
        return names
    patterns = [config.targets] if isinstance(config.targets, str) else list(config.targets)
    names = []
    for pattern in patterns:
        hits = [(n, m) for n, m in candidates if matches(n, pattern)]
        if not hits:
            known = ", ".join(sorted(PRESETS))
            raise VisloraError(f"target pattern '{pattern}' matches no module (presets: {known})")
        for n, m in hits:
            if n in excluded or n in names:
                continue
            if not isinstance(m, ADAPTABLE):
                raise VisloraError(f"module '{n}' ({type(m).__name__}), selected by '{pattern}', cannot carry "
                                 "a LoRA adapter: only nn.Linear, nn.Conv1d, nn.Conv2d (any kernel, groups) and "
                                 "nn.MultiheadAttention can")
            names.append(n)
    if not names:
        raise VisloraError(f"targets {patterns} select no layer once 'exclude' is applied")
    return names


def resolve_qkv_parts(name: str, module: nn.Module, qkv: str | None) -> tuple[int, ...] | None:
    """The qkv chunks a fused `attn.qkv` Linear or an nn.MultiheadAttention's in_proj adapts (e.g.
    "qv" -> (0, 2)); None for any other layer."""
    mha = isinstance(module, nn.MultiheadAttention)
    if not qkv or not (mha or (isinstance(module, nn.Linear) and name.endswith("qkv"))):
        return None
    unknown = set(qkv) - set(QKV_CHUNKS)
    outputs = 3 * module.embed_dim if mha else module.out_features
    if unknown or outputs % 3:
        raise VisloraError(f"qkv='{qkv}' cannot split '{name}' ({outputs} outputs) into q, k, v")
    return tuple(sorted(QKV_CHUNKS[c] for c in set(qkv)))


def layer_rank(name: str, module: nn.Module, config: LoraConfig, parts: tuple[int, ...] | None) -> int:
    """The rank of one layer: rank_pattern, else r (an int, or a fraction of the layer's max rank).

    A preset caps r at the layer's max rank (lossless: a rank-limit adapter spans every update of
    that layer), e.g. for small squeeze-excite convs; an explicit pattern or rank_pattern entry is
    checked strictly.
"""
    r = pattern_value(name, config.rank_pattern, None)
    explicit = r is not None or not (isinstance(config.targets, str) and config.targets in PRESETS)
    r = config.r if r is None else r
    limit = max_rank(module, 3 if parts else 1)
    if isinstance(r, float) and 0 < r < 1:
        r = max(1, round(r * limit))
    if not explicit and r == int(r) and int(r) > limit:
        r = limit
    if r != int(r) or not 1 <= int(r) <= limit:
        raise VisloraError(f"r={r} is not valid for '{name}': it must be an int in [1, {limit}] or a fraction "
                         "in (0, 1)")
    return int(r)
