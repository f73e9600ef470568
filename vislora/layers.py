"""Low-rank adapter layers: one wrapper that changes the raw weight of a Linear or any Conv2d
through an update.

The variant seam: a LoraLayer holds its updates by name (`updates`, today one: "default") and asks
the active one for the effective weight and for its parameters; nothing outside this file and
vislora.adapters reads the factors by name. The variants (vislora.variants) are small modules:
LowRank (LoRA, W' = W + s B A) and DoRA (W' = m * (W + s B A) / ||W + s B A||, a trained magnitude
per output row). It wraps nn.Linear, nn.Conv1d, nn.Conv2d and nn.MultiheadAttention (its stacked
in_proj_weight). A conv's weight is seen as the out x fan_in matrix (fan_in = in/groups * kh * kw),
so one definition serves 1x1, kxk, kx1/1xk, dilated, grouped and depthwise convs, and merging (W <-
W') is exact for both variants.

The forward pass picks the cheaper of two exact paths:
  * activation path: y = base(x) + s B (A x) (dense layers); DoRA scales it per output channel,
    y = (m / n) (base(x) - b + s B(Ax)) + b, with n^2 = ||W||^2 + 2s rowsum(B * (W A^T)) + s^2 rowsum((B A A^T) * B)
    computed from the factors, never forming W + s B A;
  * weight path: y = base(x; W'), which needs no extra activations (depthwise and grouped convs, convs that
    transform their weight inside forward, and code that reads `.weight` itself, e.g. EVA's F.linear).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Conv2dSame, ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame, pad_same
from torch.func import functional_call

from vislora.errors import VisloraError
from vislora.kernels import (  # noqa: F401  (depthwise_weight_grad: re-exported for tools and tests)
    AUTOCAST_DEVICES,
    _depthwise_on_cpu,
    _DepthwiseConv2d,
    _DoraLinear,
    _lora_linear,
    _LoraLinear,
    depthwise_weight_grad,
    scale_rows,
)
from vislora.variants import DoRA, LowRank, chunk_rows, full_precision  # noqa: F401  (re-exported)

DEFAULT = "default"  # the name of the update every run has today (state_dict: <layer>.updates.default.*)
# what a LoraLayer can wrap: each has one weight matrix (out x fan_in) its forward uses;
# nn.MultiheadAttention's is in_proj_weight (q, k and v stacked: qkv parts apply), its out_proj is a
# Linear of its own
ADAPTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.MultiheadAttention)
STANDARDISED = (StdConv2d, StdConv2dSame, ScaledStdConv2d, ScaledStdConv2dSame)  # forward normalises each filter


def raw_weight_name(base: nn.Module) -> str:
    """The dotted name of the parameter the layer's forward transforms into its weight.

    Plain layers: `weight`. torch parametrizations (e.g. orthogonal, spectral norm): the
    unconstrained `parametrizations.weight.original`; weight norm: its direction `original1` (same
    shape as the weight).
"""
    parametrizations = getattr(base, "parametrizations", None)
    if parametrizations is not None and "weight" in parametrizations:
        plist = parametrizations["weight"]
        if hasattr(plist, "original"):
            return "parametrizations.weight.original"
        return "parametrizations.weight.original1"
    if hasattr(base, "weight_v") and hasattr(base, "weight_g"):  # legacy torch.nn.utils.weight_norm
        return "weight_v"
    if isinstance(base, nn.MultiheadAttention):
        return "in_proj_weight"
    return "weight"


def max_rank(base: nn.Module, parts: int = 1) -> int:
    """Largest useful rank of one adapter part: min(out / parts, fan_in)."""
    w = base.get_parameter(raw_weight_name(base))
    return min(w.shape[0] // parts, w[0].numel())


def dora_refusal(base: nn.Module) -> str | None:
    """Why DoRA cannot act on this layer (None when it can): a forward that normalises each output
    filter (StdConv2d, ScaledStdConv2d) or transforms the weight (weight norm, parametrizations)
    cancels a magnitude."""
    if isinstance(base, STANDARDISED):
        return f"{type(base).__name__} standardises each output filter in its forward, which cancels DoRA's magnitude"
    if raw_weight_name(base) not in ("weight", "in_proj_weight"):
        return "its weight is re-parametrised (weight norm / torch parametrization), which rescales each row"
    return None


def upgrade_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoints written before the variant seam named the factors `<layer>.lora_A`; today they
    are `<layer>.updates.default.lora_A`: rename the old keys so old runs still resume."""
    out = {}
    for key, value in state.items():
        head, _, leaf = key.rpartition(".")
        if leaf in ("lora_A", "lora_B") and not head.endswith(f"updates.{DEFAULT}"):
            key = f"{head}.updates.{DEFAULT}.{leaf}" if head else f"updates.{DEFAULT}.{leaf}"
        out[key] = value
    return out


# ---- the layer -----------------------------------------------------------------------------------
class LoraLayer(nn.Module):
    """Wraps `base_layer` (nn.Linear or nn.Conv2d, subclasses included) with y = base(x; W'), W'
    given by the active update (LowRank, or DoRA with use_dora). r, alpha, rslora, qkv_parts: see
    LowRank. dropout applies to the adapter input on the activation path."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, qkv_parts: tuple[int, ...] | None = None, num_chunks: int = 3,
                 use_dora: bool = False, name: str = DEFAULT):
        super().__init__()
        if not isinstance(base_layer, ADAPTABLE):
            raise TypeError(f"LoRA supports {', '.join(t.__name__ for t in ADAPTABLE)}, not "
                            f"{type(base_layer).__name__}")
        if isinstance(base_layer, nn.MultiheadAttention) and not base_layer._qkv_same_embed_dim:
            raise VisloraError("this nn.MultiheadAttention keeps q, k and v projections apart (kdim/vdim != "
                             "embed_dim): only its stacked in_proj_weight can carry an adapter")
        self.base_layer = base_layer
        self.weight_name = raw_weight_name(base_layer)
        self.updates = nn.ModuleDict()
        self.add_update(name, r, alpha, rslora, qkv_parts, num_chunks, use_dora)
        self.active = name
        self._mixed: list[tuple[str, torch.Tensor]] | None = None  # vislora.named.mixed_forward's sample groups
        w = self.raw_weight()
        update = self.update
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self._original: torch.Tensor | None = None  # exact copy of the raw weight while merged
        self._merged_scale: torch.Tensor | None = None  # DoRA's g at merge time, to unmerge without the copy
        out, fan_in, parts = w.shape[0], w[0].numel(), len(update.qkv_parts or (0,))
        plain = type(base_layer) in (nn.Linear, nn.Conv2d) and self.weight_name == "weight"
        # Extra cost per output position: activation path R*(in*kk + out); weight path = the weight
        # gradient.
        act_cost = r * parts * (fan_in * getattr(base_layer, "groups", 1) + out)
        self.weight_path = not plain or (dropout == 0 and out * fan_in <= act_cost)

    def add_update(self, name: str, r: int, alpha: float, rslora: bool = False,
                   qkv_parts: tuple[int, ...] | None = None, num_chunks: int = 3, use_dora: bool = False) -> None:
        """A named update beside the others (LoRA, or DoRA with use_dora); it acts when `active` is
        its name."""
        if name in self.updates:
            raise VisloraError(f"the layer already carries an adapter named '{name}'")
        if use_dora and dora_refusal(self.base_layer):
            raise VisloraError(f"DoRA cannot adapt this {type(self.base_layer).__name__}: "
                             f"{dora_refusal(self.base_layer)}")
        w = self.raw_weight()
        dtype = w.dtype if w.dtype == torch.float64 else torch.float32  # adapters train in fp32 at least
        if use_dora:
            update = DoRA(w, r, alpha, rslora, qkv_parts, num_chunks, dtype)
        else:
            update = LowRank(w.shape[0], w[0].numel(), r, alpha, rslora, qkv_parts, num_chunks, w.device, dtype)
        self.updates[name] = update

    # ---- the active update, as the rest of vislora sees it ---------------------------------------
    @property
    def carries_active(self) -> bool:
        """The active adapter adapts this layer (with several adapters, one may leave it as the
        base)."""
        return self.active in self.updates

    @property
    def update(self) -> LowRank:
        if self.active not in self.updates:
            raise VisloraError(f"this layer carries no adapter named '{self.active}' ({', '.join(self.updates)})")
        return self.updates[self.active]

    def adapter_parameters(self) -> list[nn.Parameter]:
        """Every tensor the active adapter trains here (what set_trainable, counts, footprint and
        files use)."""
        return list(self.update.parameters()) if self.carries_active else []

    def adapter_numel(self) -> int:
        return sum(p.numel() for p in self.adapter_parameters())

    r = property(lambda self: self.update.r)
    alpha = property(lambda self: self.update.alpha)
    rslora = property(lambda self: self.update.rslora)
    scaling = property(lambda self: self.update.scaling)
    qkv_parts = property(lambda self: self.update.qkv_parts)
    num_chunks = property(lambda self: self.update.num_chunks)
    additive = property(lambda self: self.update.additive)
    lora_A = property(lambda self: self.update.lora_A)
    lora_B = property(lambda self: self.update.lora_B)

    def full_B(self, b: torch.Tensor | None = None) -> torch.Tensor:
        return self.update.full_B(b)

    def raw_weight(self) -> torch.Tensor:
        return self.base_layer.get_parameter(self.weight_name)

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The additive update s B A in the raw weight's shape (fp32, or the adapter dtype if
        wider)."""
        return self.update.delta(self.raw_weight().shape, dtype)

    def effective_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W' (raw form) as the forward uses it: the merged weight itself, else the active update
        applied."""
        w = self.raw_weight()
        if self.merged or not self.carries_active:
            return w if dtype is None else w.to(dtype)
        acc = dtype or torch.promote_types(w.dtype, torch.float32)
        return self.update.weight(w.to(acc))

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight, for code that reads `layer.weight` and calls F.linear itself (EVA,
        BEiT)."""
        w = self.base_layer.weight
        if self.merged or self.weight_name != "weight" or not self.carries_active:
            return w
        return self.update.weight(w)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    # ---- PiSSA: the adapter starts as the principal singular triplets ----------------------------
    @torch.no_grad()
    def init_pissa(self) -> None:
        """PiSSA: s B A = U_r S_r Vh_r and W <- W - s B A (rounded once into W's dtype), so the
        output is unchanged. The starting factors stay (LowRank.keep_start), with which
        vislora.svd.pissa_as_lora expresses the trained adapter relative to the original weight."""
        if self.merged:
            raise VisloraError(f"PiSSA init: the layer ({self.extra_repr()}) is merged: unmerge() it first")
        if not self.additive:
            raise VisloraError("PiSSA init needs an additive update (LoRA): DoRA's magnitude is not a low-rank part")
        if self.update.pissa:
            raise VisloraError(f"PiSSA init: the layer ({self.extra_repr()}) is already PiSSA-initialised")
        w = self.raw_weight()
        acc = torch.promote_types(w.dtype, torch.float32)
        mat = w.detach().to(acc).reshape(w.shape[0], -1)
        svds = []
        for rows in chunk_rows(w.shape[0], self.qkv_parts, self.num_chunks):
            u, s, vh = torch.linalg.svd(mat[rows], full_matrices=False)
            svds.append((u[:, :self.r], s[:self.r], vh[:self.r]))
        self.update.set_svd_factors(svds)
        w.copy_((w.detach().to(acc) - self.delta_weight(acc)).to(w.dtype))
        self.update.keep_start()

    # ---- merge / unmerge -------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, keep_original: bool = True) -> None:
        """W <- W', rounded once; with keep_original, unmerge later restores W bit-exactly."""
        if self.merged or not self.carries_active:
            return
        w = self.raw_weight()
        self._original = w.detach().clone() if keep_original else None
        if self.additive:
            w.copy_((w.to(torch.float32) + self.delta_weight()).to(w.dtype))
        else:
            v = w.to(torch.promote_types(w.dtype, torch.float32)) + self.delta_weight()
            self._merged_scale = self.update.scale(v.reshape(w.shape[0], -1).norm(dim=1)).detach()
            w.copy_((v * self._merged_scale.view(-1, *[1] * (w.dim() - 1))).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight (the exact copy if one was kept, else W' - s B A, or W' / g - s B
        A for DoRA)."""
        if not self.merged:
            return
        w = self.raw_weight()
        if self._original is not None:
            w.copy_(self._original)
        elif self.additive:
            w.copy_((w.to(torch.float32) - self.delta_weight()).to(w.dtype))
        else:
            g = self._merged_scale.view(-1, *[1] * (w.dim() - 1))
            w.copy_((w.to(torch.float32) / g - self.delta_weight()).to(w.dtype))
        self._original, self._merged_scale = None, None
        self.merged = False

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        base = self.base_layer
        if isinstance(base, nn.MultiheadAttention):  # (query, key, value, ...): in_proj_weight on the weight path
            return self._attention_forward(*args, **kwargs)
        (x,) = args
        if self._mixed is not None:
            return self._mixed_forward(x)
        if self.merged or not self.carries_active:
            return base(x)
        if self.weight_path:
            return self._weight_forward(x)
        hooked = bool(base._forward_hooks or base._forward_pre_hooks)
        if isinstance(base, nn.Linear) and not hooked and isinstance(self.dropout, nn.Identity):
            return self._linear_fused(x)
        return self._activation_forward(x, hooked)

    def _attention_forward(self, *args, **kwargs):
        """nn.MultiheadAttention with in_proj_weight = W' (its out_proj, a Linear, may carry an
        adapter of its own)."""
        base = self.base_layer
        if self._mixed is not None:
            raise VisloraError("mixed_forward: nn.MultiheadAttention layers are not supported: run the adapters apart")
        if self.merged or not self.carries_active:
            return base(*args, **kwargs)
        w_eff = self.update.weight(base.in_proj_weight)
        return functional_call(base, {"in_proj_weight": w_eff}, args, kwargs)

    def _weight_forward(self, x: torch.Tensor, update: LowRank | None = None) -> torch.Tensor:
        """y = base(x; W'): one conv / linear with the effective weight (depthwise convs,
        transformed weights)."""
        base = self.base_layer
        w_eff = (update or self.update).weight(base.get_parameter(self.weight_name))
        if type(base) is nn.Linear:
            return F.linear(x, w_eff, base.bias)
        if type(base) in (nn.Conv2d, Conv2dSame) and _depthwise_on_cpu(base, x):
            padding = base.padding
            if type(base) is Conv2dSame:  # timm's TF "same" padding: pad as its forward does, then conv
                x, padding = pad_same(x, base.kernel_size, base.stride, base.dilation), (0, 0)
            return _DepthwiseConv2d.apply(x, w_eff, base.bias, base.stride, padding, base.dilation)
        if type(base) in (nn.Conv1d, nn.Conv2d):
            return base._conv_forward(x, w_eff, base.bias)
        return functional_call(base, {self.weight_name: w_eff}, (x,))

    def _activation_forward(self, x: torch.Tensor, hooked: bool, update: LowRank | None = None,
                            y: torch.Tensor | None = None) -> torch.Tensor:
        """y = base(x) + s B(A x), for DoRA scaled per output channel (ScaleRows) after the bias is
        taken out. `y`: base(x) when the caller already has it (mixed batches)."""
        base, update = self.base_layer, update or self.update
        y0 = self._direction_output(x, hooked, update, y)
        if update.additive:
            return y0
        dropout_on = isinstance(self.dropout, nn.Dropout) and self.dropout.training and self.dropout.p > 0
        recompute = None if dropout_on else functools.partial(self._direction_output, x, True, update)
        channel = -1 if isinstance(base, nn.Linear) else 1
        return scale_rows(y0, update.scale(update.row_norms(base.weight)), base.bias, channel, recompute)

    def _direction_output(self, x: torch.Tensor, hooked: bool, update: LowRank, y: torch.Tensor | None = None
                          ) -> torch.Tensor:
        """base(x) + s B(A x), without the bias for DoRA (which scales the rest)."""
        base = self.base_layer
        y = base(x) if y is None else y
        A, B = update.lora_A.to(y.dtype), update.full_B().to(y.dtype)
        x = self.dropout(x)
        channel = -1 if isinstance(base, nn.Linear) else 1
        if not update.additive and base.bias is not None:
            y = y - base.bias.to(y.dtype).view([-1 if d == channel % y.dim() else 1 for d in range(y.dim())])
        if isinstance(base, nn.Linear):
            z = F.linear(x, A)
            return torch.addmm(y.reshape(-1, y.shape[-1]), z.reshape(-1, z.shape[-1]), B.t(), alpha=update.scaling
                               ).view(y.shape)
        g = base.groups  # A acts on each group's inputs; B maps each group's R codes to its outputs
        a = A.view(A.shape[0], *base.weight.shape[1:])
        z = base._conv_forward(x, a.repeat(g, 1, 1, 1) if g > 1 else a, None)
        change = F.conv2d(z, (B * update.scaling)[:, :, None, None], groups=g)
        return y.add_(change) if not hooked and update.additive else y + change  # a conv never reads its output

    def _linear_fused(self, x: torch.Tensor) -> torch.Tensor:
        """Base linear + LoRA (kernels._LoraLinear) or + DoRA (kernels._DoraLinear) as one autograd
        node, in the autocast dtype when autocast is on."""
        device, update, base = x.device.type, self.update, self.base_layer
        autocast = device in AUTOCAST_DEVICES and torch.is_autocast_enabled(device)  # "meta" has no autocast
        dtype = torch.get_autocast_dtype(device) if autocast else x.dtype
        a, b, w, bias = update.lora_A, update.full_B(), base.weight, base.bias
        g = None if update.additive else update.scale(update.row_norms(w))
        if a.dtype != dtype or w.dtype != dtype or x.dtype != dtype:
            x, w, a, b = x.to(dtype), w.to(dtype), a.to(dtype), b.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(device, enabled=False) if autocast else contextlib.nullcontext():
            if g is not None:
                return _DoraLinear.apply(x, w, bias, a, b, update.scaling, g.to(dtype))
            if not torch.is_grad_enabled():  # inference: the same maths without an autograd node
                return _lora_linear(x.reshape(-1, x.shape[-1]), w, bias, a, b, update.scaling, False)[0].view(
                    *x.shape[:-1], -1)
            return _LoraLinear.apply(x, w, bias, a, b, update.scaling)

    @torch.no_grad()
    def _mixed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """A batch sorted by adapter (`_mixed`: (adapter name, slice of the batch) groups, see
        named.mixed_forward): the base output once, then each group's own update added on its slice
        (a view: nothing is copied). The weight path (depthwise convs, transformed weights) runs
        each slice through its own W' instead."""
        updates = [(self.updates[n] if n in self.updates else None, part) for n, part in self._mixed]
        base = self.base_layer
        if self.weight_path:
            y = None
            for update, part in updates:
                out = self._weight_forward(x[part], update) if update is not None else base(x[part])
                y = out.new_empty((x.shape[0], *out.shape[1:])) if y is None else y
                y[part] = out
            return y
        y = base(x)
        for update, part in updates:
            if update is not None and not self._add_in_place(y[part], x[part], update):
                y[part] = self._activation_forward(x[part], True, update, y[part])
        return y

    def _add_in_place(self, y: torch.Tensor, x: torch.Tensor, update: LowRank) -> bool:
        """y += s B (A x) into y's own memory for an additive update on a Linear or a 1x1 stride-1
        conv (a matmul that accumulates: no change tensor is written). False where it does not
        apply."""
        base, s = self.base_layer, update.scaling
        a, b = update.lora_A.to(y.dtype), update.full_B().to(y.dtype)
        pointwise = type(base) is nn.Conv2d and base.kernel_size == (1, 1) and base.stride == (1, 1) and (
            base.padding == (0, 0) and base.groups == 1)
        if not update.additive or not y.is_contiguous() or not x.is_contiguous():
            return False
        if isinstance(base, nn.Linear):
            y.view(-1, y.shape[-1]).addmm_(F.linear(x.reshape(-1, x.shape[-1]), a), b.t(), alpha=s)
            return True
        if pointwise:
            n = x.shape[0]
            z = torch.matmul(a, x.flatten(2))
            y.view(n, y.shape[1], -1).baddbmm_(b.expand(n, *b.shape), z, alpha=s)
            return True
        return False

    def extra_repr(self) -> str:
        path = "weight" if self.weight_path else "activation"
        return f"path={path}, merged={self.merged}"


def adapter_exceeds_layer(layer: LoraLayer) -> bool:
    """True when the adapter holds more parameters than the layer it adapts (e.g. depthwise at high
    rank)."""
    return layer.adapter_numel() > layer.raw_weight().numel()
