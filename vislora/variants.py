"""The variants behind vislora.layers' seam: each a small module that says how an update changes a
weight.

  * LowRank (LoRA):  W' = W + s B A,  A: R x fan_in (kaiming-uniform), B: out x R (zeros), additive;
  * DoRA (Liu et al. 2024):  W' = m * (W + s B A) / ||W + s B A||, one magnitude m per output row (initialised
    to ||W|| of the row), the row norm detached from the gradient as in the paper (section 4.3). Not additive.
A LoraLayer asks its active variant for the effective weight (`weight`), its tensors (`factor_roles`), its factors
(`factors`, `part_factors`, `change_factors`: the SVD tools) and, for DoRA, the per-row scale (`scale`,
`row_norms`: the fast activation path); nothing else in vislora reads the factors by name.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn

from vislora.errors import VisloraError
from vislora.kernels import AUTOCAST_DEVICES


def chunk_rows(out: int, parts: tuple[int, ...] | None, num_chunks: int = 3) -> list[slice]:
    """Row ranges of the out x fan_in weight matrix that get their own factor pair (qkv chunks, or
    all rows)."""
    if not parts:
        return [slice(0, out)]
    chunk = out // num_chunks
    return [slice(c * chunk, (c + 1) * chunk) for c in parts]


def full_precision(device_type: str):
    """A context without autocast on this device (a no-op where torch has no autocast, e.g.
    meta)."""
    if device_type in AUTOCAST_DEVICES:
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class LowRank(nn.Module):
    """LoRA's update of an out x fan_in weight: delta = s B A (s = alpha / r, or alpha / sqrt(r)
    with rslora).

    qkv_parts: for a fused projection (timm `attn.qkv`), the indices of the equal output chunks that
    get their own A/B pair, e.g. (0, 2) adapts only Wq and Wv (the LoRA paper's setting); None
    adapts every row with one pair.
"""

    additive = True  # W' = W + delta: the activation path, the fused kernel and the SVD tools rely on it

    def __init__(self, out: int, fan_in: int, r: int, alpha: float, rslora: bool = False,
                 qkv_parts: tuple[int, ...] | None = None, num_chunks: int = 3, device=None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.qkv_parts = tuple(qkv_parts) if qkv_parts else None
        self.num_chunks = num_chunks if self.qkv_parts else 1
        if out % self.num_chunks:
            raise VisloraError(f"{out} output features cannot be split into {self.num_chunks} qkv chunks")
        limit = min(out // self.num_chunks, fan_in)
        if not 1 <= r <= limit:
            raise VisloraError(f"rank r={r} must be between 1 and {limit} for this layer ({out} x {fan_in})")
        n_parts = len(self.qkv_parts) if self.qkv_parts else 1
        self.out, self.r, self.alpha, self.rslora = out, r, alpha, rslora
        self.scaling = alpha / (math.sqrt(r) if rslora else r)
        self.lora_A = nn.Parameter(torch.empty(n_parts * r, fan_in, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(n_parts * (out // self.num_chunks), r, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A as nn.Linear initialises its weight (kaiming-uniform), B zero: the layer starts as the
        base."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    # -- what the layer and the tools ask ----------------------------------------------------------
    def factor_roles(self) -> dict[str, list[nn.Parameter]]:
        """The trained tensors by role: "A", "B" (LoRA+ speeds up B) and, for DoRA, "magnitude"."""
        return {"A": [self.lora_A], "B": [self.lora_B]}

    def numel(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def full_B(self, b: torch.Tensor | None = None) -> torch.Tensor:
        """B (or any tensor in its per-part layout) as one out x (parts*r) matrix: block-diagonal
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
        """The effective weight W' of the raw weight w, in w's dtype, differentiable in the update's
        tensors."""
        return w + self.delta(w.shape, w.dtype)

    # -- changes made from outside -----------------------------------------------------------------
    @torch.no_grad()
    def set_svd_factors(self, svds: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        """One (U, S, Vh) per adapted part: A = sqrt(S) Vh, B = U sqrt(S) / s, so that s B A = U S
        Vh with balanced factors."""
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
        """A random non-zero update (what verify_layers and the conformance suite check merging
        with)."""
        self.lora_B.normal_(std=std)

    def set_scaling(self, alpha: float, rslora: bool, scaling: float) -> None:
        """The scaling an adapter file defines (vislora.adapters)."""
        self.alpha, self.rslora, self.scaling = alpha, rslora, scaling

    # -- PiSSA: the change from the starting factors -----------------------------------------------
    @property
    def pissa(self) -> bool:
        """PiSSA-initialised: the base weight holds a residual, the start factors are kept (pissa_A0
        / pissa_B0)."""
        return "pissa_A0" in self._buffers

    @torch.no_grad()
    def keep_start(self) -> None:
        self.register_buffer("pissa_A0", self.lora_A.detach().clone(), persistent=False)
        self.register_buffer("pissa_B0", self.lora_B.detach().clone(), persistent=False)

    def change_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B', A') with s B' A' = the learned change, with gradients: B A, or for PiSSA its change
        from the start [B, -B0] [A; A0] (the principal part of W it started from is not a
        change)."""
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
    """DoRA: W' = g * (W + s B A) per output row, g = m / ||W + s B A|| with the norm detached (Liu
    et al. 2024, section 4.3). m (`lora_magnitude`) covers the adapted rows only (with qkv parts:
    the adapted chunks); it starts at ||W|| of each row, so the layer starts as the base."""

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
        """One magnitude per output row, as PEFT stores it: m on the adapted rows, ||W|| (scale 1)
        elsewhere."""
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
        """g per output row: m / n on the adapted rows (n detached), 1 elsewhere; differentiable in
        m. A row of zero norm (pretrained weights hold dead filters: 5 depthwise ones in
        EfficientNet-Lite0) has m = 0 and gets g = 0, not 0 / 0 = NaN, so it stays the zero row it was."""
        m = self.lora_magnitude
        n = norms.detach().to(m.dtype).clamp_min(torch.finfo(m.dtype).tiny)
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
        """||W + s B A|| per row from the factors: n^2 = ||W||^2 + 2s rowsum(B * (W A^T)) + s^2
        rowsum((B A A^T) * B), out x fan_in x R work, no weight-sized tensor (vislora's activation
        path)."""
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
