"""vislora: low-rank adapters (LoRA) for timm vision models, with exact merging for every Conv2d."""

from vislora.adapters import load_adapter, save_adapter
from vislora.inject import (
    PRESETS,
    LoraConfig,
    eject,
    inject,
    lora_layers,
    merge,
    trainable_summary,
    unload,
    unmerge,
)
from vislora.layers import LoraLayer

__version__ = "0.1.0"
__all__ = ["PRESETS", "LoraConfig", "LoraLayer", "eject", "inject", "load_adapter", "lora_layers", "merge",
           "save_adapter", "trainable_summary", "unload", "unmerge"]
