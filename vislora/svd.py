"""The mathematics of low rank: PiSSA init, adapter extraction and shrinking by truncated SVD,
update penalties (spectra: vislora.spectrum).

Every LoraLayer's update is delta_W = scaling * B @ A on the raw weight viewed as out x fan_in
(fan_in = in/groups * kh * kw for a conv), so one matrix view serves Linear and every Conv2d.
Per-projection qkv layers factor each adapted output chunk on its own (B is block-diagonal over the
chunks).
"""

from __future__ import annotations

import heapq
import math
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn

from vislora.config import LoraConfig
from vislora.errors import VisloraError
from vislora.inject import eject, inject
from vislora.layers import ADAPTABLE, LoraLayer, chunk_rows, raw_weight_name
from vislora.spectrum import factor_svd, refuse_dora
from vislora.targets import find_targets, lora_layers, pattern_value, resolve_qkv_parts

NUM_CHUNKS = 3  # inject() splits a fused qkv projection into 3 chunks


# ---- shared helpers ------------------------------------------------------------------------------
def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32 at least (fp64 stays fp64)."""
    return torch.promote_types(t.dtype, torch.float32)


def _raw(module: nn.Module) -> torch.Tensor:
    return module.get_parameter(raw_weight_name(module))


# ---- PiSSA ---------------------------------------------------------------------------------------
def pissa_init(model: nn.Module) -> None:
    """PiSSA on every LoRA layer of the model (LoraLayer.init_pissa): each adapter starts as the
    top-r singular triplets of its weight, the base keeps the residual, the output is unchanged."""
    layers = list(lora_layers(model))
    if not layers:
        raise VisloraError(f"pissa_init: {type(model).__name__} carries no LoRA layers: inject() first")
    for name, layer in layers:
        try:
            layer.init_pissa()
        except ValueError as e:
            raise VisloraError(f"pissa_init: layer '{name}': {e}") from None


@torch.no_grad()
def pissa_as_lora(layer: LoraLayer) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Plain-LoRA factors of a PiSSA layer's change w.r.t. the ORIGINAL weight: (A', B', scaling').

    scaling' * B' @ A' = scaling * (B @ A - B0 @ A0), with A' = [A; A0] (2R x fan_in) and B' = [B,
    -B0] (out x 2R, block-diagonal B assembled for qkv parts), scaling' = scaling. A file written
    from them needs lora_alpha = scaling' * 2R (scaling' * sqrt(2R) with rslora) to keep PEFT's
    scaling.
"""
    if not layer.update.pissa:
        raise VisloraError(f"layer {layer.extra_repr()} was not PiSSA-initialised: pissa_init() keeps A0/B0")
    b, a = layer.update.change_factors()
    return a.detach().clone(), b.detach().clone(), layer.scaling


# ---- extraction ----------------------------------------------------------------------------------
@dataclass
class _Diff:
    """W_tuned - W_base of one layer, factored per adapted part."""

    name: str
    parts: tuple[int, ...] | None
    limit: int  # max rank per part
    unit_params: int  # adapter parameters per unit of rank (all parts)
    adaptable: float = 0.0  # ||D||^2 of the adapted parts (sum of their S^2)
    other: float = 0.0  # ||D||^2 of the qkv chunks no adapter covers
    svds: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    rank: int = 0

    @property
    def total(self) -> float:
        return self.adaptable + self.other

    @property
    def unchanged(self) -> bool:
        """The adapted part of the weight did not change: nothing for an adapter to carry."""
        return self.adaptable == 0.0

    def kept(self, k: int) -> float:
        return sum(s[:k].double().pow(2).sum().item() for _, s, _ in self.svds)

    def discarded(self, k: int) -> float:
        """Energy lost at rank k: the SVD tails plus the chunks no adapter covers (summed, not
        subtracted)."""
        return sum(s[k:].double().pow(2).sum().item() for _, s, _ in self.svds) + self.other


def _effective_weight(module: nn.Module, where: str) -> torch.Tensor:
    """The weight a module's forward uses, in raw form: raw + pending adapter update for a
    LoraLayer."""
    if isinstance(module, LoraLayer):
        w = _raw(module.base_layer).detach()
        with torch.no_grad():
            return module.effective_weight(_acc_dtype(w))  # LoRA's W + s B A, DoRA's scaled direction
    if not isinstance(module, ADAPTABLE):
        raise VisloraError(f"{where}: '{type(module).__name__}' is not a layer vislora adapts "
                         f"({', '.join(t.__name__ for t in ADAPTABLE)})")
    return _raw(module).detach()


def _module(model: nn.Module, name: str, which: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as e:
        raise VisloraError(f"{which} model ({type(model).__name__}) has no module '{name}': the two models must "
                         "share the architecture") from e


@torch.no_grad()
def _difference(name: str, base_module: nn.Module, tuned_model: nn.Module, parts: tuple[int, ...] | None,
                num_chunks: int = NUM_CHUNKS) -> _Diff:
    tuned_module = _module(tuned_model, name, "tuned")
    w_base = _effective_weight(base_module, f"base '{name}'")
    w_tuned = _effective_weight(tuned_module, f"tuned '{name}'")
    if w_base.shape != w_tuned.shape:
        raise VisloraError(f"layer '{name}': base weight {tuple(w_base.shape)} and tuned weight "
                         f"{tuple(w_tuned.shape)} differ in shape")
    raw_base = base_module.base_layer if isinstance(base_module, LoraLayer) else base_module
    raw_tuned = tuned_module.base_layer if isinstance(tuned_module, LoraLayer) else tuned_module
    if raw_weight_name(raw_base) != raw_weight_name(raw_tuned):
        raise VisloraError(f"layer '{name}': base stores '{raw_weight_name(raw_base)}', tuned stores "
                         f"'{raw_weight_name(raw_tuned)}': their difference is not a weight update")
    acc = _acc_dtype(w_base)
    d = (w_tuned.to(w_base.device, acc) - w_base.to(acc)).reshape(w_base.shape[0], -1)
    rows = chunk_rows(d.shape[0], parts, num_chunks)
    n_parts, chunk = len(rows), rows[0].stop - rows[0].start
    diff = _Diff(name, parts, min(chunk, d.shape[1]), n_parts * (chunk + d.shape[1]))
    diff.other = _uncovered_energy(d, rows)
    if any(torch.any(d[r]) for r in rows):
        diff.svds = [torch.linalg.svd(d[r], full_matrices=False) for r in rows]
        diff.adaptable = sum(s.double().pow(2).sum().item() for _, s, _ in diff.svds)
    return diff


def _uncovered_energy(d: torch.Tensor, rows: list[slice]) -> float:
    """||D||^2 of the rows (qkv chunks) that no adapter part covers."""
    keep = torch.ones(d.shape[0], dtype=torch.bool, device=d.device)
    for r in rows:
        keep[r] = False
    return d[keep].double().pow(2).sum().item()


def _energy_rank(diff: _Diff, energy: float) -> int:
    """Smallest k keeping `energy` of what the adapter can represent (SVD energy of the adapted
    parts)."""
    curve = sum(s.double().pow(2).cumsum(0) for _, s, _ in diff.svds)  # kept energy at k = 1, 2, ...
    k = int(torch.searchsorted(curve, energy * diff.adaptable).item()) + 1
    return min(k, diff.limit)


def _fit_budget(diffs: list[_Diff], budget: int) -> None:
    """Greedy: while over budget, lower by one the rank whose last unit keeps the least energy per
    parameter."""
    used = sum(d.rank * d.unit_params for d in diffs)
    floor = sum(d.unit_params for d in diffs)
    if floor > budget:
        raise VisloraError(f"budget={budget} adapter parameters is below the minimum {floor} (rank 1 on every "
                         f"changed layer): raise it, or adapt fewer layers")

    def marginal(d: _Diff) -> float:
        last = sum(s[d.rank - 1].double().pow(2).item() for _, s, _ in d.svds)
        return last / d.adaptable / d.unit_params

    heap = [(marginal(d), i, d.rank) for i, d in enumerate(diffs) if d.rank > 1]
    heapq.heapify(heap)
    while used > budget:
        _, i, k = heapq.heappop(heap)
        d = diffs[i]
        if k != d.rank:
            continue
        d.rank -= 1
        used -= d.unit_params
        if d.rank > 1:
            heapq.heappush(heap, (marginal(d), i, d.rank))


def _check_rank_args(rank: int | str, energy: float, budget: int | None) -> None:
    if isinstance(rank, str):
        if rank not in ("auto", "full"):
            raise VisloraError(f"rank='{rank}': use an int >= 1, 'auto' (by energy) or 'full' (each layer's max)")
    elif isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise VisloraError(f"rank={rank!r}: use an int >= 1, 'auto' or 'full'")
    if not 0 < energy <= 1:
        raise VisloraError(f"energy={energy} must be in (0, 1]")
    if budget is not None and (rank != "auto" or budget < 1):
        raise VisloraError(f"budget={budget} needs rank='auto' and a positive parameter count")


def _fixed_rank(name: str, limit: int, rank: int | str, config: LoraConfig) -> int:
    """'full': the layer's max; an int: config.rank_pattern's entry, else `rank`; capped at the
    max."""
    if rank == "full":
        return limit
    r = pattern_value(name, config.rank_pattern, rank)
    if isinstance(r, float) and 0 < r < 1:
        r = max(1, round(r * limit))
    return min(int(r), limit)


def _inject_ranks(model: nn.Module, config: LoraConfig, diffs: list[_Diff], within: str | None = None
                  ) -> dict[str, LoraLayer]:
    """Inject `config` with every changed layer at its planned rank (exact names in rank_pattern)
    and the unchanged ones excluded; returns the new layers by name."""
    # longest names first: a pattern also matches names ending in ".<pattern>", and the first match
    # wins
    ranks = {d.name: d.rank for d in sorted(diffs, key=lambda d: -len(d.name)) if not d.unchanged}
    common = Counter(ranks.values()).most_common(1)[0][0]
    skip = [f"^{re.escape(d.name)}$" for d in diffs if d.unchanged]  # anchored regex: that module only
    config = replace(config, r=common, rank_pattern=ranks, init="default", exclude=[*config.exclude, *skip])
    inject(model, config, within=within)
    injected = dict(lora_layers(model))
    got = {n: layer.r for n, layer in injected.items()}
    if got != ranks:
        raise RuntimeError(f"planned ranks {ranks} but inject() gave {got}")
    return injected


@torch.no_grad()
def _set_factors(diffs: list[_Diff], injected: dict[str, LoraLayer]) -> list[dict]:
    """Each injected layer takes its diff's top d.rank singular triplets (zeros for an unchanged
    one). One report row per diff: name, rank, parts, energy, rel_error, norm, params, unchanged."""
    report = []
    for d in diffs:
        layer = injected.get(d.name)
        if layer is not None:
            if d.unchanged:
                layer.update.zero_()
            else:
                layer.update.set_svd_factors([(u[:, :d.rank], s[:d.rank], vh[:d.rank]) for u, s, vh in d.svds])
        report.append({
            "name": d.name, "rank": 0 if layer is None else layer.r, "parts": list(d.parts or ()),
            "energy": d.kept(d.rank) / d.total if d.total else 1.0,
            "rel_error": math.sqrt(d.discarded(d.rank) / d.total) if d.total else 0.0,
            "norm": math.sqrt(d.total),
            "params": 0 if layer is None else layer.adapter_numel(),
            "unchanged": d.unchanged,
        })
    return report


def _normalised_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict with LoraLayer wrappers seen through: `x.base_layer.weight` -> `x.weight`, no
    lora_ keys."""
    return {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items()
            if ".lora_" not in k and ".pissa_" not in k}


def _carry_unrepresented(base_model: nn.Module, tuned_model: nn.Module, covered: set[str]) -> list[str]:
    """Tensors that differ between the models but that no adapter covers (BN statistics, norms, the
    stem, other layers): their modules are copied from tuned_model and trained-module entries
    (`modules_to_save` in the file). Returns the carried module names; a changed bias of an adapted
    layer cannot be carried and is warned about."""
    base_sd, tuned_sd = _normalised_state(base_model), _normalised_state(tuned_model)
    train = list(base_model.vislora_train)
    lost = [k for k, v in base_sd.items() if k not in covered and not any(k.startswith(t + ".") for t in train)
            and k in tuned_sd and tuned_sd[k].shape == v.shape and not torch.equal(tuned_sd[k].to(v.device), v)]
    adapted = {n for n, _ in lora_layers(base_model)}
    owners = sorted({k.rpartition(".")[0] for k in lost})
    carried = [o for o in owners if o and not any(o == a or o.startswith(a + ".") for a in adapted)]
    with torch.no_grad():
        for name in carried:
            _module(base_model, name, "base").load_state_dict(_module(tuned_model, name, "tuned").state_dict())
    base_model.vislora_train = train + carried
    left = [k for k in lost if k.rpartition(".")[0] not in carried]
    if left:
        warnings.warn(f"extract_adapter: {len(left)} changed tensors of adapted layers cannot be carried (a LoRA "
                      f"update has no bias): {', '.join(left[:6])}" + (" ..." if len(left) > 6 else ""),
                      stacklevel=3)
    return carried


def extract_adapter(base_model: nn.Module, tuned_model: nn.Module, config: LoraConfig, rank: int | str = 8,
                    energy: float = 0.9, budget: int | None = None) -> tuple[nn.Module, list[dict]]:
    """Turn a fully fine-tuned model into a LoRA adapter on `base_model` by truncated SVD of W_tuned
    - W_base.

    rank: an int (per layer, capped at the layer's max; config.rank_pattern entries win), 'full'
    (each layer's max rank: exact), or 'auto' (smallest rank keeping `energy` of each layer's
    update, then, with `budget`, lowered greedily where the last component keeps the least energy
    per parameter until the adapter has at most `budget` parameters). The chosen ranks go into the
    injected config's rank_pattern. Layers whose weight did not change are not adapted (reported
    with unchanged=True, rank 0). A base_model that already carries adapters keeps its layers and
    ranks (unchanged layers get A = B = 0); rank='auto'/'full' then raise. The `train` modules (the
    head) are copied from tuned_model, and so is every other module whose tensors changed without an
    adapter to carry them (BN statistics, norms, stem): they join base_model.vislora_train
    (modules_to_save in the file). Returns (base_model, per-layer report rows: name, rank, parts,
    energy, rel_error, norm, params, unchanged).
"""
    _check_rank_args(rank, energy, budget)
    injected = dict(lora_layers(base_model))
    if injected:
        if rank in ("auto", "full") or budget is not None:
            raise VisloraError("base_model already carries adapters, whose ranks are used: eject() it to let "
                             "extract_adapter choose ranks")
        for name, layer in injected.items():
            if layer.merged or layer.update.pissa or not layer.additive:
                raise VisloraError(f"base layer '{name}' is merged, PiSSA-initialised or DoRA: extract into a plain "
                                 "or freshly injected LoRA model")
        diffs = [_difference(n, layer.base_layer, tuned_model, layer.qkv_parts, layer.num_chunks)
                 for n, layer in injected.items()]
        for d in diffs:
            d.rank = injected[d.name].r
    else:
        names = find_targets(base_model, config)
        diffs = []
        for n in names:
            module = base_model.get_submodule(n)
            diffs.append(_difference(n, module, tuned_model, resolve_qkv_parts(n, module, config.qkv)))
        changed = [d for d in diffs if not d.unchanged]
        if not changed:
            raise VisloraError("extract_adapter: the tuned model's target weights equal the base model's: "
                             "nothing to extract")
        for d in changed:
            d.rank = _energy_rank(d, energy) if rank == "auto" else _fixed_rank(d.name, d.limit, rank, config)
        if budget is not None:
            _fit_budget(changed, budget)
    for d in diffs:  # keep only the kept singular triplets
        d.svds = [(u[:, :d.rank], s, vh[:d.rank]) for u, s, vh in d.svds]

    if not injected:
        injected = _inject_ranks(base_model, config, diffs)
    report = _set_factors(diffs, injected)
    train = list(base_model.vislora_train)
    with torch.no_grad():
        for t in train:
            _module(base_model, t, "base").load_state_dict(_module(tuned_model, t, "tuned").state_dict())
    covered = {f"{d.name}.{injected[d.name].weight_name}" for d in diffs if d.name in injected}
    covered |= {f"{d.name}.{raw_weight_name(base_model.get_submodule(d.name))}" for d in diffs
                if d.name not in injected}
    _carry_unrepresented(base_model, tuned_model, covered)
    return base_model, report


# ---- shrinking a trained adapter -----------------------------------------------------------------
def _update_diff(name: str, layer: LoraLayer) -> _Diff:
    """A trained layer's update s * B A as a _Diff, with per-part SVDs computed from the factors
    (factor_svd)."""
    refuse_dora(layer, name, "shrink")
    if layer.merged or layer.update.pissa:
        raise VisloraError(f"shrink: layer '{name}' is merged or PiSSA-initialised (its base weight is not the "
                         "original): shrink the saved adapter, which load_adapter() reads as plain LoRA")
    svds = [factor_svd(b, a, layer.scaling) for b, a in layer.update.part_factors()]
    limit = min(s.numel() for _, s, _ in svds)
    diff = _Diff(name, layer.qkv_parts, limit, layer.adapter_numel() // layer.r, svds=svds)
    diff.adaptable = sum(s.pow(2).sum().item() for _, s, _ in svds)
    return diff


def check_shrink_args(rank: int | None, energy: float | None, budget: int | None) -> None:
    """Exactly one of rank (>= 1), energy (in (0, 1]) or budget (>= 1): a bad value stops shrink
    before it writes."""
    given = [k for k, v in (("rank", rank), ("energy", energy), ("budget", budget)) if v is not None]
    if len(given) != 1:
        raise VisloraError(f"shrink: give exactly one of rank, energy or budget (got {', '.join(given) or 'none'})")
    for key, value in (("rank", rank), ("budget", budget)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise VisloraError(f"shrink: {key}={value!r} must be an int >= 1")
    if energy is not None and not 0 < energy <= 1:
        raise VisloraError(f"shrink: energy={energy} must be in (0, 1]")


def shrink_adapter(model: nn.Module, rank: int | None = None, energy: float | None = None,
                   budget: int | None = None) -> list[dict]:
    """Replace, in place, every LoRA layer's update s * B A by its best rank-k approximation: the
    truncated SVD computed from the factors (factor_svd, per qkv part), exact by Eckart-Young.

    k per layer (never above the old rank): `rank`; the smallest keeping `energy` of the update's
    squared norm; or, with `budget` adapter parameters, lowered from the old ranks as
    extract_adapter's budget does (greedily where the last component keeps the least share of its
    layer's energy per parameter). The model is re-injected with the new ranks in
    config.rank_pattern and each layer's alpha unchanged (s = alpha / k, the factors absorb the
    change); layers whose update is zero are dropped; `train` modules are untouched. Returns one row
    per old layer: name, old_rank, rank, parts, energy, rel_error (= sqrt(discarded s^2 / all s^2)),
    norm, old_params, params, unchanged.
"""
    check_shrink_args(rank, energy, budget)
    layers = dict(lora_layers(model))
    if not layers:
        raise VisloraError(f"shrink: {type(model).__name__} carries no LoRA layers")
    diffs = [_update_diff(n, layer) for n, layer in layers.items()]
    changed = [d for d in diffs if not d.unchanged]
    if not changed:
        raise VisloraError("shrink: every adapter update is zero (an untrained adapter): there is nothing to keep")
    for d in changed:
        d.rank = min(rank, d.limit) if rank is not None else _energy_rank(d, energy) if energy else d.limit
    if budget is not None:
        _fit_budget(changed, budget)
    old = {n: (layer.r, layer.adapter_numel()) for n, layer in layers.items()}
    config, within = model.vislora_config, getattr(model, "vislora_within", None)
    eject(model)
    report = _set_factors(diffs, _inject_ranks(model, config, diffs, within))
    return [{"name": row["name"], "old_rank": old[row["name"]][0], **row, "old_params": old[row["name"]][1]}
            for row in report]


# ---- penalties -----------------------------------------------------------------------------------
def frobenius_penalty(model: nn.Module) -> torch.Tensor:
    """Sum of ||update||_F^2 = scaling^2 * trace((B^T B)(A A^T)) over layers, never forming B @ A;
    the update of a PiSSA layer is its change from the start (zero at step 0)."""
    terms = []
    for name, layer in lora_layers(model):
        refuse_dora(layer, name, "train.lowrank_penalty")
        b, a = layer.update.change_factors()
        terms.append(layer.scaling ** 2 * ((b.T @ b) * (a @ a.T)).sum())
    if not terms:
        raise VisloraError(f"frobenius_penalty: {type(model).__name__} carries no LoRA layers")
    return torch.stack(terms).sum()


def factor_l2(model: nn.Module) -> torch.Tensor:
    """Sum of ||A - A0||_F^2 + ||B - B0||_F^2 over layers: plain L2 on the factors (A0 = B0 = 0
    unless PiSSA started them at the principal part of W)."""
    terms = []
    for _, layer in lora_layers(model):
        terms.append(layer.update.factor_change_l2())  # DoRA too: its direction factors are plain L2
    if not terms:
        raise VisloraError(f"factor_l2: {type(model).__name__} carries no LoRA layers")
    return torch.stack(terms).sum()
