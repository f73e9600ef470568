"""vislora: low-rank adapters (LoRA) for timm vision models, with exact merging for every Conv2d.

The package, in import order (each module imports only those above it; tests/test_architecture.py checks it):
layers (the LoRA math) -> inject (config, presets, inject / unload) -> svd (PiSSA, extract, shrink, spectra) ->
adapters (PEFT-layout files); image (the one image reader, the eval transform); recipe (defaults) -> data ->
tasks (classification, detection, segmentation behind one interface) -> rundir (run directories), serve (exported
files) -> train (the one loop), evaluate, export, footprint -> shrink, fewshot -> cli.
"""

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
