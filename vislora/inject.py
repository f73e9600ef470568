"""Model-level LoRA: the config, target presets and patterns, injection, trainable selection, merge, unload."""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
from timm.layers import BatchNormAct2d, use_reentrant_ckpt

from vislora.errors import VisloraError
from vislora.layers import ADAPTABLE, DEFAULT, LoraLayer, adapter_exceeds_layer, dora_refusal, max_rank

QKV_CHUNKS = {"q": 0, "k": 1, "v": 2}
log = logging.getLogger(__name__)


@dataclass
class LoraConfig:
    """Everything that defines an adapter. Defaults follow the LoRA paper and PEFT."""

    r: int | float = 8  # rank per layer; a float in (0, 1) is a fraction of each layer's max rank
    alpha: float = 16  # the update is scaled by alpha / r (alpha / sqrt(r) with rslora)
    dropout: float = 0.0  # dropout on the adapter input (activation path only)
    targets: str | Sequence[str] = "vit"  # a preset name (see PRESETS) or a list of name patterns
    exclude: Sequence[str] = ()  # patterns (same forms as targets) that are never adapted
    rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r)
    # trained fully beside the adapters: "head" (the timm classifier), module names / patterns / globs ("blocks.11",
    # "*norm*": modules_to_save in the file), parameter patterns ending in .weight / .bias ("*.bias": BitFit)
    train: Sequence[str] = ("head",)
    qkv: str | None = None  # per-projection adapters inside fused qkv layers: "qv", "qkv", ...; None = one pair
    rank_pattern: dict[str, int] = field(default_factory=dict)  # per-layer r, keys matched like targets
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # per-layer alpha
    init: str = "default"  # "default" (B = 0) or "pissa" (principal singular vectors, see vislora.svd)
    # DoRA (Liu et al. 2024, PEFT's name): W' = m * (W + s B A) / ||W + s B A||, one trained magnitude per output
    # row; not additive, so PiSSA, shrink and the low-rank penalty refuse it
    use_dora: bool = False

    def __post_init__(self) -> None:
        """One pattern given as a plain string means a list of one (not its characters)."""
        if isinstance(self.exclude, str):
            self.exclude = (self.exclude,)
        if isinstance(self.train, str):
            self.train = (self.train,)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = d["targets"] if isinstance(d["targets"], str) else list(d["targets"])
        d["exclude"], d["train"] = list(d["exclude"]), list(d["train"])
        return d


@dataclass
class Adapter:
    """One named adapter of a model: its config, the modules and parameters it trains fully, its search scope."""

    config: LoraConfig
    train: list[str]
    train_params: list[str]
    within: str | None = None


# ---- names and patterns ---------------------------------------------------------------------------
def matches(name: str, pattern: str) -> bool:
    """PEFT's rule: the name ends with the pattern at a dot boundary; or the pattern, as a regex, full-matches."""
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
    """Names of the classifier modules: timm's get_classifier(), else pretrained_cfg['classifier']."""
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
    """The first conv (pretrained_cfg['first_conv']): it sees raw pixels and is never adapted by a preset."""
    modules = dict(model.named_modules())
    return [n for n in _cfg_names(model, "first_conv") if n in modules]


def _within(name: str, roots: Sequence[str]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def _is_conv(m: nn.Module) -> bool:
    return isinstance(m, (nn.Conv1d, nn.Conv2d))


def _is_pointwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (_is_conv(m) and set(m.kernel_size) == {1})


def _is_factorized(m: nn.Module) -> bool:
    """Depthwise or grouped convs, kx1 / 1xk convs, and 1-d convs (ECA, EfficientViM)."""
    return _is_conv(m) and (m.groups > 1 or 1 in tuple(m.kernel_size) or isinstance(m, nn.Conv1d))


# attention and MLP projections of transformer blocks: ViT/DeiT/Swin/EVA/BEiT, ConViT's GPSA (qk, v), CrossViT's
# cross-attention (wq, wk, wv), TNT's inner and outer blocks (attn_in, attn_out, mlp_in)
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


# layers with weights that no preset adapts, because LoraLayer wraps ADAPTABLE only: type -> why
UNADAPTABLE = {
    nn.modules.conv._ConvNd: "only nn.Conv1d and nn.Conv2d are adapted, not 3-d or transposed convolutions",
    nn.Embedding: "embeddings are not adapted",
}


def unadaptable_layers(model: nn.Module, within: str | None = None) -> dict[str, str]:
    """Layers with weights (outside the stem and classifier) that no preset can adapt: name -> "Type: why"."""
    scope = model.get_submodule(within) if within else model
    prefix = within + "." if within else ""
    edges = stem_names(scope) + classifier_names(scope)
    found = {}
    for name, m in scope.named_modules():
        if isinstance(m, (*ADAPTABLE, LoraLayer)) or _within(name, edges):
            continue
        why = next((w for t, w in UNADAPTABLE.items() if isinstance(m, t)), None)
        if why:
            found[prefix + name] = f"{type(m).__name__}: {why}"
    return found


def warn_unadaptable(model: nn.Module, config: LoraConfig, within: str | None = None) -> None:
    """One warning naming the layers a preset leaves because vislora cannot adapt them (never a silent skip)."""
    if not (isinstance(config.targets, str) and config.targets in PRESETS):
        return
    skipped = unadaptable_layers(model, within)
    if skipped:
        first, why = next(iter(skipped.items()))
        log.warning("preset '%s' leaves %d layer(s) that vislora cannot adapt, e.g. '%s' (%s)", config.targets,
                    len(skipped), first, why)


# ---- finding targets ------------------------------------------------------------------------------
def _walk(module: nn.Module, prefix: str = "", seen: set[int] | None = None) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) with the names of the model without adapters: below a LoraLayer the walk goes on into its
    base layer's children (an adapted nn.MultiheadAttention's out_proj is `attn.out_proj`, not
    `attn.base_layer.out_proj`); the modules other named adapters keep (vislora_modules) are left out. A module
    held by several parents (CoaT's shared conv position encodings) comes once, under its first name, as in
    named_modules()."""
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
    """named_modules() as if no adapter were there: a LoraLayer shows as its base layer under its own name."""
    for name, module in _walk(scope):
        yield name, module.base_layer if isinstance(module, LoraLayer) else module


def replace_module(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put `module` at the dotted `name` (names as plain_modules gives them: through adapter wrappers) and
    wherever else the model holds the same module (a shared one stays shared); returns the module that was there."""
    parent, _, child = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    owner = owner.base_layer if isinstance(owner, LoraLayer) else owner
    old = owner._modules[child]
    for holder in [m.base_layer if isinstance(m, LoraLayer) else m for m in model.modules()]:
        for key, held in list(holder._modules.items()):
            if held is old and holder is not module:
                setattr(holder, key, module)
    return old


def is_parameter_pattern(entry: str) -> bool:
    """A `train` entry naming parameters (it ends in .weight or .bias, e.g. "*.bias"), not modules."""
    return entry.endswith((".weight", ".bias"))


def _glob(entry: str) -> bool:
    return any(c in entry for c in "*?[")


def resolve_train(model: nn.Module, train: Sequence[str]) -> list[str]:
    """Module names that stay fully trainable: "head" (the classifier), names, suffix / regex patterns, globs
    ("*norm*"). Parameter patterns are resolve_train_params'. Unknown entries raise."""
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
        found += [h for h in hits if not _within(h, found)]
    return [n for n in found if not any(n != o and _within(n, [o]) for o in found)]


def resolve_train_params(model: nn.Module, train: Sequence[str], modules: Sequence[str] = ()) -> list[str]:
    """Parameter names matched by the `train` entries that end in .weight / .bias (exact names or globs, e.g.
    "*.bias"), outside the adapters and the fully trained `modules`. A pattern that matches nothing raises."""
    names = [n for n, _ in model.named_parameters() if ".lora_" not in f".{n}"]
    found: list[str] = []
    for entry in (e for e in train if is_parameter_pattern(e)):
        hits = [n for n in names if fnmatch.fnmatchcase(n, entry) or n == entry or
                fnmatch.fnmatchcase(n.replace(".base_layer.", "."), entry)]
        if not hits:
            raise VisloraError(f"train entry '{entry}' matches no parameter of {type(model).__name__}")
        found += [h for h in hits if h not in found and not _within(h, modules)]  # those modules train whole
    return found


def pattern_value(name: str, pattern_map: dict, default):
    """The value of the first rank/alpha pattern matching the layer name (PEFT's rank_pattern rules), else default."""
    for key, value in pattern_map.items():
        if matches(name, key) or re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def find_targets(model: nn.Module, config: LoraConfig, within: str | None = None) -> list[str]:
    """Names of the modules the config adapts (only inside the submodule `within`, if given).
    Raises ValueError for patterns that match nothing and for modules that cannot carry an adapter."""
    scope = model.get_submodule(within) if within else model
    prefix = within + "." if within else ""
    trained = resolve_train(model, config.train)
    candidates = [(prefix + n, m) for n, m in plain_modules(scope) if n and not _within(prefix + n, trained)]
    excluded = {n for n, _ in candidates for p in config.exclude if matches(n, p)}
    if isinstance(config.targets, str) and config.targets in PRESETS:
        keep, edges = PRESETS[config.targets], [prefix + n for n in stem_names(scope) + classifier_names(scope)]
        names = [n for n, m in candidates if n not in excluded and not _within(n, edges) and keep(n, m)]
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
    """The qkv chunks a fused `attn.qkv` Linear or an nn.MultiheadAttention's in_proj adapts (e.g. "qv" -> (0, 2));
    None for any other layer."""
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

    A preset caps r at the layer's max rank (lossless: a rank-limit adapter spans every update of that
    layer), e.g. for small squeeze-excite convs; an explicit pattern or rank_pattern entry is checked strictly.
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


# ---- inject / trainable selection -----------------------------------------------------------------
def _eval_mode_hook(module: nn.Module, args) -> None:
    module.training = False  # frozen BatchNorm normalises with its running statistics, which never change


def frozen_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Batch norm with the running statistics as one per-channel multiply-add, y = x * scale + shift: the numbers
    of eval-mode batch_norm, with a backward that is a single multiply (several times cheaper on CPU)."""
    scale = (bn.running_var + bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return torch.addcmul(shift.to(x.dtype).view(shape), x, scale.to(x.dtype).view(shape))


class FrozenStatsBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that normalises with its running statistics in train mode too. freeze_bn_stats swaps a
    module's class to it in place (same parameters, buffers and state_dict); unload/eject swap it back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return frozen_batch_norm(self, x)


class FrozenStatsBatchNormAct2d(BatchNormAct2d):
    """timm's BatchNormAct2d (norm, dropout, activation: EfficientNet, MobileNet) with frozen statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(frozen_batch_norm(self, x)))


FROZEN_BN = {nn.BatchNorm2d: FrozenStatsBatchNorm2d, BatchNormAct2d: FrozenStatsBatchNormAct2d}


def freeze_bn_stats(model: nn.Module, keep: Sequence[str] = ()) -> None:
    """BatchNorm layers (except those inside `keep`) use their running statistics even in train mode.

    BatchNorm2d and timm's BatchNormAct2d become their FrozenStats classes (a multiply-add); other BatchNorm
    types (1d, 3d, subclasses, no running statistics) get a hook that keeps them in eval mode."""
    for name, m in model.named_modules():
        if not isinstance(m, nn.modules.batchnorm._BatchNorm) or _within(name, keep):
            continue
        if type(m) in FROZEN_BN and m.track_running_stats:
            m.__class__ = FROZEN_BN[type(m)]
        elif type(m) not in FROZEN_BN.values() and not hasattr(m, "_vislora_bn_hook"):
            m._vislora_bn_hook = m.register_forward_pre_hook(_eval_mode_hook)


def _input_needs_grad_hook(model: nn.Module, args: tuple):
    """Reentrant gradient checkpointing (timm.layers.set_reentrant_ckpt(True)) gives no gradient to a segment whose
    inputs do not require grad, so frozen-base LoRA would train nothing: make the input require grad then (what
    PEFT's enable_input_require_grads does for embeddings). Non-reentrant checkpointing needs nothing."""
    if not (model.training and torch.is_grad_enabled() and args and torch.is_tensor(args[0])):
        return None
    if args[0].requires_grad or not use_reentrant_ckpt():
        return None
    if not any(getattr(m, "grad_checkpointing", False) for m in model.modules()):
        return None
    return (args[0].detach().requires_grad_(True), *args[1:])


def set_trainable(model: nn.Module, train_names: Sequence[str], train_params: Sequence[str] = ()) -> None:
    """Only adapters, the `train` modules and the `train_params` parameters require grad; BatchNorm outside the
    train modules keeps its eval statistics."""
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
    """(name, base layer, qkv parts, rank) of every layer the config adapts: everything checked before any change."""
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
    """The adapter `name` on every layer the config targets: a new LoraLayer where none is, or an update beside
    the others where one is (several named adapters). Wrappers added here start at the model's active adapter."""
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
    """Wrap every target layer of `model` in a LoraLayer, in place, and select the trainable parameters.

    within: search targets only in this submodule (e.g. a detector's timm backbone); its own pretrained_cfg
    names the stem and classifier that presets leave alone. `train` is resolved on the whole model.
    verify (default: on for models under 30M parameters) checks each layer once: with a random B,
    merged and unmerged outputs agree on a random input; a layer that fails is named in the error.
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
    """Check every LoraLayer: merged == unmerged (relative tolerance) with a random update (B, and DoRA's
    magnitude); the adapter's tensors are restored."""
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


# ---- merge / unload / summary ---------------------------------------------------------------------
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
    """Merge and replace every wrapper by its plain torch module: no vislora class is left in the model."""
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
