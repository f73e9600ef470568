"""vislora: low-rank adapters (LoRA) for timm vision models, with exact merging for every Conv2d.

The package, in import order (each module imports only those above it; tests/test_architecture.py
checks it): kernels -> layers (the LoRA / DoRA math) -> config (LoraConfig) -> targets (presets,
patterns, the model walk) -> inject (inject / unload) -> named (several adapters) -> spectrum -> svd
(PiSSA, extract, shrink) -> adapters (PEFT-layout files); image (the one image reader, the eval
transform); defaults -> recipe -> data -> tasks (classification, detection, segmentation behind one
interface) -> rundir (run directories), exported (loading exported files) -> train (the one loop),
evaluate, export, subject -> footprint -> shrink, fewshot -> commands -> cli.

The API names below load on first use (PEP 562): `python -m vislora` and the `vislora` command run
this file first, and `--help` or a refused recipe must not wait for torch and timm to import.
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"
API = {"PRESETS": "vislora.targets", "LoraConfig": "vislora.config", "eject": "vislora.inject",
       "inject": "vislora.inject", "lora_layers": "vislora.targets", "merge": "vislora.inject",
       "trainable_summary": "vislora.inject", "unload": "vislora.inject", "unmerge": "vislora.inject",
       "load_adapter": "vislora.adapters", "save_adapter": "vislora.adapters", "LoraLayer": "vislora.layers",
       "add_adapter": "vislora.named", "set_adapter": "vislora.named", "delete_adapter": "vislora.named",
       "mixed_forward": "vislora.named", "adapter_names": "vislora.named"}
__all__ = sorted(API)


def __getattr__(name: str):
    """`vislora.inject`, `from vislora import LoraConfig` ...: the API name, imported from its
    module."""
    if name not in API:
        raise AttributeError(f"module 'vislora' has no attribute {name!r}")
    value = getattr(importlib.import_module(API[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *API})


class _Package(types.ModuleType):
    """The package object, whose `inject` is the function: importing the submodule vislora.inject
    binds that module as the package's `inject` attribute, which this property keeps from hiding the
    function (the submodule stays in sys.modules, where `from vislora.inject import ...` finds
    it)."""

    @property
    def inject(self):
        return importlib.import_module("vislora.inject").inject

    @inject.setter
    def inject(self, module) -> None:  # the import system's binding of the submodule: the function stays
        pass


sys.modules[__name__].__class__ = _Package
