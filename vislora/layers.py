"""LoRA layers: one wrapper that adds a low-rank update to the raw weight of a Linear or any Conv2d.

The update of a weight W (out x fan_in, where a conv's fan_in = in/groups * kh * kw) is
    delta_W = scaling * B @ A,   A: R x fan_in (kaiming-uniform), B: out x R (zeros)
so it is a true low-rank update of the weight matrix for every kernel shape and every `groups`,
and merging (W += delta_W) is exact. The forward pass picks the cheaper of two exact paths:
  * activation path: y = base(x) + scaling * B (A x), as in the LoRA paper (dense layers);
  * weight path: y = base(x; W + delta_W), which needs no extra activations (depthwise and grouped
    convs, convs that transform their weight inside forward, and code that reads `.weight` itself).
On CPU the weight gradient of a depthwise conv of 5x5 or more comes from one grouped conv of the input with the
output gradient (depthwise_weight_grad): exact, and several times faster than torch's own there.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Conv2dSame, pad_same
from torch.func import functional_call

AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")  # device types torch.autocast knows


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


class LoraLayer(nn.Module):
    """Wraps `base_layer` (nn.Linear or nn.Conv2d, subclasses included) with y = base(x; W + s * B A).

    r: rank per adapted part; alpha: scaling numerator (s = alpha / r, or alpha / sqrt(r) with rslora).
    qkv_parts: for a fused projection (timm `attn.qkv`), the indices of the equal output chunks that get
    their own A/B pair, e.g. (0, 2) adapts only Wq and Wv (the LoRA paper's setting); None adapts the
    whole weight with one pair. dropout applies to the adapter input on the activation path.
    """

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, qkv_parts: tuple[int, ...] | None = None, num_chunks: int = 3):
        super().__init__()
        if not isinstance(base_layer, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"LoRA supports nn.Linear and nn.Conv2d, not {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.weight_name = raw_weight_name(base_layer)
        w = base_layer.get_parameter(self.weight_name)
        out, fan_in = w.shape[0], w[0].numel()
        self.qkv_parts = tuple(qkv_parts) if qkv_parts else None
        self.num_chunks = num_chunks if self.qkv_parts else 1
        if out % self.num_chunks:
            raise ValueError(f"{out} output features cannot be split into {self.num_chunks} qkv chunks")
        n_parts = len(self.qkv_parts) if self.qkv_parts else 1
        limit = min(out // self.num_chunks, fan_in)
        if not 1 <= r <= limit:
            raise ValueError(f"rank r={r} must be between 1 and {limit} for this layer (weight {tuple(w.shape)})")
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scaling = alpha / (math.sqrt(r) if rslora else r)
        dtype = w.dtype if w.dtype == torch.float64 else torch.float32  # adapters train in fp32 at least
        self.lora_A = nn.Parameter(torch.empty(n_parts * r, fan_in, device=w.device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(n_parts * (out // self.num_chunks), r, device=w.device,
                                               dtype=dtype))
        self.reset_parameters()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self._original: torch.Tensor | None = None  # exact copy of the raw weight while merged
        plain = type(base_layer) in (nn.Linear, nn.Conv2d) and self.weight_name == "weight"
        # Extra cost per output position: activation path R*(in*kk + out); weight path = the weight gradient.
        act_cost = r * n_parts * (fan_in * getattr(base_layer, "groups", 1) + out)
        self.weight_path = not plain or (dropout == 0 and out * fan_in <= act_cost)

    def reset_parameters(self) -> None:
        """A as nn.Linear initialises its weight (kaiming-uniform), B zero: the layer starts as the base."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    # ---- the update as a weight -------------------------------------------------------------------
    def full_B(self, b: torch.Tensor | None = None) -> torch.Tensor:
        """B (default lora_B; or any tensor in its per-part layout) as one out x (parts*r) matrix: block-diagonal
        over the adapted qkv chunks, zero elsewhere."""
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

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """scaling * B @ A in the raw weight's shape, computed in fp32 (or the adapter dtype if wider)."""
        w = self.base_layer.get_parameter(self.weight_name)
        acc = torch.promote_types(self.lora_A.dtype, torch.float32)
        delta = (self.full_B().to(acc) @ self.lora_A.to(acc)) * self.scaling
        return delta.view(w.shape).to(dtype or acc)

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight, for code that reads `layer.weight` and calls F.linear itself (EVA, BEiT)."""
        w = self.base_layer.weight
        if self.merged or self.weight_name != "weight":
            return w
        return w + self.delta_weight(w.dtype)

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

    # ---- factors from singular triplets (PiSSA, extraction, shrinking) ----------------------------
    @torch.no_grad()
    def set_svd_factors(self, svds: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        """One (U, S, Vh) per adapted part: A = sqrt(S) Vh, B = U sqrt(S) / scaling, so that scaling * B @ A =
        U S Vh with balanced factors."""
        a_rows, b_rows = [], []
        for u, s, vh in svds:
            root = s.clamp_min(0).sqrt()
            a_rows.append(root[:, None] * vh)
            b_rows.append(u * root / self.scaling)
        self.lora_A.copy_(torch.cat(a_rows).to(self.lora_A.dtype))
        self.lora_B.copy_(torch.cat(b_rows).to(self.lora_B.dtype))

    @torch.no_grad()
    def init_pissa(self) -> None:
        """PiSSA: the adapter starts as the top-r singular triplets of the weight, the base keeps the residual.

        scaling * B @ A = U_r S_r Vh_r and W <- W - scaling * B @ A (rounded once into W's dtype), so the output
        is unchanged. The initial factors stay as non-persistent buffers pissa_A0 / pissa_B0, with which
        vislora.svd.pissa_as_lora expresses the trained adapter relative to the original weight.
        """
        if self.merged:
            raise ValueError(f"PiSSA init: the layer ({self.extra_repr()}) is merged: unmerge() it first")
        if "pissa_A0" in self._buffers:
            raise ValueError(f"PiSSA init: the layer ({self.extra_repr()}) is already PiSSA-initialised")
        w = self.base_layer.get_parameter(self.weight_name)
        acc = torch.promote_types(w.dtype, torch.float32)
        mat = w.detach().to(acc).reshape(w.shape[0], -1)
        svds = []
        for rows in chunk_rows(w.shape[0], self.qkv_parts, self.num_chunks):
            u, s, vh = torch.linalg.svd(mat[rows], full_matrices=False)
            svds.append((u[:, :self.r], s[:self.r], vh[:self.r]))
        self.set_svd_factors(svds)
        w.copy_((w.detach().to(acc) - self.delta_weight(acc)).to(w.dtype))
        self.register_buffer("pissa_A0", self.lora_A.detach().clone(), persistent=False)
        self.register_buffer("pissa_B0", self.lora_B.detach().clone(), persistent=False)

    # ---- merge / unmerge --------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, keep_original: bool = True) -> None:
        """W += delta_W, rounded once; with keep_original, unmerge later restores W bit-exactly."""
        if self.merged:
            return
        w = self.base_layer.get_parameter(self.weight_name)
        self._original = w.detach().clone() if keep_original else None
        w.copy_((w.to(torch.float32) + self.delta_weight()).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight (exact copy if one was kept, else W - delta_W)."""
        if not self.merged:
            return
        w = self.base_layer.get_parameter(self.weight_name)
        if self._original is not None:
            w.copy_(self._original)
        else:
            w.copy_((w.to(torch.float32) - self.delta_weight()).to(w.dtype))
        self._original = None
        self.merged = False

    # ---- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if self.merged:
            return base(x)
        if self.weight_path:
            w = base.get_parameter(self.weight_name)
            w_eff = w + self.delta_weight(w.dtype)
            if type(base) is nn.Linear:
                return F.linear(x, w_eff, base.bias)
            if type(base) in (nn.Conv2d, Conv2dSame) and _depthwise_on_cpu(base, x):
                padding = base.padding
                if type(base) is Conv2dSame:  # timm's TF "same" padding: pad as its forward does, then conv
                    x, padding = pad_same(x, base.kernel_size, base.stride, base.dilation), (0, 0)
                return _DepthwiseConv2d.apply(x, w_eff, base.bias, base.stride, padding, base.dilation)
            if type(base) is nn.Conv2d:
                return base._conv_forward(x, w_eff, base.bias)
            return functional_call(base, {self.weight_name: w_eff}, (x,))
        hooked = bool(base._forward_hooks or base._forward_pre_hooks)
        if isinstance(base, nn.Linear) and not hooked and isinstance(self.dropout, nn.Identity):
            return self._linear_fused(x)
        y = base(x)
        A, B = self.lora_A.to(y.dtype), self.full_B().to(y.dtype)
        x = self.dropout(x)
        if isinstance(base, nn.Linear):
            z = F.linear(x, A)
            out = torch.addmm(y.reshape(-1, y.shape[-1]), z.reshape(-1, z.shape[-1]), B.t(), alpha=self.scaling)
            return out.view(y.shape)
        g = base.groups  # A acts on each group's inputs; B maps each group's R codes to its outputs
        a = A.view(A.shape[0], *base.weight.shape[1:])
        z = base._conv_forward(x, a.repeat(g, 1, 1, 1) if g > 1 else a, None)
        update = F.conv2d(z, (B * self.scaling)[:, :, None, None], groups=g)
        return y.add_(update) if not hooked else y + update  # a plain conv's backward never reads its output

    def _linear_fused(self, x: torch.Tensor) -> torch.Tensor:
        """Base linear + LoRA as one autograd node (see _LoraLinear), in the autocast dtype when autocast is on."""
        base, device = self.base_layer, x.device.type
        autocast = device in AUTOCAST_DEVICES and torch.is_autocast_enabled(device)  # "meta" has no autocast
        dtype = torch.get_autocast_dtype(device) if autocast else x.dtype
        a, b, w, bias = self.lora_A, self.full_B(), base.weight, base.bias
        if a.dtype != dtype or w.dtype != dtype or x.dtype != dtype:
            x, w, a, b = x.to(dtype), w.to(dtype), a.to(dtype), b.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        if not torch.is_grad_enabled():  # inference: the same maths without an autograd node
            return _lora_linear(x.reshape(-1, x.shape[-1]), w, bias, a, b, self.scaling, False)[0].view(
                *x.shape[:-1], -1)
        if not autocast:
            return _LoraLinear.apply(x, w, bias, a, b, self.scaling)
        with torch.autocast(device, enabled=False):
            return _LoraLinear.apply(x, w, bias, a, b, self.scaling)

    def extra_repr(self) -> str:
        parts = f", qkv_parts={self.qkv_parts}" if self.qkv_parts else ""
        path = "weight" if self.weight_path else "activation"
        return f"r={self.r}, alpha={self.alpha}, rslora={self.rslora}{parts}, path={path}, merged={self.merged}"


def _lora_linear(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                 lora_B: torch.Tensor, scaling: float, need_z: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(y, z) for 2-d x: y = x W^T + b + s z B^T with z = x A^T. The update goes into the weight when x has more
    rows than inputs (out x in is then smaller than rows x out), else into y in place; both are exact."""
    rows, fan_in = x2.shape
    z = F.linear(x2, lora_A) if need_z or rows <= fan_in else None
    if rows > fan_in:
        return F.linear(x2, torch.addmm(weight, lora_B, lora_A, alpha=scaling), bias), z
    y = F.linear(x2, weight, bias)
    torch.addmm(y, z, lora_B.t(), alpha=scaling, out=y)  # in place; the out= form is what FlopCounterMode counts
    return y, z


class _LoraLinear(torch.autograd.Function):
    """y = x W^T + b + s (x A^T) B^T in one autograd node.

    It saves only x and the small z = x A^T (no copy of y, no separate nodes for A, B and the sum) and
    computes a gradient for W or b only if they require one (frozen base: none). Backward, with u = s g B:
    dx = g W + u A, dA = u^T x, dB = s g^T z; dx adds the update to W (out x in) or to dx (rows x in),
    whichever is smaller.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling):
        x2 = x.reshape(-1, x.shape[-1])
        y, z = _lora_linear(x2, weight, bias, lora_A, lora_B, scaling, True)
        ctx.save_for_backward(x2, z, weight, lora_A, lora_B)
        ctx.scaling = scaling
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x2, z, weight, lora_A, lora_B = ctx.saved_tensors
        g, s = grad.reshape(-1, grad.shape[-1]), ctx.scaling
        need_x, need_w, need_b, need_a, need_bb, _ = ctx.needs_input_grad
        via_weight = g.shape[0] > g.shape[1]  # more rows than outputs: rebuilding W + s B A is the cheaper way
        u = F.linear(g, lora_B.t().contiguous().mul_(s)) if need_a or need_x and not via_weight else None  # [N, R]
        dx = None
        if need_x and via_weight:
            dx = g.mm(torch.addmm(weight, lora_B, lora_A, alpha=s)).view(*grad.shape[:-1], -1)
        elif need_x:
            dx = g.mm(weight).addmm_(u, lora_A).view(*grad.shape[:-1], -1)
        dw = g.t().mm(x2) if need_w else None
        db = g.sum(0) if need_b else None
        da = u.t().mm(x2) if need_a else None
        dB = z.t().mm(g).mul_(s).t() if need_bb else None
        return dx, dw, db, da, dB, None


def _depthwise_on_cpu(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """True where _DepthwiseConv2d applies: a training step on CPU (no autocast) through a depthwise conv
    (one filter per channel) of 5x5 or more with numeric zero padding. (3x3: oneDNN's own gradient is faster.)"""
    return (conv.groups == conv.in_channels == conv.out_channels > 1 and x.dim() == 4 and x.device.type == "cpu"
            and conv.kernel_size[0] * conv.kernel_size[1] > 9
            and torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str))


def depthwise_weight_grad(x: torch.Tensor, grad: torch.Tensor, kernel: tuple[int, int], stride, padding,
                          dilation) -> torch.Tensor:
    """dL/dW of a depthwise conv, as ONE depthwise conv of the input with the output gradient as its filter.

    Channel c of sample n gives the correlation x[n, c] * grad[n, c] (stride and dilation swap roles); summing
    over n gives dW[c]. Only the kernel taps that can meet the input are computed (on maps smaller than the
    padding, e.g. 7x7 on 3x3, the rest are zero). On CPU this runs 3-15x faster than oneDNN's native depthwise
    weight gradient in NCHW for kernels of 5x5 and more."""
    n, c, h, w = x.shape
    taps, left, right = [], [], []
    for size, gsize, k, s, p, d in zip(x.shape[2:], grad.shape[2:], kernel, stride, padding, dilation, strict=True):
        lo, hi = max(0, -((s * (gsize - 1) - p) // d)), min(k - 1, (p + size - 1) // d)  # taps that see data
        taps.append(slice(lo, hi + 1))
        left.append(p - d * lo)
        right.append(s * (gsize - 1) + d * (hi - lo) + 1 - size - left[-1])  # the padding the last tap needs
    xs = x.transpose(0, 1).reshape(1, c * n, h, w)
    if min(left) < 0 or right[0] > left[0] or right[1] > left[1]:  # conv2d pads symmetrically; else pad here
        xs, left = F.pad(xs, (left[1], right[1], left[0], right[0])), (0, 0)
    gs = grad.transpose(0, 1).reshape(c * n, 1, *grad.shape[2:])
    part = F.conv2d(xs, gs, None, stride=dilation, padding=left, dilation=stride, groups=c * n)
    hk, wk = taps[0].stop - taps[0].start, taps[1].stop - taps[1].start
    part = part[0, :, :hk, :wk].reshape(c, n, hk, wk).sum(1)
    if (hk, wk) == tuple(kernel):
        return part.unsqueeze(1)
    dw = x.new_zeros(c, 1, *kernel)
    dw[:, 0, taps[0], taps[1]] = part
    return dw


class _DepthwiseConv2d(torch.autograd.Function):
    """F.conv2d with groups = channels whose weight gradient comes from depthwise_weight_grad (the input
    gradient and the forward are torch's own)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation):
        ctx.save_for_backward(x, weight)
        ctx.conv = (stride, padding, dilation)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups=x.shape[1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation = ctx.conv
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = torch.ops.aten.convolution_backward(grad, x, weight, None, stride, padding, dilation, False, [0, 0],
                                                 x.shape[1], [True, False, False])[0] if need_x else None
        dw = depthwise_weight_grad(x, grad, weight.shape[2:], stride, padding, dilation) if need_w else None
        db = grad.sum((0, 2, 3)) if need_b else None
        return dx, dw, db, None, None, None


def adapter_exceeds_layer(layer: LoraLayer) -> bool:
    """True when the adapter holds more parameters than the layer it adapts (e.g. depthwise at high rank)."""
    w = layer.base_layer.get_parameter(layer.weight_name)
    return layer.lora_A.numel() + layer.lora_B.numel() > w.numel()


def warn_if_oversized(name: str, layer: LoraLayer) -> None:
    if adapter_exceeds_layer(layer):
        w = layer.base_layer.get_parameter(layer.weight_name)
        warnings.warn(f"adapter on '{name}' has {layer.lora_A.numel() + layer.lora_B.numel()} parameters, "
                      f"more than the layer itself ({w.numel()}): lower r for it", stacklevel=3)
