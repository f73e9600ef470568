"""Conformance suite: one small model of every timm architecture family, adapted, perturbed, merged, exported.

For each family (a timm model module, `timm.models.<module>`) the smallest variant by parameter count is built
(`pretrained=False`, `num_classes=7`, the smallest input it accepts) and checked with its family preset (`vit`
for transformers, `conv` for CNNs, `all` for hybrids) and with `all`:
  adaptable  how many Linear / Conv2d layers the preset adapts; which weight-bearing layers it skips, and why
  live       each adapted layer alone: perturbing its update tensors (layer_tensors) moves the model output
  grads      one training step reaches every adapter, the loss is finite
  exact      merged == unmerged (fp32, <= 1e-5 relative); unload leaves no vislora class, the plain model's
             state_dict loads into a fresh timm model with strict=True
  exports    the unloaded model traces to TorchScript and ONNX and matches PyTorch (<= 1e-4); a base model
             that does not export either is timm's limit, and said so
PEFT runs on exactly the layers the family preset adapts: ok / refused / crash / silent bypass / inexact merge.
Each family runs in a forked child with its own time budget, so a crash or a hang costs one row, not the run.

    PYTHONPATH=$PWD .venv/bin/python tools/conformance.py                    # every family -> docs/compatibility.*
    PYTHONPATH=$PWD .venv/bin/python tools/conformance.py --families resnet eva --out runs/conf
    PYTHONPATH=$PWD .venv/bin/python tools/conformance.py --render           # the table from the JSON again
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import math
import multiprocessing
import os
import signal
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import timm
import timm.models._registry as timm_registry
import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from peft.tuners.lora import LoraLayer as PeftLoraLayer
from timm.utils.model import reparameterize_model

from vislora.config import LoraConfig
from vislora.export import export_onnx, export_torchscript
from vislora.exported import onnx_predictor, quiet_jit
from vislora.inject import inject, merge, unadaptable_layers, unload, unmerge
from vislora.layers import LoraLayer
from vislora.targets import classifier_names, find_targets, lora_layers, stem_names

NUM_CLASSES = 7
SIZES = (32, 64, 96, 128, 160, 224, 256)  # input sides tried, smallest first
EXACT_TOL = 1e-5  # merged vs unmerged, relative to the output's max, fp32
MASKED_BELOW = 1e-3  # an update that moves the fp32 output less than this is checked in float64 too
PER_UPDATE_TOL = 1e-4  # float64 merged vs unmerged, relative to the update's own effect on the output
EXPORT_TOL = 1e-4  # exported file vs PyTorch, abs diff relative to max(1, output max)
CONFIRM_SCALES = (1e-3, 0.1, 10.0)  # perturbation sizes tried before an adapter without gradient is called dead
UPDATE_SCALE = 0.1  # ||delta W|| / ||W|| of the random update the exactness check merges
FAMILY_BUDGET_S = 240
LARGER_INPUT_RETRIES = 3  # where adapters are dead at the smallest input, try up to this many larger ones
SELECTION_CACHE = Path(__file__).resolve().parents[1] / "runs" / "conformance_selection.json"
SHRINK_ABOVE = 30_000_000  # a smallest variant larger than this is built with fewer blocks (SHRINK_KWARGS)
SHRINK_KWARGS = ({"depth": 2},)  # the same blocks, fewer of them: ViT-likes take `depth`
# synthetic families: layer types timm itself does not use but vislora users meet (OpenCLIP's attention)
SYNTHETIC = ("torch_multihead_attention",)
REPARAM_METHODS = ("fuse", "reparameterize", "switch_to_deploy")  # what timm's reparameterize_model calls


# ---- families and their smallest variant ----------------------------------------------------------
def family_models() -> dict[str, list[str]]:
    """timm's model modules (one family each) and the models each registers."""
    return {m: timm.list_models(module=m) for m in timm_registry.list_modules()}


def meta_parameters(name: str) -> int | None:
    """Parameter count of a timm model built on the meta device (no memory, no init); None if it does not build."""
    return meta_parameters_with(name, {})


def meta_parameters_with(name: str, kwargs: dict) -> int | None:
    """meta_parameters with constructor kwargs (None where the constructor does not take them)."""
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = timm.create_model(name, pretrained=False, **kwargs)
        return sum(p.numel() for p in model.parameters())
    except Exception:
        return None


def shrink_kwargs(name: str, params: int | None) -> dict:
    """Constructor kwargs that cut a giant (over SHRINK_ABOVE parameters) to fewer blocks; {} where none apply."""
    if params is None or params <= SHRINK_ABOVE:
        return {}
    for kwargs in SHRINK_KWARGS:
        fewer = meta_parameters_with(name, kwargs)
        if fewer is not None and fewer < params:
            return dict(kwargs)
    return {}


def smallest_variant(names: list[str]) -> tuple[str, int]:
    """The family member with the fewest parameters (ties: the first name)."""
    counted = [(n, meta_parameters(n)) for n in names]
    counted = [(n, c) for n, c in counted if c is not None]
    if not counted:
        raise ValueError(f"no model of {names[:3]}... builds on the meta device")
    return min(counted, key=lambda nc: nc[1])


# ---- building -------------------------------------------------------------------------------------
class MultiheadAttentionNet(nn.Module):
    """An OpenCLIP-style ViT block stack on nn.MultiheadAttention (in_proj_weight + out_proj), NCHW images in."""

    def __init__(self, dim: int = 32, depth: int = 2, patch: int = 8, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(3, dim, patch, stride=patch)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            ln_1=nn.LayerNorm(dim), attn=nn.MultiheadAttention(dim, 4, batch_first=True), ln_2=nn.LayerNorm(dim),
            mlp=nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)))) for _ in range(depth))
        self.head = nn.Linear(dim, num_classes)
        self.pretrained_cfg = {"first_conv": "conv1", "classifier": "head"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).flatten(2).transpose(1, 2)
        for block in self.blocks:
            h = block["ln_1"](x)
            x = x + block["attn"](h, h, h, need_weights=False)[0]
            x = x + block["mlp"](block["ln_2"](x))
        return self.head(x.mean(1))


def create(name: str, kwargs: dict) -> nn.Module:
    """A seeded, eval-mode model: a timm model (pretrained=False, NUM_CLASSES) or a synthetic family's."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "torch_multihead_attention":
            model = MultiheadAttentionNet(**kwargs)
        else:
            model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kwargs)
    model.conformance_woken = wake_zero_inits(model)
    return model.eval()


@torch.no_grad()
def wake_zero_inits(model: nn.Module) -> list[str]:
    """Give timm's all-zero initial parameters (a classifier, the last norm of residual branches, skip-init gains,
    biases) the non-zero values a trained model has: at zero, a random model ignores the layers behind them
    (a LayerNorm over one channel outputs its bias: CSATv2). Gains become 1, the rest N(0, 0.02). Returns the
    names changed."""
    woken = []
    generator = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if not p.is_floating_point() or p.numel() == 0 or p.count_nonzero() > 0:
            continue
        if p.dim() >= 2 or name.endswith("bias"):
            p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
        else:
            p.fill_(1.0)
        woken.append(name)
    return woken


def accepts_img_size(name: str) -> bool:
    """Whether the model's constructor takes img_size (ViT-likes: positional tables are built for it), tried
    on the meta device at the model's own default size."""
    return meta_parameters_with(name, {"img_size": default_side(name)}) is not None


def default_side(name: str) -> int:
    cfg = timm.get_pretrained_cfg(name)
    size = getattr(cfg, "input_size", None) or (3, 224, 224)
    return int(size[-1])


def input_sides(name: str) -> list[int]:
    """The square input sides tried for a model, smallest first: SIZES and its pretrained default."""
    return [32] if name in SYNTHETIC else sorted({*SIZES, default_side(name)})


def smallest_input(name: str, kwargs: dict, above: int = 0) -> tuple[int, dict, nn.Module]:
    """(side, kwargs, model): the smallest square input side above `above` the model runs on, with img_size
    passed to constructors that take it."""
    with_img = name not in SYNTHETIC and accepts_img_size(name)
    errors = []
    for side in (s for s in input_sides(name) if s > above):
        extra = {**kwargs, "img_size": side} if with_img else kwargs
        try:
            model = create(name, extra)
            with torch.no_grad():
                model(torch.randn(1, 3, side, side))
            return side, extra, model
        except Exception as e:
            errors.append(f"{side}: {type(e).__name__}: {str(e)[:80]}")
    raise RuntimeError("no input size works: " + " | ".join(errors[-2:]))


# ---- presets and what they select -----------------------------------------------------------------
def targets_or_none(model: nn.Module, preset: str) -> list[str]:
    try:
        return find_targets(model, LoraConfig(targets=preset))
    except ValueError:
        return []


def family_preset(model: nn.Module) -> str:
    """`vit` for transformers (attention, no conv beyond the stem), `conv` for CNNs, `all` for hybrids."""
    vit = targets_or_none(model, "vit")
    attention = any("attn." in n for n in vit)
    edges = stem_names(model) + classifier_names(model)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n not in edges]
    if attention:
        return "all" if convs else "vit"
    if convs:
        return "conv"
    return "vit" if vit else "all"


def layer_kind(m: nn.Module) -> str:
    """A short name for an adaptable layer's geometry: Linear, 1x1, kxk, dw, grouped, kx1 (+ subclass)."""
    if isinstance(m, nn.Linear):
        kind = "Linear"
    elif isinstance(m, nn.MultiheadAttention):
        return "MHA in_proj"
    elif isinstance(m, nn.Conv1d):
        kind = "conv1d"
    elif m.groups > 1:
        kind = "dw" if m.groups == m.in_channels == m.out_channels else "grouped"
    elif tuple(m.kernel_size) == (1, 1):
        kind = "1x1"
    else:
        kind = "kx1" if 1 in tuple(m.kernel_size) else "kxk"
    if type(m) not in (nn.Linear, nn.Conv1d, nn.Conv2d):
        kind += f"({type(m).__name__})"
    return kind


def skipped_layers(model: nn.Module, targets: list[str]) -> dict[str, str]:
    """Weight-bearing layers the preset leaves alone, by kind, with why: {"Conv1d x2": reason, ...}. The layers
    vislora cannot adapt and why come from vislora.inject.unadaptable_layers."""
    chosen, edges = set(targets), set(stem_names(model) + classifier_names(model))
    counts: Counter = Counter()
    reasons = {"stem/classifier": "presets never adapt them"}
    for why in unadaptable_layers(model).values():
        kind, _, reason = why.partition(": ")
        counts[kind] += 1
        reasons[kind] = reason
    for name, m in model.named_modules():
        if name in chosen:
            continue
        if name in edges:
            counts["stem/classifier"] += 1
        elif isinstance(m, (nn.Linear, nn.Conv2d)) and not any(name.startswith(e + ".") for e in edges):
            counts[f"{layer_kind(m)}: not in preset"] += 1
    return {f"{k} x{n}": reasons.get(k, "the preset does not select it") for k, n in sorted(counts.items())}


# ---- the tensors a check perturbs -----------------------------------------------------------------
def layer_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that carry an adapter's update, by kind: each, moved alone, must move the model output.
    vislora: lora_B (DoRA's magnitude m joins here); PEFT: its default lora_B weight."""
    if isinstance(layer, LoraLayer):
        roles = layer.update.factor_roles()
        return {"lora_B": layer.lora_B, **({"magnitude": roles["magnitude"][0]} if "magnitude" in roles else {})}
    return {"lora_B": layer.lora_B["default"].weight}


@torch.no_grad()
def perturb(tensors: dict[str, torch.Tensor], generator: torch.Generator, scale: float = 0.1) -> None:
    """Move each tensor by a random step: relative to its size if it has one, else of std `scale` (B = 0)."""
    for t in tensors.values():
        size = float(t.abs().max())
        step = torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t)
        t.add_(step * scale * (size if size > 0 else 1.0))


@torch.no_grad()
def set_update_scale(layer: nn.Module, delta: Callable[[], torch.Tensor], weight: torch.Tensor,
                     generator: torch.Generator, scale: float = UPDATE_SCALE) -> None:
    """A random B such that ||delta W|| = scale * ||W||: the update is felt, in every layer, without blowing up."""
    b = layer_tensors(layer)["lora_B"]
    b.copy_(torch.randn(b.shape, generator=generator).to(b))
    norm = float(delta().float().norm())
    if norm > 0:
        b.mul_(scale * float(weight.float().norm()) / norm)


def vislora_randomize(model: nn.Module, seed: int = 1) -> None:
    """Every vislora adapter gets a random update of UPDATE_SCALE relative size."""
    generator = torch.Generator().manual_seed(seed)
    for _, layer in lora_layers(model):
        set_update_scale(layer, layer.delta_weight, layer.base_layer.get_parameter(layer.weight_name), generator)


# ---- measuring ------------------------------------------------------------------------------------
def flatten(out) -> torch.Tensor:
    """A model output (a tensor, or tuples / dicts of them) as one vector in the output's dtype."""
    parts = out if isinstance(out, (tuple, list)) else list(out.values()) if isinstance(out, dict) else [out]
    return torch.cat([p.reshape(-1) for p in parts if torch.is_tensor(p)])


def flat_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's output as one float64 vector, without autograd."""
    with torch.no_grad():
        return flatten(model(x)).double()


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (inf where shapes differ or values are not finite)."""
    if a.shape != b.shape:
        return math.inf
    diff = float((a - b).abs().max()) / max(float(b.abs().max()), 1e-30)
    return diff if math.isfinite(diff) else math.inf


def in_float64(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    """The model and input in float64 where the model runs there (a 1e-6 layer scale stays visible), else fp32."""
    try:
        model.double()
        flat_output(model, x.double())
        return model, x.double()
    except Exception:
        return model.float(), x.float()


def forward_change(model: nn.Module, layer: nn.Module, x: torch.Tensor, y0: torch.Tensor,
                   generator: torch.Generator, scale: float = 0.1) -> float:
    """Relative output change when only this adapter's layer_tensors are perturbed (restored afterwards)."""
    tensors = layer_tensors(layer)
    saved = {k: t.detach().clone() for k, t in tensors.items()}
    perturb(tensors, generator, scale)
    change = rel_diff(flat_output(model, x), y0)
    with torch.no_grad():
        for k, t in tensors.items():
            t.copy_(saved[k])
    return change


def gradient_reaches(model: nn.Module, layers: list[tuple[str, nn.Module]], x: torch.Tensor) -> list[bool]:
    """One backward pass in eval mode: for each adapter, whether a random projection of the output has a
    non-zero gradient in its layer_tensors. Non-zero means a small perturbation moves the output (live)."""
    tensors = [list(layer_tensors(layer).values()) for _, layer in layers]
    flat = [t for group in tensors for t in group]
    wanted = [t.requires_grad for t in flat]
    for t in flat:
        t.requires_grad_(True)
    try:
        y = flatten(model(x))
        projection = torch.randn(y.shape, generator=torch.Generator().manual_seed(4), dtype=y.dtype)
        grads = iter(torch.autograd.grad((y * projection).sum(), flat, allow_unused=True))
    finally:
        for t, w in zip(flat, wanted, strict=True):
            t.requires_grad_(w)
    return [any(g is not None and bool(g.abs().max() > 0) for g in (next(grads) for _ in group)) for group in tensors]


def probe_layer(model: nn.Module, layer: nn.Module, x: torch.Tensor, y0: torch.Tensor, noise: float) -> dict:
    """How the model treats one layer at this input, whatever its adapter does: is the layer called, is its
    input all zero, does a small change of its output (1e-3 of its size) move the model output?"""
    seen: dict = {"called": False, "zero_input": False}
    generator = torch.Generator().manual_seed(5)

    def nudge(module, args, out):
        seen["called"], seen["zero_input"] = True, bool(args[0].count_nonzero() == 0)
        step = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(out)
        return out + step * 1e-3 * out.detach().abs().max().clamp_min(1e-12)

    handle = layer.register_forward_hook(nudge)
    try:
        seen["output_moves"] = rel_diff(flat_output(model, x), y0) > noise
    finally:
        handle.remove()
    return seen


def classify(moved: bool, probe: dict) -> str:
    """An adapter without gradient: "inert" where no weight of this layer could matter at this input (zero
    input, an output the model ignores or saturates), "untrainable" where it moves the output without a gradient
    (a detached read of its weight), else "dead": the model does not run the adapter (bypassed)."""
    if probe["called"] and (probe["zero_input"] or not probe["output_moves"]):
        return "inert"
    if moved:
        return "untrainable"
    return "dead"


def check_live(model: nn.Module, layers: list[tuple[str, nn.Module]], x: torch.Tensor, mode: str = "gradient"
               ) -> dict:
    """Is each adapter on the output's path? "gradient": one backward pass screens every adapter; "forward":
    none is screened. Each adapter left is perturbed alone in forward passes, its layer probed (probe_layer) and
    classified: dead (bypassed), untrainable (moves the output, no gradient) or inert (nothing this layer does
    matters at this input: a dead ReLU, attention over a single token). Float64 where the model runs in it."""
    model, x = in_float64(model, x)
    y0 = flat_output(model, x)
    noise = rel_diff(flat_output(model, x), y0)  # CPU kernels are deterministic: 0 expected
    reached = gradient_reaches(model, layers, x) if mode == "gradient" else [False] * len(layers)
    generator, found = torch.Generator().manual_seed(2), {"dead": [], "untrainable": [], "inert": []}
    for (name, layer), has_gradient in zip(layers, reached, strict=True):
        if has_gradient:
            continue
        change = max(forward_change(model, layer, x, y0, generator, scale) for scale in CONFIRM_SCALES)
        if change > noise and mode == "forward":
            continue
        found[classify(change > noise, probe_layer(model, layer, x, y0, noise))].append(name)
    model.float()
    return {"layers": len(layers), "live": len(layers) - len(found["dead"]) - len(found["inert"]),
            "dead": found["dead"], "no_gradient": found["untrainable"], "inert": found["inert"], "mode": mode,
            "dtype": str(x.dtype)[6:], "noise": noise}


def check_trains(model: nn.Module, layers: list[tuple[str, nn.Module]], x: torch.Tensor) -> dict:
    """One AdamW step in train mode on random labels: the loss is finite and every adapter's tensors change."""
    torch.manual_seed(3)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    before = [{k: t.detach().clone() for k, t in layer_tensors(layer).items()} for _, layer in layers]
    out = model(x)
    out = out[0] if isinstance(out, (tuple, list)) else out
    loss = F.cross_entropy(out.float(), torch.randint(0, NUM_CLASSES, (x.shape[0],)))
    loss.backward()
    optimizer.step()
    model.eval()
    frozen = [name for (name, layer), old in zip(layers, before, strict=True)
              if all(torch.equal(t, old[k]) for k, t in layer_tensors(layer).items())]
    value = loss.item()
    return {"loss": value, "finite": math.isfinite(value), "unchanged": frozen}


def merge_errors(model: nn.Module, base: nn.Module, x: torch.Tensor, merging: tuple[Callable, Callable] | None = None
                 ) -> dict:
    """How much the (random) update moves the output, merged vs unmerged, and whether unmerge restores it.
    merging: (merge, unmerge) of the model, vislora's by default."""
    do_merge, do_unmerge = merging or (lambda: merge(model), lambda: unmerge(model))
    y = flat_output(model, x)
    do_merge()
    y_merged = flat_output(model, x)
    do_unmerge()
    return {"update_change": rel_diff(y, flat_output(base, x)), "merge_err": rel_diff(y_merged, y),
            "unmerge_restores": torch.equal(flat_output(model, x), y)}


def masked(errors: dict) -> bool:
    """Whether the update moves the fp32 output so little (a 1e-6 layer scale) that merged == unmerged in fp32
    proves nothing: then merge_error_per_update decides."""
    return errors["update_change"] < MASKED_BELOW


def merge_error_per_update(model: nn.Module, base: nn.Module, x: torch.Tensor,
                           merging: tuple[Callable, Callable] | None = None) -> float | None:
    """In float64: |merged - unmerged| / |unmerged - base|. Near 0 even where a 1e-6 layer scale hides the
    update from an fp32 comparison; near 1 where merging loses or doubles it. None if float64 does not run."""
    model, x64 = in_float64(model, x)
    if x64.dtype != torch.float64:
        return None
    errors = merge_errors(model, copy.deepcopy(base).double(), x64, merging)
    model.float()
    return errors["merge_err"] / max(errors["update_change"], 1e-300)


def trainable_copy(model: nn.Module) -> tuple[nn.Module, list[tuple[str, nn.Module]]]:
    """A copy of an adapted model and its adapters, so that a training step leaves the original alone."""
    model = copy.deepcopy(model)
    return model, list(lora_layers(model))


def check_exact(model: nn.Module, base: nn.Module, x: torch.Tensor) -> tuple[dict, nn.Module]:
    """Random updates; merged vs unmerged output (fp32, and per unit of update in float64); unload; no vislora
    class left; the plain state_dict loads into the untouched base model (strict). (report, unloaded model)."""
    vislora_randomize(model)
    report = merge_errors(model, base, x)
    report["merge_err_per_update"] = merge_error_per_update(model, base, x) if masked(report) else None
    y = flat_output(model, x)
    plain = unload(model)
    report["unload_err"] = rel_diff(flat_output(plain, x), y)
    report["leftover_classes"] = sorted({type(m).__name__ for m in plain.modules()
                                         if type(m).__module__.startswith("vislora")})
    fresh = copy.deepcopy(base)
    missing, unexpected = fresh.load_state_dict(plain.state_dict(), strict=False)
    report.update(missing_keys=list(missing)[:5], unexpected_keys=list(unexpected)[:5],
                  reload_err=rel_diff(flat_output(fresh, x), flat_output(plain, x)))
    per_update = report["merge_err_per_update"]
    report["ok"] = (report["merge_err"] <= EXACT_TOL and report["unload_err"] <= EXACT_TOL
                    and (per_update is None or per_update <= PER_UPDATE_TOL) and report["unmerge_restores"]
                    and not report["leftover_classes"] and not missing and not unexpected
                    and report["reload_err"] <= EXACT_TOL)
    return report, plain


# ---- export ---------------------------------------------------------------------------------------
def export_diffs(model: nn.Module, x: torch.Tensor, folder: Path) -> dict:
    """Trace to TorchScript and export to ONNX (vislora.export), run each, and compare with PyTorch."""
    y = flat_output(model, x)
    scale = max(1.0, float(y.abs().max()))
    result = {}
    for fmt in ("torchscript", "onnx"):
        try:
            if fmt == "torchscript":
                path = export_torchscript(model, x, folder / "model.pt")
                with quiet_jit():
                    got = flat_output(torch.jit.load(str(path)), x)
            else:
                path = export_onnx(model, x, folder / "model.onnx", dynamic_batch=False)
                predictor, _ = onnx_predictor(path)
                got = torch.from_numpy(predictor(x.numpy())).reshape(-1).double()
            err = float((got - y).abs().max()) / scale if got.shape == y.shape else math.inf
            result[fmt] = {"ok": err <= EXPORT_TOL, "diff": err}
        except Exception as e:
            result[fmt] = {"ok": False, "error": one_line(e)}
    return result


def check_export(plain: nn.Module, base: nn.Module, x: torch.Tensor) -> dict:
    """Export the unloaded model; where a format fails, export the untouched base model too: if that fails
    as well, the limit is timm's (or torch's), not vislora's."""
    with tempfile.TemporaryDirectory() as tmp:
        result = export_diffs(plain, x, Path(tmp) / "merged")
        if not all(r["ok"] for r in result.values()):
            base_result = export_diffs(copy.deepcopy(base), x, Path(tmp) / "base")
            for fmt, r in result.items():
                r["base_ok"] = base_result[fmt]["ok"]
                if not base_result[fmt]["ok"]:
                    r["base_error"] = base_result[fmt].get("error", f"diff {base_result[fmt].get('diff')}")
    return result


# ---- one preset, one family -----------------------------------------------------------------------
def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def run_vislora(base: nn.Module, preset: str, x: torch.Tensor) -> tuple[dict, nn.Module | None]:
    """Every vislora check of one preset on a copy of the base model; (report, unloaded model or None)."""
    model = copy.deepcopy(base)
    report: dict = {"preset": preset}
    try:
        targets = find_targets(model, LoraConfig(targets=preset))
    except ValueError as e:
        report.update(adapted=0, refused=one_line(e), skipped=skipped_layers(model, []))
        return report, None
    report["adapted"] = len(targets)
    report["kinds"] = dict(Counter(layer_kind(model.get_submodule(n)) for n in targets))
    report["skipped"] = skipped_layers(model, targets)
    try:
        inject(model, LoraConfig(targets=preset))
    except Exception as e:
        report["refused"] = one_line(e)
        return report, None
    layers, plain, seconds = list(lora_layers(model)), None, {}
    for stage, fn in (("live", lambda: check_live(model, layers, x[:1])),
                      ("trains", lambda: check_trains(*trainable_copy(model), x)),
                      ("exact", lambda: check_exact(model, base, x))):
        start = time.perf_counter()
        try:
            report[stage] = fn()
        except Exception as e:
            report[stage] = {"error": one_line(e), "ok": False}
        seconds[stage] = round(time.perf_counter() - start, 2)
    if isinstance(report["exact"], tuple):
        report["exact"], plain = report["exact"]
    inert = set(report["live"].get("inert", []))
    if inert and "unchanged" in report["trains"]:  # no step can move an inert layer's adapter at this input
        report["trains"]["unchanged"] = [n for n in report["trains"]["unchanged"] if n not in inert]
    report["seconds"] = seconds
    return report, plain


def peft_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """PEFT's LoRA layers of a PeftModel, by their name in the base model."""
    prefix = "base_model.model."
    return [(n.removeprefix(prefix), m) for n, m in model.named_modules() if isinstance(m, PeftLoraLayer)]


def peft_randomize(layers: list[tuple[str, nn.Module]], seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _, layer in layers:
        set_update_scale(layer, lambda layer=layer: layer.get_delta_weight("default"), layer.get_base_layer().weight,
                         generator)


def peft_refusal(module: nn.Module, seen: dict) -> str | None:
    """Why PEFT's LoRA (r=8) refuses to wrap a layer of this kind (type, groups), or None: measured once per kind
    on a copy of the layer alone."""
    key = (type(module).__name__, getattr(module, "groups", 1))
    if key not in seen:
        holder = nn.Module()
        holder.layer = copy.deepcopy(module)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                get_peft_model(holder, PeftLoraConfig(r=8, lora_alpha=16, target_modules=["layer"]))
            seen[key] = None
        except Exception as e:
            seen[key] = one_line(e)
    return seen[key]


def peft_outcome(model: nn.Module, base: nn.Module, layers: list[tuple[str, nn.Module]], x: torch.Tensor) -> dict:
    """PEFT's adapters: live, merged vs unmerged, merge_and_unload; result ok / bypass / inexact / refused / crash."""
    report: dict = {"wrapped": len(layers)}
    stage = "forward"
    try:
        report["live"] = check_live(model, layers, x[:1])
        stage = "merge"
        peft_randomize(layers)
        merging = (model.merge_adapter, model.unmerge_adapter)
        report.update(merge_errors(model, base, x, merging))
        report["merge_err_per_update"] = merge_error_per_update(model, base, x, merging) if masked(report) else None
        y = flat_output(model, x)
        report["unload_err"] = rel_diff(flat_output(model.merge_and_unload(), x), y)
    except NotImplementedError as e:
        return {**report, "result": "refused", "detail": f"{stage}: {one_line(e)}"}
    except Exception as e:
        return {**report, "result": "crash", "detail": f"{stage}: {one_line(e)}"}
    dead = report["live"]["dead"]
    if dead:
        report["result"], report["detail"] = "bypass", f"{len(dead)} of {len(layers)} adapters move nothing: {dead[0]}"
    elif not (report["merge_err"] <= EXACT_TOL and (report["merge_err_per_update"] or 0) <= PER_UPDATE_TOL):
        report["result"] = "inexact"
        report["detail"] = (f"merged vs unmerged {report['merge_err']:.1e} (fp32), "
                            f"{report['merge_err_per_update'] or 0:.1e} of the update (fp64)")
    else:
        report["result"] = "ok"
    return report


def run_peft(base: nn.Module, targets: list[str], x: torch.Tensor) -> dict:
    """PEFT's LoRA (r=8, alpha=16) on exactly `targets`, or on those of them it accepts: the layers it refuses
    (named by kind) and ok / bypass / inexact / refused / crash on the rest."""
    seen: dict = {}
    refused = {n: why for n in targets if (why := peft_refusal(base.get_submodule(n), seen))}
    accepted = [n for n in targets if n not in refused]
    report: dict = {"targets": len(targets), "refused_layers": len(refused),
                    "refusals": sorted(set(refused.values()))[:3]}
    if not accepted:
        return {**report, "result": "refused", "detail": f"all {len(targets)} layers: {report['refusals'][0]}"}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = get_peft_model(copy.deepcopy(base), PeftLoraConfig(r=8, lora_alpha=16, target_modules=accepted))
        report["warnings"] = sorted({str(w.message)[:120] for w in caught if "LoRA" in str(w.message)})
    except Exception as e:
        return {**report, "result": "refused", "detail": one_line(e)}
    report.update(peft_outcome(model, base, peft_layers(model), x))
    if refused and report["result"] == "ok":
        kinds = ", ".join(f"{k} {v}" for k, v in Counter(layer_kind(base.get_submodule(n)) for n in refused).items())
        report["result"] = "refused"
        report["detail"] = (f"{len(refused)} of {len(targets)} layers ({kinds}): {report['refusals'][0]}; "
                            f"the other {len(accepted)}: ok")
    elif refused:
        report["detail"] += f" (and {len(refused)} layers refused)"
    return report


def reparameterizable(model: nn.Module) -> bool:
    """Whether timm can fuse the model for deployment (RepVGG / MobileOne branches, conv + BN folding)."""
    return any(hasattr(m, a) for m in model.modules() for a in REPARAM_METHODS)


def fused_output_err(model: nn.Module, x: torch.Tensor) -> tuple[float, nn.Module]:
    """(relative output change, fused copy) when timm's reparameterize_model fuses a copy of the model."""
    fused = reparameterize_model(model)
    return rel_diff(flat_output(fused, x), flat_output(model, x)), fused


def check_reparam(base: nn.Module, plain: nn.Module, x: torch.Tensor) -> dict:
    """A reparameterisable model: the unloaded model still fuses to the same output (deploy); fusing a model that
    still carries adapters keeps their update or fails loudly, never drops it (fuse_adapted); and the deployed,
    fused base model adapted by `all` is live and exact (deployed)."""
    base_err, fused_base = fused_output_err(base, x)
    tol = max(10 * base_err, EXACT_TOL)  # folding BatchNorm rounds on its own
    report: dict = {"fusion_err": base_err, "tol": tol}
    report["deploy_err"] = fused_output_err(plain, x)[0]
    adapted = copy.deepcopy(base)
    inject(adapted, LoraConfig(targets="all"), verify=False)
    vislora_randomize(adapted)
    try:
        err, fused = fused_output_err(adapted, x)
        left = sum(1 for _ in lora_layers(fused))
        report["fuse_adapted"] = "keeps the update" if err <= tol else \
            f"drops the update (silent): output moves {err:.1e}, {left} adapters left"
    except Exception as e:
        report["fuse_adapted"] = f"fails loudly: {one_line(e)}"
    report["deployed"], _ = run_vislora(fused_base, "all", x)
    report["ok"] = (report["deploy_err"] <= tol and not report["fuse_adapted"].startswith("drops")
                    and run_status(report["deployed"])["failed"] == "")
    return report


def dead_layers(result: dict) -> int:
    """How many adapters of a family result's vislora runs are dead or inert at this input."""
    return sum(len(run.get("live", {}).get(k, [])) for run in result["runs"].values() for k in ("dead", "inert"))


def run_at(family: str, name: str, side: int, kwargs: dict, base: nn.Module) -> dict:
    """Every check of one family's model at one input side: its preset and `all` in vislora, the export of the
    unloaded `all` model, PEFT on the preset's layers."""
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    preset = family_preset(base)
    result = {"family": family, "model": name, "kwargs": dict(kwargs), "input": side,
              "params": sum(p.numel() for p in base.parameters()), "preset": preset,
              "woken": len(base.conformance_woken), "runs": {}}
    plain = None
    for p in dict.fromkeys((preset, "all")):
        result["runs"][p], unloaded = run_vislora(base, p, x)
        plain = unloaded if unloaded is not None else plain
    if plain is not None and reparameterizable(base):
        result["reparam"] = check_reparam(base, plain, x)
    start = time.perf_counter()
    if plain is not None:
        result["export"] = check_export(plain, base, x)
    targets = targets_or_none(base, preset)
    middle = time.perf_counter()
    result["peft"] = run_peft(base, targets, x) if targets else {"result": "n/a", "detail": "no vislora targets"}
    result["seconds"] = {"export": round(middle - start, 2), "peft": round(time.perf_counter() - middle, 2)}
    return result


def run_family(family: str, name: str, kwargs: dict, retries: int = LARGER_INPUT_RETRIES) -> dict:
    """run_at the smallest input the model accepts; where adapters are dead there (attention over a single
    token ignores its queries and keys), again at larger inputs, noting what the smaller one showed."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    side, built_with, base = smallest_input(name, kwargs)
    result = run_at(family, name, side, built_with, base)
    smaller = []
    while dead_layers(result) and retries > 0 and side < max(input_sides(name)):
        smaller.append({"input": side, "dead": dead_layers(result)})
        try:
            side, built_with, base = smallest_input(name, kwargs, above=side)
        except RuntimeError:
            break
        result, retries = run_at(family, name, side, built_with, base), retries - 1
        if dead_layers(result) >= smaller[-1]["dead"]:  # a larger input does not help (a dead ReLU): stop
            break
    result["smaller_inputs"] = smaller
    result["time_s"] = round(time.perf_counter() - start, 1)
    return result


# ---- isolation: one forked child per family -------------------------------------------------------
def _child(conn, family: str, name: str, kwargs: dict) -> None:
    """Run one family, quietly (exporters and timm print a lot), and send its result to the parent."""
    warnings.simplefilter("ignore")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    try:
        result = run_family(family, name, kwargs)
    except Exception as e:
        result = {"family": family, "model": name, "error": one_line(e), "trace": traceback.format_exc()[-800:]}
    conn.send(result)
    conn.close()


def run_isolated(family: str, name: str, kwargs: dict, budget_s: float) -> dict:
    """run_family in a forked child (the parent's imports are shared): a hang past budget_s is killed, a
    segfault or an out-of-memory kill is one failed row."""
    start = time.perf_counter()
    parent, child = multiprocessing.Pipe(duplex=False)
    process = multiprocessing.get_context("fork").Process(target=_child, args=(child, family, name, kwargs))
    process.start()
    child.close()
    result = parent.recv() if parent.poll(budget_s) else None
    process.join(5)
    if process.is_alive():
        os.kill(process.pid, signal.SIGKILL)
        process.join()
    if result is None:
        why = f"over the {budget_s:.0f} s budget" if process.exitcode in (None, -signal.SIGKILL) else \
            f"the process died (exit code {process.exitcode})"
        result = {"family": family, "model": name, "error": f"Timeout: {why}"}
    result["wall_s"] = round(time.perf_counter() - start, 1)
    return result


def select_models(families: list[str], cache: Path | None = SELECTION_CACHE) -> dict[str, tuple[str, int | None]]:
    """family -> (its smallest model, parameter count); synthetic families are their own model. Kept in `cache`
    per timm version: measuring every model on the meta device takes minutes."""
    stored = json.loads(cache.read_text()) if cache and cache.exists() else {}
    known = stored.get(timm.__version__, {})
    catalogue = family_models() if any(f not in known and f not in SYNTHETIC for f in families) else {}
    chosen = {}
    for family in families:
        if family in SYNTHETIC:
            chosen[family] = (family, None)
        else:
            chosen[family] = tuple(known.get(family) or smallest_variant(catalogue[family]))
            known[family] = list(chosen[family])
    if cache:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({**stored, timm.__version__: known}, indent=1))
    return chosen


# ---- the table ------------------------------------------------------------------------------------
def run_status(run: dict) -> dict[str, str]:
    """One preset's cells: adapted, live, exact (as short strings) and whether it failed anywhere."""
    if "refused" in run:
        return {"adapted": "0", "live": "refused", "exact": "-", "trains": "-", "failed": "",
                "why": run["refused"]}
    live, exact, trains = run.get("live", {}), run.get("exact", {}), run.get("trains", {})
    live_cell = f"{live['live']}/{live['layers']}" if "live" in live else f"error ({live.get('error', '?')})"
    exact_cell = f"{exact['merge_err']:.0e}" if exact.get("ok") else "**no**: " + exact_reason(exact)
    if exact.get("ok") and exact.get("merge_err_per_update") is not None:  # fp32 hardly saw the update
        exact_cell += f" (fp64: {exact['merge_err_per_update']:.0e} of the update)"
    grads = "error" if "error" in trains else "ok" if trains.get("finite") and not trains.get("unchanged") else \
        f"**{len(trains.get('unchanged', []))} frozen**" if trains.get("finite") else "**loss not finite**"
    failed = "error" in live or live.get("dead") or live.get("no_gradient") or not exact.get("ok") or grads != "ok"
    if live.get("dead"):
        live_cell = f"**{live_cell}**"
    if live.get("inert"):
        live_cell += f" ({len(live['inert'])} inert)"
    if live.get("no_gradient"):
        live_cell += f" (**{len(live['no_gradient'])} without gradient**)"
    return {"adapted": f"{run['adapted']}", "live": live_cell,
            "exact": exact_cell, "trains": grads, "failed": "yes" if failed else "", "why": ""}


def exact_reason(exact: dict) -> str:
    """The first exactness check a run failed, with its value."""
    if "error" in exact:
        return exact["error"]
    failed = {"merge_err": exact.get("merge_err", 0) > EXACT_TOL,
              "merge_err_per_update": (exact.get("merge_err_per_update") or 0) > PER_UPDATE_TOL,
              "unload_err": exact.get("unload_err", 0) > EXACT_TOL, "leftover_classes": exact.get("leftover_classes"),
              "missing_keys": exact.get("missing_keys"), "unexpected_keys": exact.get("unexpected_keys"),
              "reload_err": exact.get("reload_err", 0) > EXACT_TOL,
              "unmerge_restores": not exact.get("unmerge_restores")}
    return next((f"{key} {exact.get(key)}" for key, bad in failed.items() if bad), "?")


def export_cell(export: dict | None) -> str:
    """'ok', or per format why not; 'timm' where the base model does not export either."""
    if not export:
        return "-"
    cells = []
    for fmt, short in (("torchscript", "TS"), ("onnx", "ONNX")):
        r = export.get(fmt, {})
        if not r.get("ok"):
            cells.append(f"{short}: timm's limit" if r.get("base_ok") is False else f"**{short}: fails**")
    return "ok" if not cells else ", ".join(cells)


PEFT_PHRASES = {"rank is divisible by groups": "needs r % groups == 0"}  # long PEFT messages, shortened


def peft_cell(peft: dict) -> str:
    """PEFT's result and, unless ok, its one-line detail (long PEFT messages shortened)."""
    result, detail = peft.get("result", "?"), peft.get("detail", "")
    for phrase, short in PEFT_PHRASES.items():
        if phrase in detail:
            head, _, tail = detail.partition("ValueError: ")
            detail = head + short + ("; " + tail.split("; ", 1)[1] if "; " in tail else "")
    return result if result in ("ok", "n/a") else f"{result}: {detail[:110]}".replace("|", "/")


def family_row(r: dict) -> str:
    if "error" in r:
        return f"| {r['family']} | {r['model']} | - | - | - | - | - | - | - | crash: {r['error'][:100]} |"
    main, every = run_status(r["runs"][r["preset"]]), run_status(r["runs"]["all"])
    adapted = main["adapted"] if r["preset"] == "all" else f"{main['adapted']} / {every['adapted']}"
    live = main["live"] if r["preset"] == "all" else f"{main['live']} / {every['live']}"
    exact = main["exact"] if r["preset"] == "all" else f"{main['exact']} / {every['exact']}"
    trains = main["trains"] if r["preset"] == "all" else f"{main['trains']} / {every['trains']}"
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(r["runs"]["all"].get("kinds", {}).items()))
    skipped = "; ".join(k for k in r["runs"]["all"].get("skipped", {}) if not k.startswith("stem/"))
    shrunk = ", ".join(f"{k}={v}" for k, v in r["kwargs"].items() if k != "img_size")
    model = f"{r['model']} ({shrunk})" if shrunk else r["model"]
    side = f"{r['input']}" + "".join(f" ({s['input']}: {s['dead']} dead/inert)" for s in r.get("smaller_inputs", []))
    return (f"| {r['family']} | {model} | {side} | {r['preset']} | {adapted} | {kinds} | {live} | "
            f"{exact} | {trains} | {export_cell(r.get('export'))} | {peft_cell(r.get('peft', {}))} |"
            + (f" {skipped} |" if skipped else " |"))


def family_ok(r: dict) -> dict[str, bool]:
    """Per family: adapted at all, every adapter live, every run exact, trains, exports (or timm's limit)."""
    if "error" in r:
        return {"covered": False}
    runs = [run for run in r["runs"].values() if "refused" not in run]
    export = r.get("export") or {}
    return {"covered": bool(runs),
            "live": bool(runs) and all(not run.get("live", {}).get("dead", [1]) and not run["live"].get("no_gradient")
                                       for run in runs),
            "exact": bool(runs) and all(run.get("exact", {}).get("ok") for run in runs),
            "trains": bool(runs) and all(run_status(run)["trains"] == "ok" for run in runs),
            "exports": bool(export) and all(e.get("ok") for e in export.values()),
            "reparam": r.get("reparam", {}).get("ok", True),
            "timm_limit": any(e.get("base_ok") is False for e in export.values())}


def summary_line(results: list[dict]) -> str:
    """'N families: ...' as the README quotes it."""
    oks = [family_ok(r) for r in results]
    totals = Counter(key for o in oks for key, value in o.items() if value)
    inert = sum(1 for r in results if any(run.get("live", {}).get("inert") for run in r.get("runs", {}).values()))
    reparam = [r for r in results if "reparam" in r]
    fused = Counter(r["reparam"]["fuse_adapted"].split()[0] for r in reparam)
    peft = Counter(r.get("peft", {}).get("result", "crash") for r, o in zip(results, oks, strict=True) if o["covered"])
    count = totals.__getitem__
    synthetic = sum(r["family"] in SYNTHETIC for r in results)
    return (f"{len(results)} families ({len(results) - synthetic} timm modules + {synthetic} nn.MultiheadAttention "
            f"stack), {count('covered')} adapted by vislora: {count('live')} live "
            f"({inert} with layers inert at the tested input), {count('exact')} exact, {count('trains')} train, "
            f"{count('exports')} export to TorchScript and ONNX (+{count('timm_limit')} where the base model does "
            f"not: timm's limit); {sum(r['reparam']['ok'] for r in reparam)} of {len(reparam)} reparameterisable ones "
            f"fuse after unload (fused with adapters on: {fused['keeps']} keep the update, {fused['fails']} fail "
            f"loudly, {fused['drops']} drop it); PEFT on the same layers: {peft['ok']} ok, {peft['refused']} refused "
            f"(some or all layers), {peft['crash']} crash, {peft['bypass']} silent bypass, {peft['inexact']} inexact "
            "merge")


HEADER = """# Compatibility: every timm architecture family

Generated by `tools/conformance.py` from `compatibility.json` (timm {timm}, torch {torch}, peft {peft}; {seconds:.0f} s
on {threads} CPU thread(s)). One model per family (a timm model module): its smallest variant by parameter count
(a giant one with `depth=2`), random weights (`pretrained=False`; timm's all-zero initial parameters made non-zero,
as a trained model's are), `num_classes=7`, the smallest square input it accepts (larger where adapters were dead
or inert at the smallest one: the input cell names it). A cell pair is *family preset / `all`*.
`torch_multihead_attention` is not a timm family: an OpenCLIP-style stack of `nn.MultiheadAttention` blocks (timm
itself does not use that class).

- **adapted**: layers the preset adapts (their kinds: in `all`); **skipped**: weight-bearing layers `all` leaves.
- **live**: adapters on the output's path: a random projection of the output has a gradient in the adapter's B
  (float64 where the model runs in it), or, without one, perturbing B alone moves the output. Otherwise **dead**
  (the model bypasses the adapter), **without gradient** (it moves the output but cannot train) or *inert*
  (nothing the layer itself does matters at this input: its input is zero, or a small change of its output does
  not move the model's: a dead ReLU, attention over a single token).
- **exact**: max relative difference merged vs unmerged (fp32, a random update of 10% of each weight's norm; bar
  {exact:g}; where the update moves the fp32 output less than 1e-3, a 1e-6 layer scale, also in float64 per unit
  of update); unmerge restores; unload leaves no vislora class; its state_dict loads strictly into timm's model.
- **trains**: one AdamW step changes every adapter's B (inert ones aside), the loss is finite.
- **exports**: the unloaded `all` model traced to TorchScript and exported to ONNX, within {export:g} of PyTorch;
  "timm's limit" where the untouched base model fails the same way.
- **PEFT**: peft's LoRA (r=8, alpha=16) on exactly the layers the family preset adapts, or on those it accepts:
  ok; refused (layers it will not wrap, named by kind, the rest checked); crash; bypass (an adapter that moves
  nothing); inexact (merged != unmerged).

**{summary}.**

| family | model | input | preset | adapted | kinds (`all`) | live | exact | trains | exports | PEFT | skipped |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
"""


REPARAM_HEADER = """
## Reparameterisable families

timm fuses these for deployment (`timm.utils.reparameterize_model`: RepVGG / MobileOne branches, conv + BatchNorm
folding). **unloaded, fused**: the unloaded model's output after fusing (bar: 10x the fusion's own rounding on the
base model, at least {exact:g}); **fusing with adapters on**: what fusing a model that still carries adapters does
(timm reads each branch's `.weight`, which includes the update); **deployed form**: the fused base model adapted
by `all`.

| family | model | unloaded, fused | fusing with adapters on | deployed form: adapted, live, exact |
| --- | --- | --- | --- | --- |
"""


def reparam_row(r: dict) -> str:
    rep = r["reparam"]
    cells = run_status(rep["deployed"])
    deploy = f"{rep['deploy_err']:.0e}" if rep["deploy_err"] <= rep["tol"] else f"**{rep['deploy_err']:.0e}**"
    return (f"| {r['family']} | {r['model']} | {deploy} | {rep['fuse_adapted'][:110]} | {cells['adapted']}, "
            f"{cells['live']}, {cells['exact']} |")


FINDINGS = """
## What the suite found, and why

Written from the measurements above (the tool reruns them; this text it only copies).

- **PEFT silent bypass** (EVA, BEiT, Swin V2 `attn.qkv`; `nn.MultiheadAttention`'s `out_proj`): timm calls
  `F.linear(x, self.qkv.weight, qkv_bias)` and torch's attention reads `out_proj.weight`, so PEFT's wrapper is
  never called: its adapter trains nothing, and merging then applies an update the unmerged model never had.
  vislora's `weight` property carries the update on that path.
- **PEFT refusals**: depthwise and grouped convs where r=8 is not a multiple of `groups` ("Currently, support is
  limited to conv layers where the rank is divisible by groups"); the family's other layers are checked alone.
- **PEFT crashes**: grouped convs whose `groups` divides r wrap, but merging them fails in `get_delta_weight`
  (a conv of A and B without `groups`: "Given groups=1, weight of size ..."); DLA names its stem `base_layer`,
  PEFT's own attribute, and `merge_adapter` then calls `DLA.merge`; DaViT's forward through PEFT fails
  ("'Conv2d' object has no attribute 'kernel_size'").
- **Inert at the smallest input, live at a larger one** (LeViT, EfficientFormer V2, EfficientViT (MSRA), iFormer,
  MViT V2, GC ViT, Swin V2, Swin V2 CR; none dead): attention over a single token ignores its queries and keys
  (the softmax of one score is 1), 1x1 windows make relative-position MLPs irrelevant, GC ViT's global queries feed
  such an attention; at 64 or 96 px every adapter is live.
- **Inert at every input tried** (test_nfnet `stages.0.0.attn_last.fc1/fc2`): at random init the squeeze-excite
  ReLU is dead for every channel; the layers are called, and nothing they output reaches the logits.
- **Adapted since the first run**: `nn.MultiheadAttention` (its `in_proj_weight`, with q/k/v parts, and `out_proj`)
  and `nn.Conv1d` (EfficientViM's SSM projections, 18% of its parameters; CoaT's aggregate), live and exact.
- **Shared layers**: CoaT holds one set of conv position encodings in several blocks; each such layer gets one
  adapter that acts on every path (the second rerun refused CoaT: "already carries an adapter", now fixed).
- **Skipped, named**: `nn.ConvTranspose2d` (LowFormer's upsampling, 13%), `Conv3d`, `Embedding`: `inject` warns
  once, naming them.
- **Fusing a model that still carries adapters** fails loudly in EfficientViM, NextViT and RepGhost (timm's fuse
  code assigns or asserts on the wrapped layer); fusing after `unload` is exact everywhere.
- **ONNX export of Gemma 4's ViT** fails for the untouched timm model too (the exported graph is not
  topologically sorted): timm's (or torch's exporter's) limit.
"""


def render(results: list[dict], meta: dict) -> str:
    """docs/compatibility.md from the results."""
    ordered = sorted(results, key=lambda r: r["family"])
    text = HEADER.format(summary=summary_line(results), exact=EXACT_TOL, export=EXPORT_TOL, **meta)
    text += "\n".join(family_row(r) for r in ordered) + "\n"
    reparam = [r for r in ordered if "reparam" in r]
    if reparam:
        text += REPARAM_HEADER.format(exact=EXACT_TOL) + "\n".join(reparam_row(r) for r in reparam) + "\n"
    return text + (FINDINGS if len(results) > len(SYNTHETIC) + 50 else "")  # the notes describe a full run


# ---- command line ---------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="*", help="timm model modules (default: all, plus the synthetic ones)")
    parser.add_argument("--out", default="docs", help="folder for compatibility.json and compatibility.md")
    parser.add_argument("--budget", type=float, default=FAMILY_BUDGET_S, help="seconds per family")
    parser.add_argument("--resume", action="store_true",
                        help="keep the families already in the JSON (those named by --families run again)")
    parser.add_argument("--render", action="store_true", help="only write the markdown from the JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "compatibility.json"
    data = json.loads(json_path.read_text()) if (args.resume or args.render) and json_path.exists() else {}
    results = {r["family"]: r for r in data.get("results", [])}
    start = time.perf_counter() - (data.get("meta", {}).get("seconds", 0) if args.resume or args.render else 0)
    if not args.render:
        families = args.families or [*timm_registry.list_modules(), *SYNTHETIC]
        todo = families if args.families else [f for f in families if f not in results]  # named: run again
        chosen = select_models(todo)
        print(f"selected {len(chosen)} models in {time.perf_counter() - start:.0f} s", flush=True)
        for family, (name, params) in chosen.items():
            results[family] = run_isolated(family, name, shrink_kwargs(name, params), args.budget)
            r = results[family]
            print(f"{family:28s} {name:40s} {r['wall_s']:6.1f} s  {r.get('error', '')[:120]}", flush=True)
            meta = {"timm": timm.__version__, "torch": torch.__version__.split("+")[0], "peft": peft_version(),
                    "seconds": time.perf_counter() - start, "threads": torch.get_num_threads()}
            json_path.write_text(json.dumps({"meta": meta, "results": list(results.values())}, indent=1))
    data = json.loads(json_path.read_text())
    (out / "compatibility.md").write_text(render(data["results"], data["meta"]))
    print(summary_line(data["results"]))


def peft_version() -> str:
    return importlib.metadata.version("peft")


if __name__ == "__main__":
    main()
