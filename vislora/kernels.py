"""The fast, exact kernels behind vislora.layers: autograd Functions that save less and skip what a
frozen base does not need.

  * _LoraLinear: y = x W^T + b + s (x A^T) B^T as one node (saves x and the small z = x A^T only);
  * ScaleRows: DoRA's y = g * y0 + b per output channel, saving its output (which the next op usually saves too)
    instead of y0, so a magnitude costs no activation memory there;
  * _DepthwiseConv2d: a depthwise conv whose weight gradient is one grouped conv of the input with the output
    gradient (depthwise_weight_grad), several times faster than torch's own on CPU for 5x5 kernels and more.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")  # device types torch.autocast knows


def _lora_linear(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a_factor: torch.Tensor,
                 b_factor: torch.Tensor, scaling: float, need_z: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(y, z) for 2-d x: y = x W^T + b + s z B^T with z = x A^T. The update goes into the weight
    when x has more rows than inputs (out x in is then smaller than rows x out), else into y in
    place; both are exact."""
    rows, fan_in = x2.shape
    z = F.linear(x2, a_factor) if need_z or rows <= fan_in else None
    if rows > fan_in:
        return F.linear(x2, torch.addmm(weight, b_factor, a_factor, alpha=scaling), bias), z
    y = F.linear(x2, weight, bias)
    torch.addmm(y, z, b_factor.t(), alpha=scaling, out=y)  # in place; the out= form is what FlopCounterMode counts
    return y, z


class _LoraLinear(torch.autograd.Function):
    """y = x W^T + b + s (x A^T) B^T in one autograd node.

    It saves only x and the small z = x A^T (no copy of y, no separate nodes for A, B and the sum)
    and computes a gradient for W or b only if they require one (frozen base: none). Backward, with
    u = s g B: dx = g W + u A, dA = u^T x, dB = s g^T z; dx adds the update to W (out x in) or to dx
    (rows x in), whichever is smaller.
"""

    @staticmethod
    def forward(ctx, x, weight, bias, a_factor, b_factor, scaling):
        x2 = x.reshape(-1, x.shape[-1])
        y, z = _lora_linear(x2, weight, bias, a_factor, b_factor, scaling, True)
        ctx.save_for_backward(x2, z, weight, a_factor, b_factor)
        ctx.scaling = scaling
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x2, z, weight, a_factor, b_factor = ctx.saved_tensors
        g, s = grad.reshape(-1, grad.shape[-1]), ctx.scaling
        need_x, need_w, need_b, need_a, need_bb, _ = ctx.needs_input_grad
        via_weight = g.shape[0] > g.shape[1]  # more rows than outputs: rebuilding W + s B A is the cheaper way
        u = F.linear(g, b_factor.t().contiguous().mul_(s)) if need_a or need_x and not via_weight else None  # [N, R]
        dx = None
        if need_x and via_weight:
            dx = g.mm(torch.addmm(weight, b_factor, a_factor, alpha=s)).view(*grad.shape[:-1], -1)
        elif need_x:
            dx = g.mm(weight).addmm_(u, a_factor).view(*grad.shape[:-1], -1)
        dw = g.t().mm(x2) if need_w else None
        db = g.sum(0) if need_b else None
        da = u.t().mm(x2) if need_a else None
        dB = z.t().mm(g).mul_(s).t() if need_bb else None
        return dx, dw, db, da, dB, None


def _depthwise_on_cpu(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """True where _DepthwiseConv2d applies: a training step on CPU (no autocast) through a depthwise
    conv (one filter per channel) of 5x5 or more with numeric zero padding. (3x3: oneDNN's own
    gradient is faster.)"""
    return (conv.groups == conv.in_channels == conv.out_channels > 1 and x.dim() == 4 and x.device.type == "cpu"
            and conv.kernel_size[0] * conv.kernel_size[1] > 9
            and torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str))


def depthwise_weight_grad(x: torch.Tensor, grad: torch.Tensor, kernel: tuple[int, int], stride, padding,
                          dilation) -> torch.Tensor:
    """dL/dW of a depthwise conv, as ONE depthwise conv of the input with the output gradient as its
    filter.

    Channel c of sample n gives the correlation x[n, c] * grad[n, c] (stride and dilation swap
    roles); summing over n gives dW[c]. Only the kernel taps that can meet the input are computed
    (on maps smaller than the padding, e.g. 7x7 on 3x3, the rest are zero). On CPU this runs 3-15x
    faster than oneDNN's native depthwise weight gradient in NCHW for kernels of 5x5 and more."""
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
    """F.conv2d with groups = channels whose weight gradient comes from depthwise_weight_grad (the
    input gradient and the forward are torch's own)."""

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


def _reduce_dims(t: torch.Tensor, dim: int) -> list[int]:
    return [d for d in range(t.dim()) if d != dim]


def column_dot(a: torch.Tensor, b: torch.Tensor, shift: torch.Tensor | None = None,
               block_elements: int = 1 << 17) -> torch.Tensor:
    """sum over rows of a * (b - shift) for 2-d a, b (shift: one value per column, or None): in
    blocks of about `block_elements` (0.5 MB, cache-sized) through one reused buffer and a
    matrix-vector product, twice as fast on CPU as (a * b).sum(0), which allocates and faults in an
    output-sized tensor."""
    rows = max(64, block_elements // max(1, a.shape[1]))
    ones, acc = a.new_ones(rows), a.new_zeros(a.shape[1])
    buf = a.new_empty(min(rows, a.shape[0]), a.shape[1])
    for i in range(0, a.shape[0], rows):
        n = min(rows, a.shape[0] - i)
        if shift is None:
            torch.mul(a[i:i + n], b[i:i + n], out=buf[:n])
        else:
            torch.sub(b[i:i + n], shift, out=buf[:n]).mul_(a[i:i + n])
        acc.addmv_(buf[:n].t(), ones[:n])
    return acc


def channel_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum over N, H, W of a * b for contiguous NCHW a, b: one sample at a time through a reused
    buffer."""
    c = a.shape[1]
    buf, acc = a.new_empty(a.shape[1:]), a.new_zeros(c)
    ones = a.new_ones(buf[0].numel())
    for i in range(a.shape[0]):
        torch.mul(a[i], b[i], out=buf)
        acc.addmv_(buf.view(c, -1), ones)
    return acc


def _dg(grad: torch.Tensor, out: torch.Tensor, g: torch.Tensor, bias: torch.Tensor | None, dim: int
        ) -> torch.Tensor:
    """sum(grad * y0) per channel with y0 = (out - b) / g, computed from the saved output without
    forming a tensor of its size (2-d: sum(grad * (out - b)) in cache-sized blocks; 4-d: (sum(grad *
    out) - b sum(grad)))."""
    fp32 = grad.dtype == out.dtype == torch.float32
    if grad.dim() == 2 and dim == 1 and fp32:
        return column_dot(grad, out, bias.float() if bias is not None else None) / g.float()
    if grad.dim() == 4 and dim == 1 and fp32 and grad.is_contiguous() and out.is_contiguous():
        total = channel_dot(grad, out)
        grad_sum = grad.sum((0, 2, 3)) if bias is not None else None
    else:
        dims = _reduce_dims(grad, dim)
        total = (grad.float() * out.float()).sum(dims)
        grad_sum = grad.float().sum(dims) if bias is not None else None
    if bias is not None:
        total = total - bias.float() * grad_sum.float()
    return total.float() / g.float()


def _keep_output(ctx, out: torch.Tensor) -> None:
    """Keep the node's output for backward without autograd's in-place check: a detached alias
    shares its data and version counter (no reference cycle), so backward can see whether a later op
    (an in-place ReLU after an SE conv) overwrote it, and recompute instead of failing."""
    keep = not out.is_inference()  # an inference tensor has no version counter (and no backward)
    ctx.out, ctx.out_version = (out.detach(), out._version) if keep else (None, None)


def _kept_output(ctx) -> torch.Tensor | None:
    """The output _keep_output kept, or None where a later in-place op has changed it."""
    return ctx.out if ctx.out._version == ctx.out_version else None


class ScaleRows(torch.autograd.Function):
    """out = y0 * g + b, g and b broadcast along `dim` (one value per output channel), in place on
    y0: DoRA's magnitude over the detached row norm, applied to the unscaled output y0 of the
    direction W + s B A.

    It keeps `out` (the next op of a ViT's qkv or fc1 saves that tensor anyway) and gets dg =
    sum(grad * y0) from it; where some g is exactly 0, y0 cannot be recovered from out, so a copy of
    y0 is saved instead (exact). If a later op overwrote out in place, y0 comes from `recompute()`
    (the layer's direction output, no grad)."""

    @staticmethod
    def forward(ctx, y0, g, bias, dim, recompute=None):
        dim = dim % y0.dim()
        shape = [1] * y0.dim()
        shape[dim] = -1
        recover = bool((g != 0).all())
        kept = None if recover else y0.detach().clone()
        out = y0.mul_(g.to(y0.dtype).view(shape))
        if bias is not None:
            out.add_(bias.to(y0.dtype).view(shape))
        ctx.mark_dirty(y0)
        ctx.save_for_backward(kept, g, bias)
        ctx.recover, ctx.shape, ctx.dim, ctx.recompute = recover, shape, dim, recompute
        _keep_output(ctx, out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        kept, g, bias = ctx.saved_tensors
        shape, dim = ctx.shape, ctx.dim
        need_y, need_g, need_b = ctx.needs_input_grad[:3]
        dg = db = None
        out = _kept_output(ctx) if ctx.recover else None
        if need_g and out is not None:
            dg = _dg(grad, out, g, bias, dim).to(g.dtype)
        elif need_g:
            y0 = kept if kept is not None else _recomputed(ctx.recompute)
            dg = (grad.float() * y0.float()).sum(_reduce_dims(grad, dim)).to(g.dtype)
        if need_b:
            db = grad.sum(_reduce_dims(grad, dim)).to(bias.dtype)
        dy = grad * g.to(grad.dtype).view(shape) if need_y else None
        return dy, dg, db, None, None


def scale_rows(y0: torch.Tensor, g: torch.Tensor, bias: torch.Tensor | None, dim: int,
               recompute: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """ScaleRows.apply, with the kept output's version read after autograd's own bump of an in-place
    output (it comes after forward returns: read inside, every backward would see a change and
    recompute y0)."""
    out = ScaleRows.apply(y0, g, bias, dim, recompute)
    if getattr(out.grad_fn, "out", None) is not None:  # the node is ScaleRows's context
        out.grad_fn.out_version = out._version
    return out


def _recomputed(recompute) -> torch.Tensor:
    if recompute is None:
        raise RuntimeError("DoRA: a later in-place op overwrote this layer's output and adapter dropout is on, so "
                           "it cannot be recomputed exactly: set adapter dropout 0 or make that op out of place")
    with torch.no_grad():
        return recompute()


class _DoraLinear(torch.autograd.Function):
    """DoRA on a Linear in one node: y = g * (x W^T + s (x A^T) B^T) + b = x (gW)^T + s z (gB)^T +
    b.

    The per-row scale g goes into W and B (out x in work) rather than into the N x out output and
    its gradient; the node saves x, z and its output y, from which dg = (sum(grad * y) - b
    sum(grad)) / g (y0 is recomputed from x only where some g is exactly 0). dB = g * d(gB); dA, dx
    as _LoraLinear with gW, gB."""

    @staticmethod
    def forward(ctx, x, weight, bias, a_factor, b_factor, scaling, g):
        x2 = x.reshape(-1, x.shape[-1])
        gcol = g[:, None].to(weight.dtype)
        if x2.shape[0] > x2.shape[1]:  # many rows: one matmul with W' = g (W + s B A), formed once
            z = F.linear(x2, a_factor)
            out = F.linear(x, torch.addmm(weight, b_factor, a_factor, alpha=scaling).mul_(gcol), bias)  # not a view
        else:
            y, z = _lora_linear(x2, weight * gcol, bias, a_factor, b_factor * gcol, scaling, True)
            out = y.view(*x.shape[:-1], y.shape[-1]) if x.dim() != 2 else y
        ctx.save_for_backward(x2, z, weight, a_factor, b_factor, g, bias)
        ctx.scaling, ctx.recover = scaling, bool((g != 0).all())
        _keep_output(ctx, out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x2, z, weight, a_factor, b_factor, g, bias = ctx.saved_tensors
        y = _kept_output(ctx) if ctx.recover else None
        gr, s = grad.reshape(-1, grad.shape[-1]), ctx.scaling
        need_x, need_w, need_bias, need_a, need_b, _, need_g = ctx.needs_input_grad
        gcol = g[:, None].to(weight.dtype)
        gb = b_factor * gcol.to(b_factor.dtype)
        via_weight = gr.shape[0] > gr.shape[1]  # more rows than outputs: rebuild W' = g (W + s B A) once
        u = F.linear(gr, gb.t().contiguous().mul_(s)) if need_a or need_x and not via_weight else None
        dx = None
        if need_x and via_weight:
            dx = gr.mm(torch.addmm(weight, b_factor, a_factor, alpha=s).mul_(gcol)).view(*grad.shape[:-1], -1)
        elif need_x:
            dx = gr.mm(weight * gcol).addmm_(u, a_factor).view(*grad.shape[:-1], -1)
        da = u.t().mm(x2) if need_a else None
        db = z.t().mm(gr).mul_(s).t().mul_(gcol.to(z.dtype)) if need_b else None
        dw = gr.t().mm(x2).mul_(gcol) if need_w else None  # W' = g W (the norm is detached)
        dbias = gr.sum(0) if need_bias else None
        dg = None
        if need_g and y is not None:
            dg = _dg(gr, y.reshape(-1, y.shape[-1]), g, bias, 1).to(g.dtype)
        elif need_g:  # some g is 0, or y was overwritten in place: y0 = x W^T + s z B^T, recomputed
            y0 = torch.addmm(F.linear(x2, weight), z, b_factor.t(), alpha=s)
            dg = (gr.float() * y0.float()).sum(0).to(g.dtype)
        return dx, dw, dbias, da, db, None, dg
