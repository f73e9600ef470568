"""The spectrum of a learned update, from its factors: the SVD of s B A without forming it,
effective rank, the per-layer table and PNG (vislora spectrum). The SVD tools read the additive s B
A only and refuse DoRA here."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn

from vislora.errors import VisloraError
from vislora.layers import LoraLayer
from vislora.targets import lora_layers


def refuse_dora(layer: LoraLayer, name: str, tool: str) -> None:
    """The SVD tools read an additive update s B A; DoRA's W' - W is not low-rank: say so, never
    compute it."""
    if not layer.additive:
        raise VisloraError(f"{tool}: layer '{name}' is DoRA (use_dora): its update m * (W + sBA) / ||W + sBA|| - W "
                         f"is not the low-rank s B A that {tool} reads; {tool} works on LoRA runs")



def effective_rank(s: torch.Tensor) -> float:
    """Roy & Vetterli's effective rank exp(H(p)), p = s / sum(s); 0 for a zero spectrum."""
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return math.exp(-(p * p.log()).sum().item())


@torch.no_grad()
def factor_svd(b: torch.Tensor, a: torch.Tensor, scaling: float = 1.0
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vh) of scaling * b @ a (fp64) from the factors: b = Qb Rb, a^T = Qa Ra, then the SVD
    of the small core scaling * Rb Ra^T, never the out x fan_in product. Its top-k triplets are the
    best rank-k approximation."""
    b, a = b.detach().double(), a.detach().double()
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(scaling * (rb @ ra.T), full_matrices=False)
    return qb @ u, s, vh @ qa.T


def update_singular_values(layer: LoraLayer) -> torch.Tensor:
    """Singular values of the layer's whole update scaling * B @ A (factor_svd)."""
    return factor_svd(*layer.update.factors())[1]


def spectrum(model: nn.Module) -> list[dict]:
    """Per LoraLayer: singular values of its update, effective rank, energy curve (cumsum s^2 / sum
    s^2), norm."""
    rows = []
    for name, layer in lora_layers(model):
        refuse_dora(layer, name, "spectrum")
        s = update_singular_values(layer).cpu()
        power = s.pow(2)
        total = power.sum()
        curve = (power.cumsum(0) / total) if total > 0 else torch.zeros_like(power)
        rows.append({"name": name, "rank": s.numel(), "singular_values": s.tolist(),
                     "effective_rank": effective_rank(s), "energy": curve.tolist(), "norm": total.sqrt().item()})
    if not rows:
        raise VisloraError(f"spectrum: {type(model).__name__} carries no LoRA layers")
    return rows


def _components_for(curve: list[float], level: float) -> int:
    return next((i + 1 for i, e in enumerate(curve) if e >= level), 0)


def format_spectrum(report: list[dict]) -> str:
    """A table: layer, rank, effective rank, ||delta_W||_F, top singular value, components for 90%
    energy."""
    width = max([len("layer"), *(len(r["name"]) for r in report)])
    lines = [f"{'layer':<{width}}  {'R':>4}  {'eff.rank':>8}  {'||dW||_F':>10}  {'s1':>10}  {'k@90%':>5}"]
    for r in report:
        s1 = r["singular_values"][0] if r["singular_values"] else 0.0
        lines.append(f"{r['name']:<{width}}  {r['rank']:>4}  {r['effective_rank']:>8.2f}  {r['norm']:>10.4g}  "
                     f"{s1:>10.4g}  {_components_for(r['energy'], 0.9):>5}")
    return "\n".join(lines)


def plot_spectrum(report: list[dict], path: str | Path) -> Path:
    """PNG read per layer: a heat map of the normalised singular values s_k / s_1 (one row per
    layer, log colour scale), and bars of each layer's effective rank and the components holding 90%
    of its energy."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    if not report:
        raise VisloraError("plot_spectrum: empty report")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    width = max(max(r["rank"] for r in report), 1)
    heat = torch.full((len(report), width), math.nan)
    for i, r in enumerate(report):
        s = torch.tensor(r["singular_values"], dtype=torch.float64)
        if s.numel() and s[0] > 0:
            heat[i, :s.numel()] = (s / s[0]).clamp(1e-6, 1)
    fig = Figure(figsize=(12, 1.5 + 0.22 * len(report)))
    FigureCanvasAgg(fig)
    ax_h, ax_r = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [3, 1.2]})
    shown = ax_h.imshow(heat.numpy(), aspect="auto", cmap="viridis", norm=LogNorm(vmin=1e-3, vmax=1),
                        interpolation="nearest", extent=(0.5, width + 0.5, len(report) - 0.5, -0.5))
    fig.colorbar(shown, ax=ax_h, label="s_k / s_1", pad=0.01)
    ax_h.set(yticks=range(len(report)), xlabel="component k", title="singular values of each layer's update")
    ax_h.set_yticklabels([r["name"] for r in report], fontsize=max(4, min(8, 400 // max(len(report), 1))))
    rows = torch.arange(len(report)).numpy()
    ax_r.barh(rows - 0.2, [r["effective_rank"] for r in report], height=0.4, label="effective rank")
    ax_r.barh(rows + 0.2, [_components_for(r["energy"], 0.9) for r in report], height=0.4, label="k for 90% energy")
    ax_r.set(xlabel="components", title="rank used", xlim=(0, width))
    ax_r.legend(fontsize=7, loc="best", framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    return path
