"""Low-rank adapter layers: one wrapper that changes the raw weight of a Linear or any Conv2d through an update.

The variant seam: a LoraLayer holds its updates by name (`updates`, today one: "default") and asks the active one
for the effective weight and for its parameters; nothing outside this file and vislora.adapters reads the factors
by name. Two variants, each a small module:
  * LowRank (LoRA):  W' = W + s B A,  A: R x fan_in (kaiming-uniform), B: out x R (zeros), additive;
  * DoRA (Liu et al. 2024):  W' = m * (W + s B A) / ||W + s B A||, one magnitude m per output row (initialised
    to ||W|| of the row), the row norm detached from the gradient as in the paper (section 4.3). Not additive.
A conv's weight is seen as the out x fan_in matrix (fan_in = in/groups * kh * kw), so one definition serves 1x1,
kxk, kx1/1xk, dilated, grouped and depthwise convs, and merging (W <- W') is exact for both variants.

The forward pass picks the cheaper of two exact paths:
  * activation path: y = base(x) + s B (A x) (dense layers); DoRA scales it per output channel,
    y = (m / n) (base(x) - b + s B(Ax)) + b, with n^2 = ||W||^2 + 2s rowsum(B * (W A^T)) + s^2 rowsum((B A A^T) * B)
    computed from the factors, never forming W + s B A;
  * weight path: y = base(x; W'), which needs no extra activations (depthwise and grouped convs, convs that
    transform their weight inside forward, and code that reads `.weight` itself, e.g. EVA's F.linear).
"""

from __future__ import annotations

import contextlib
import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Conv2dSame, ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame, pad_same
from torch.func import functional_call

from vislora.kernels import (  # noqa: F401  (depthwise_weight_grad: re-exported for tools and tests)
    AUTOCAST_DEVICES,
    ScaleRows,
    _depthwise_on_cpu,
    _DepthwiseConv2d,
    _DoraLinear,
    _lora_linear,
    _LoraLinear,
    depthwise_weight_grad,
)

DEFAULT = "default"  # the name of the update every run has today (state_dict: <layer>.updates.default.*)
# what a LoraLayer can wrap: each has one weight matrix (out x fan_in) its forward uses; nn.MultiheadAttention's is
# in_proj_weight (q, k and v stacked: qkv parts apply), its out_proj is a Linear of its own
ADAPTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.MultiheadAttention)
STANDARDISED = (StdConv2d, StdConv2dSame, ScaledStdConv2d, ScaledStdConv2dSame)  # forward normalises each filter


def raw_weight_name(base: nn.Module) -> str:
    """The dotted name of the parameter the layer's forward transforms into its weight.

    Plain layers: `weight`. torch parametrizations (e.g. orthogonal, spectral norm): the unconstrained
    `parametrizations.weight.original`; weight norm: its direction `original1` (same shape as the weight).
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


def chunk_rows(out: int, parts: tuple[int, ...] | None, num_chunks: int = 3) -> list[slice]:
    """Row ranges of the out x fan_in weight matrix that get their own factor pair (qkv chunks, or all rows)."""
    if not parts:
        return [slice(0, out)]
    chunk = out // num_chunks
    return [slice(c * chunk, (c + 1) * chunk) for c in parts]


def full_precision(device_type: str):
    """A context without autocast on this device (a no-op where torch has no autocast, e.g. meta)."""
    if device_type in AUTOCAST_DEVICES:
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def dora_refusal(base: nn.Module) -> str | None:
    """Why DoRA cannot act on this layer (None when it can): a forward that normalises each output filter
    (StdConv2d, ScaledStdConv2d) or transforms the weight (weight norm, parametrizations) cancels a magnitude."""
    if isinstance(base, STANDARDISED):
        return f"{type(base).__name__} standardises each output filter in its forward, which cancels DoRA's magnitude"
    if raw_weight_name(base) not in ("weight", "in_proj_weight"):
        return "its weight is re-parametrised (weight norm / torch parametrization), which rescales each row"
    return None


# ---- the variants -----------------------------------------------------------------------------------------------
class LowRank(nn.Module):
    """LoRA's update of an out x fan_in weight: delta = s B A (s = alpha / r, or alpha / sqrt(r) with rslora).

    qkv_parts: for a fused projection (timm `attn.qkv`), the indices of the equal output chunks that get their own
    A/B pair, e.g. (0, 2) adapts only Wq and Wv (the LoRA paper's setting); None adapts every row with one pair.
    """

    additive = True  # W' = W + delta: the activation path, the fused kernel and the SVD tools rely on it

    def __init__(self, out: int, fan_in: int, r: int, alpha: float, rslora: bool = False,
                 qkv_parts: tuple[int, ...] | None = None, num_chunks: int = 3, device=None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.qkv_parts = tuple(qkv_parts) if qkv_parts else None
        self.num_chunks = num_chunks if self.qkv_parts else 1
        if out % self.num_chunks:
            raise ValueError(f"{out} output features cannot be split into {self.num_chunks} qkv chunks")
        limit = min(out // self.num_chunks, fan_in)
        if not 1 <= r <= limit:
            raise ValueError(f"rank r={r} must be between 1 and {limit} for this layer ({out} x {fan_in})")
        n_parts = len(self.qkv_parts) if self.qkv_parts else 1
        self.out, self.r, self.alpha, self.rslora = out, r, alpha, rslora
        self.scaling = alpha / (math.sqrt(r) if rslora else r)
        self.lora_A = nn.Parameter(torch.empty(n_parts * r, fan_in, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(n_parts * (out // self.num_chunks), r, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A as nn.Linear initialises its weight (kaiming-uniform), B zero: the layer starts as the base."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    # -- what the layer and the tools ask --------------------------------------------------------------------
    def factor_roles(self) -> dict[str, list[nn.Parameter]]:
        """The trained tensors by role: "A", "B" (LoRA+ speeds up B) and, for DoRA, "magnitude"."""
        return {"A": [self.lora_A], "B": [self.lora_B]}

    def numel(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def full_B(self, b: torch.Tensor | None = None) -> torch.Tensor:
        """B (or any tensor in its per-part layout) as one out x (parts*r) matrix: block-diagonal over the adapted
        qkv chunks, zero elsewhere."""
        b = self.lora_B if b is None else b
        if not self.qkv_parts:
            return b
        chunk = b.shape[0] // len(self.qkv_parts)
        blocks = b.split(chunk)
        rows = []
        for c in range(self.num_chunks):
            row = [torch.zeros_like(blocks[0])] * len(self.qkv_parts)
            if c in self.qkv_parts:
                row[self.qkv_parts.index(c)] = blocks[self.qkv_parts.index(c)]
            rows.append(torch.cat(row, dim=1))
        return torch.cat(rows, dim=0)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(B as one out x R matrix, A, s): delta = s B A."""
        return self.full_B(), self.lora_A, self.scaling

    def part_factors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(B_i, A_i) of each adapted part: the one pair, or one pair per adapted qkv chunk."""
        if not self.qkv_parts:
            return [(self.lora_B, self.lora_A)]
        return list(zip(self.lora_B.chunk(len(self.qkv_parts)), self.lora_A.split(self.r), strict=True))

    def delta(self, shape: torch.Size, dtype: torch.dtype | None = None) -> torch.Tensor:
        """s B A in the raw weight's shape, computed in fp32 (or the adapter dtype if wider)."""
        acc = torch.promote_types(self.lora_A.dtype, torch.float32)
        d = (self.full_B().to(acc) @ self.lora_A.to(acc)) * self.scaling
        return d.view(shape).to(dtype or acc)

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        """The effective weight W' of the raw weight w, in w's dtype, differentiable in the update's tensors."""
        return w + self.delta(w.shape, w.dtype)

    # -- changes made from outside -------------------------------------------------------------------------------
    @torch.no_grad()
    def set_svd_factors(self, svds: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        """One (U, S, Vh) per adapted part: A = sqrt(S) Vh, B = U sqrt(S) / s, so that s B A = U S Vh with
        balanced factors."""
        a_rows, b_rows = [], []
        for u, sv, vh in svds:
            root = sv.clamp_min(0).sqrt()
            a_rows.append(root[:, None] * vh)
            b_rows.append(u * root / self.scaling)
        self.lora_A.copy_(torch.cat(a_rows).to(self.lora_A.dtype))
        self.lora_B.copy_(torch.cat(b_rows).to(self.lora_B.dtype))

    @torch.no_grad()
    def zero_(self) -> None:
        """An update of zero (a layer extraction found unchanged)."""
        self.lora_A.zero_()
        self.lora_B.zero_()

    @torch.no_grad()
    def perturb_(self, std: float = 0.1) -> None:
        """A random non-zero update (what verify_layers and the conformance suite check merging with)."""
        self.lora_B.normal_(std=std)

    def set_scaling(self, alpha: float, rslora: bool, scaling: float) -> None:
        """The scaling an adapter file defines (vislora.adapters)."""
        self.alpha, self.rslora, self.scaling = alpha, rslora, scaling

    # -- PiSSA: the change from the starting factors ------------------------------------------------------
    @property
    def pissa(self) -> bool:
        """PiSSA-initialised: the base weight holds a residual, the start factors are kept (pissa_A0 / pissa_B0)."""
        return "pissa_A0" in self._buffers

    @torch.no_grad()
    def keep_start(self) -> None:
        self.register_buffer("pissa_A0", self.lora_A.detach().clone(), persistent=False)
        self.register_buffer("pissa_B0", self.lora_B.detach().clone(), persistent=False)

    def change_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B', A') with s B' A' = the learned change, with gradients: B A, or for PiSSA its change from the start
        [B, -B0] [A; A0] (the principal part of W it started from is not a change)."""
        if not self.pissa:
            return self.full_B(), self.lora_A
        a = torch.cat([self.lora_A, self.pissa_A0.to(self.lora_A.dtype)])
        return torch.cat([self.full_B(), -self.full_B(self.pissa_B0.to(self.lora_B.dtype))], dim=1), a

    def factor_change_l2(self) -> torch.Tensor:
        """||A - A0||^2 + ||B - B0||^2 (A0 = B0 = 0 unless PiSSA started the factors elsewhere)."""
        da, db = self.lora_A, self.lora_B
        if self.pissa:
            da, db = da - self.pissa_A0.to(da.dtype), db - self.pissa_B0.to(db.dtype)
        return da.pow(2).sum() + db.pow(2).sum()

    def extra_repr(self) -> str:
        parts = f", qkv_parts={self.qkv_parts}" if self.qkv_parts else ""
        return f"r={self.r}, alpha={self.alpha}, rslora={self.rslora}{parts}"


class DoRA(LowRank):
    """DoRA: W' = g * (W + s B A) per output row, g = m / ||W + s B A|| with the norm detached (Liu et al. 2024,
    section 4.3). m (`lora_magnitude`) covers the adapted rows only (with qkv parts: the adapted chunks); it starts
    at ||W|| of each row, so the layer starts as the base."""

    additive = False

    def __init__(self, weight: torch.Tensor, r: int, alpha: float, rslora: bool = False,
                 qkv_parts: tuple[int, ...] | None = None, num_chunks: int = 3, dtype: torch.dtype = torch.float32):
        out, fan_in = weight.shape[0], weight[0].numel()
        super().__init__(out, fan_in, r, alpha, rslora, qkv_parts, num_chunks, weight.device, dtype)
        rows = torch.cat([weight.detach().reshape(out, -1)[sl] for sl in self.rows()])
        self.lora_magnitude = nn.Parameter(rows.to(dtype).norm(dim=1))
        self._sq_key, self._sq = None, None

    def factor_roles(self) -> dict[str, list[nn.Parameter]]:
        return {**super().factor_roles(), "magnitude": [self.lora_magnitude]}

    def rows(self) -> list[slice]:
        return chunk_rows(self.out, self.qkv_parts, self.num_chunks)

    @torch.no_grad()
    def full_magnitude(self, w: torch.Tensor) -> torch.Tensor:
        """One magnitude per output row, as PEFT stores it: m on the adapted rows, ||W|| (scale 1) elsewhere."""
        full = w.detach().reshape(self.out, -1).to(self.lora_magnitude.dtype).norm(dim=1)
        taken = 0
        for rows in self.rows():
            size = rows.stop - rows.start
            full[rows] = self.lora_magnitude[taken:taken + size]
            taken += size
        return full

    def magnitude_from_full(self, full: torch.Tensor) -> torch.Tensor:
        """The adapted rows of a per-row magnitude (the inverse of full_magnitude)."""
        full = full.reshape(-1)
        return torch.cat([full[rows] for rows in self.rows()])

    @torch.no_grad()
    def perturb_(self, std: float = 0.1) -> None:
        super().perturb_(std)
        self.lora_magnitude.mul_(1 + std * torch.randn_like(self.lora_magnitude))

    def scale(self, norms: torch.Tensor) -> torch.Tensor:
        """g per output row: m / n on the adapted rows (n detached), 1 elsewhere; differentiable in m."""
        m = self.lora_magnitude
        n = norms.detach().to(m.dtype)
        if not self.qkv_parts:
            return m / n
        pieces, taken = [], 0
        for c in range(self.num_chunks):
            rows = slice(c * (self.out // self.num_chunks), (c + 1) * (self.out // self.num_chunks))
            if c in self.qkv_parts:
                size = rows.stop - rows.start
                pieces.append(m[taken:taken + size] / n[rows])
                taken += size
            else:
                pieces.append(torch.ones_like(n[rows]))
        return torch.cat(pieces)

    @torch.no_grad()
    def _weight_sq(self, w2: torch.Tensor) -> torch.Tensor:
        """||W||^2 per row, cached while the weight is unchanged (its version counter)."""
        try:
            key = (w2.data_ptr(), w2._version, w2.dtype, w2.device)
        except RuntimeError:  # inference tensors keep no version counter
            return w2.pow(2).sum(1)
        if key != self._sq_key:
            self._sq_key, self._sq = key, w2.pow(2).sum(1)
        return self._sq

    @torch.no_grad()
    def row_norms(self, w: torch.Tensor) -> torch.Tensor:
        """||W + s B A|| per row from the factors: n^2 = ||W||^2 + 2s rowsum(B * (W A^T)) + s^2 rowsum((B A A^T) * B),
        out x fan_in x R work, no weight-sized tensor (vislora's activation path)."""
        acc = torch.promote_types(self.lora_A.dtype, torch.float32)
        w2 = w.detach().reshape(self.out, -1)
        with full_precision(w.device.type):  # under autocast the products would run in bf16
            sq = self._weight_sq(w2).to(acc)
            a, b, s = self.lora_A.detach().to(acc), self.full_B().detach().to(acc), self.scaling
            cross = (b * (w2.to(acc) @ a.T)).sum(1)
            quad = ((b @ (a @ a.T)) * b).sum(1)
            return (sq + 2 * s * cross + s * s * quad).clamp_min(0).sqrt()

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        v = w.to(torch.promote_types(w.dtype, torch.float32)) + self.delta(w.shape)
        g = self.scale(v.reshape(self.out, -1).norm(dim=1))
        return (v * g.view(-1, *[1] * (w.dim() - 1)).to(v.dtype)).to(w.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora=True"


def upgrade_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoints written before the variant seam named the factors `<layer>.lora_A`; today they are
    `<layer>.updates.default.lora_A`: rename the old keys so old runs still resume."""
    out = {}
    for key, value in state.items():
        head, _, leaf = key.rpartition(".")
        if leaf in ("lora_A", "lora_B") and not head.endswith(f"updates.{DEFAULT}"):
            key = f"{head}.updates.{DEFAULT}.{leaf}" if head else f"updates.{DEFAULT}.{leaf}"
        out[key] = value
    return out


# ---- the layer ---------------------------------------------------------------------------------------------------
class LoraLayer(nn.Module):
    """Wraps `base_layer` (nn.Linear or nn.Conv2d, subclasses included) with y = base(x; W'), W' given by the
    active update (LowRank, or DoRA with use_dora). r, alpha, rslora, qkv_parts: see LowRank. dropout applies to
    the adapter input on the activation path."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, qkv_parts: tuple[int, ...] | None = None, num_chunks: int = 3,
                 use_dora: bool = False, name: str = DEFAULT):
        super().__init__()
        if not isinstance(base_layer, ADAPTABLE):
            raise TypeError(f"LoRA supports {', '.join(t.__name__ for t in ADAPTABLE)}, not "
                            f"{type(base_layer).__name__}")
        if isinstance(base_layer, nn.MultiheadAttention) and not base_layer._qkv_same_embed_dim:
            raise ValueError("this nn.MultiheadAttention keeps q, k and v projections apart (kdim/vdim != "
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
        # Extra cost per output position: activation path R*(in*kk + out); weight path = the weight gradient.
        act_cost = r * parts * (fan_in * getattr(base_layer, "groups", 1) + out)
        self.weight_path = not plain or (dropout == 0 and out * fan_in <= act_cost)

    def add_update(self, name: str, r: int, alpha: float, rslora: bool = False,
                   qkv_parts: tuple[int, ...] | None = None, num_chunks: int = 3, use_dora: bool = False) -> None:
        """A named update beside the others (LoRA, or DoRA with use_dora); it acts when `active` is its name."""
        if name in self.updates:
            raise ValueError(f"the layer already carries an adapter named '{name}'")
        if use_dora and dora_refusal(self.base_layer):
            raise ValueError(f"DoRA cannot adapt this {type(self.base_layer).__name__}: "
                             f"{dora_refusal(self.base_layer)}")
        w = self.raw_weight()
        dtype = w.dtype if w.dtype == torch.float64 else torch.float32  # adapters train in fp32 at least
        if use_dora:
            update = DoRA(w, r, alpha, rslora, qkv_parts, num_chunks, dtype)
        else:
            update = LowRank(w.shape[0], w[0].numel(), r, alpha, rslora, qkv_parts, num_chunks, w.device, dtype)
        self.updates[name] = update

    # ---- the active update, as the rest of vislora sees it ------------------------------------------------------
    @property
    def carries_active(self) -> bool:
        """The active adapter adapts this layer (with several adapters, one may leave it as the base)."""
        return self.active in self.updates

    @property
    def update(self) -> LowRank:
        if self.active not in self.updates:
            raise ValueError(f"this layer carries no adapter named '{self.active}' ({', '.join(self.updates)})")
        return self.updates[self.active]

    def adapter_parameters(self) -> list[nn.Parameter]:
        """Every tensor the active adapter trains here (what set_trainable, counts, footprint and files use)."""
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
        """The additive update s B A in the raw weight's shape (fp32, or the adapter dtype if wider)."""
        return self.update.delta(self.raw_weight().shape, dtype)

    def effective_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W' (raw form) as the forward uses it: the merged weight itself, else the active update applied."""
        w = self.raw_weight()
        if self.merged or not self.carries_active:
            return w if dtype is None else w.to(dtype)
        acc = dtype or torch.promote_types(w.dtype, torch.float32)
        return self.update.weight(w.to(acc))

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight, for code that reads `layer.weight` and calls F.linear itself (EVA, BEiT)."""
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

    # ---- PiSSA: the adapter starts as the principal singular triplets ----------------------------------------
    @torch.no_grad()
    def init_pissa(self) -> None:
        """PiSSA: s B A = U_r S_r Vh_r and W <- W - s B A (rounded once into W's dtype), so the output is unchanged.
        The starting factors stay (LowRank.keep_start), with which vislora.svd.pissa_as_lora expresses the trained
        adapter relative to the original weight."""
        if self.merged:
            raise ValueError(f"PiSSA init: the layer ({self.extra_repr()}) is merged: unmerge() it first")
        if not self.additive:
            raise ValueError("PiSSA init needs an additive update (LoRA): DoRA's magnitude is not a low-rank part")
        if self.update.pissa:
            raise ValueError(f"PiSSA init: the layer ({self.extra_repr()}) is already PiSSA-initialised")
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

    # ---- merge / unmerge --------------------------------------------------------------------------------------
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
        """Restore the base weight (the exact copy if one was kept, else W' - s B A, or W' / g - s B A for DoRA)."""
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

    # ---- forward ----------------------------------------------------------------------------------------------
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
        """nn.MultiheadAttention with in_proj_weight = W' (its out_proj, a Linear, may carry an adapter of its own)."""
        base = self.base_layer
        if self._mixed is not None:
            raise ValueError("mixed_forward: nn.MultiheadAttention layers are not supported: run the adapters apart")
        if self.merged or not self.carries_active:
            return base(*args, **kwargs)
        w_eff = self.update.weight(base.in_proj_weight)
        return functional_call(base, {"in_proj_weight": w_eff}, args, kwargs)

    def _weight_forward(self, x: torch.Tensor, update: LowRank | None = None) -> torch.Tensor:
        """y = base(x; W'): one conv / linear with the effective weight (depthwise convs, transformed weights)."""
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
        """y = base(x) + s B(A x), for DoRA scaled per output channel (ScaleRows) after the bias is taken out.
        `y`: base(x) when the caller already has it (mixed batches)."""
        base, update = self.base_layer, update or self.update
        y = base(x) if y is None else y
        A, B = update.lora_A.to(y.dtype), update.full_B().to(y.dtype)
        x = self.dropout(x)
        channel = -1 if isinstance(base, nn.Linear) else 1
        if not update.additive and base.bias is not None:
            y = y - base.bias.to(y.dtype).view([-1 if d == channel % y.dim() else 1 for d in range(y.dim())])
        if isinstance(base, nn.Linear):
            z = F.linear(x, A)
            y = torch.addmm(y.reshape(-1, y.shape[-1]), z.reshape(-1, z.shape[-1]), B.t(), alpha=update.scaling
                            ).view(y.shape)
        else:
            g = base.groups  # A acts on each group's inputs; B maps each group's R codes to its outputs
            a = A.view(A.shape[0], *base.weight.shape[1:])
            z = base._conv_forward(x, a.repeat(g, 1, 1, 1) if g > 1 else a, None)
            change = F.conv2d(z, (B * update.scaling)[:, :, None, None], groups=g)
            y = y.add_(change) if not hooked and update.additive else y + change  # a conv never reads its output
        if update.additive:
            return y
        return ScaleRows.apply(y, update.scale(update.row_norms(base.weight)), base.bias, channel)

    def _linear_fused(self, x: torch.Tensor) -> torch.Tensor:
        """Base linear + LoRA (kernels._LoraLinear) or + DoRA (kernels._DoraLinear) as one autograd node, in the
        autocast dtype when autocast is on."""
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
        """A batch whose samples belong to different adapters (`_mixed`: (adapter name, sample indices) groups):
        the base output once, then each group's own update on its rows (weight path: its own W' per group)."""
        groups = [(self.updates[n] if n in self.updates else None, idx) for n, idx in self._mixed]
        if self.weight_path:
            parts = [(idx, self._weight_forward(x[idx], u) if u is not None else self.base_layer(x[idx]))
                     for u, idx in groups]
            out = parts[0][1].new_empty((x.shape[0], *parts[0][1].shape[1:]))
            for idx, part in parts:
                out[idx] = part
            return out
        y = self.base_layer(x)
        for update, idx in groups:
            if update is not None:
                y[idx] = self._activation_forward(x[idx], True, update, y[idx])
        return y

    def extra_repr(self) -> str:
        path = "weight" if self.weight_path else "activation"
        return f"path={path}, merged={self.merged}"


def adapter_exceeds_layer(layer: LoraLayer) -> bool:
    """True when the adapter holds more parameters than the layer it adapts (e.g. depthwise at high rank)."""
    return layer.adapter_numel() > layer.raw_weight().numel()


def warn_if_oversized(name: str, layer: LoraLayer) -> None:
    if adapter_exceeds_layer(layer):
        warnings.warn(f"adapter on '{name}' has {layer.adapter_numel()} parameters, more than the layer itself "
                      f"({layer.raw_weight().numel()}): lower r for it", stacklevel=3)
