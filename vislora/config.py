"""The adapter config: everything that defines one adapter, and the record of a named adapter in a
model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field


@dataclass
class LoraConfig:
    """Everything that defines an adapter. Defaults follow the LoRA paper and PEFT."""

    r: int | float = 8  # rank per layer; a float in (0, 1) is a fraction of each layer's max rank
    alpha: float = 16  # the update is scaled by alpha / r (alpha / sqrt(r) with rslora)
    dropout: float = 0.0  # dropout on the adapter input (activation path only)
    targets: str | Sequence[str] = "vit"  # a preset name (see PRESETS) or a list of name patterns
    exclude: Sequence[str] = ()  # patterns (same forms as targets) that are never adapted
    rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r)
    # trained fully beside the adapters: "head" (the timm classifier), module names / patterns /
    # globs ("blocks.11", "*norm*": modules_to_save in the file), parameter patterns ending in
    # .weight / .bias ("*.bias": BitFit)
    train: Sequence[str] = ("head",)
    qkv: str | None = None  # per-projection adapters inside fused qkv layers: "qv", "qkv", ...; None = one pair
    rank_pattern: dict[str, int] = field(default_factory=dict)  # per-layer r, keys matched like targets
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # per-layer alpha
    init: str = "default"  # "default" (B = 0) or "pissa" (principal singular vectors, see vislora.svd)
    # DoRA (Liu et al. 2024, PEFT's name): W' = m * (W + s B A) / ||W + s B A||, one trained
    # magnitude per output row; not additive, so PiSSA, shrink and the low-rank penalty refuse it
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
    """One named adapter of a model: its config, the modules and parameters it trains fully, its
    search scope."""

    config: LoraConfig
    train: list[str]
    train_params: list[str]
    within: str | None = None
