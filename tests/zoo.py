"""The tiny models the tests share: one table of timm model / LoRA config cases (in the spirit of PEFT's TEST_CASES
and timm's list_models parametrisation) that the inject, adapter-file, SVD, shrink and export tests run over, and
the tiny ViT run recipe the train / eval / run-folder tests write.

Every case is a random-init timm model (pretrained=False) at a tiny input size that builds in well under a second;
together they cover the layer kinds vislora adapts: Linear qkv / proj / MLP (ViT), depthwise and 1x1 convs
(MobileNetV3), dense kxk convs (ResNet), a depthwise 7x7 with a Linear MLP (ConvNeXt) and the DoRA variant.
A test takes the cases it needs by id (`zoo.case("vit")`), or as pytest params with their configs:
`@pytest.mark.parametrize("case,config", zoo.with_config("vit", "resnet", r=4))`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import timm
import torch
import yaml

from vislora import LoraConfig
from vislora.tasks import classification

VIT_KWARGS = {"img_size": 32, "patch_size": 4, "depth": 2}


@dataclass(frozen=True, eq=False)
class Case:
    """One timm model at a tiny input size and the LoraConfig keys that adapt it (rank left to the test)."""

    id: str
    model: str
    kwargs: dict = field(default_factory=dict)
    size: int = 32
    lora: dict = field(default_factory=dict)

    def build(self, seed: int = 0, num_classes: int = 5) -> torch.nn.Module:
        """The model in eval mode, its random init fixed by `seed`."""
        torch.manual_seed(seed)
        return timm.create_model(self.model, pretrained=False, num_classes=num_classes, **self.kwargs).eval()

    def config(self, **overrides) -> LoraConfig:
        """The case's LoraConfig, with `overrides` (r, alpha, init, ...) on top of its own keys."""
        return LoraConfig(**{**self.lora, **overrides})


CASES = [
    Case("vit", "vit_tiny_patch16_224", VIT_KWARGS, 32, {"targets": "vit"}),
    Case("vit-qv", "vit_tiny_patch16_224", VIT_KWARGS, 32, {"targets": "vit", "qkv": "qv"}),
    Case("mobilenet", "mobilenetv3_small_050", {}, 32, {"targets": "conv"}),  # depthwise kxk, 1x1, SE 1x1
    Case("resnet", "resnet18", {}, 32, {"targets": "all"}),  # dense 3x3 and 1x1 downsample convs
    Case("convnext", "convnext_atto", {"ls_init_value": 0.5}, 32, {"targets": "conv"}),  # dw 7x7, Linear MLP
    Case("vit-dora", "vit_tiny_patch16_224", VIT_KWARGS, 32, {"targets": "vit", "qkv": "qv", "use_dora": True}),
]
BY_ID = {case.id: case for case in CASES}


def case(case_id: str) -> Case:
    """The case of this id."""
    return BY_ID[case_id]


def with_config(*ids: str, **overrides) -> list:
    """pytest params (case, its LoraConfig with `overrides`) for the named cases (every case when none is named)."""
    return [pytest.param(BY_ID[i], BY_ID[i].config(**overrides), id=i) for i in (ids or BY_ID)]


# ---- the tiny run ----------------------------------------------------------------------------------
RUN_VIT = {"name": "vit_tiny_patch16_224", "pretrained": False,
           "kwargs": {"img_size": 32, "patch_size": 8, "depth": 1}}


def write_recipe(path: Path, folder, adapter, **train) -> Path:
    """A recipe file for a two-epoch run of RUN_VIT on `folder` (32 px images), `train` keys on top."""
    recipe = {"model": RUN_VIT, "adapter": adapter,
              "data": {"path": str(folder), "img_size": 32, "workers": 0, "augment": {"scale": [0.8, 1.0]}},
              "train": {"epochs": 2, "batch_size": 8, "lr": 3e-3, "warmup_epochs": 0, **train}}
    path.write_text(yaml.safe_dump(recipe))
    return path


def best_top1(run: Path) -> float:
    """The best val top1 a run's metrics.jsonl reports."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return max(r["val_top1"] for r in rows)


def interrupt_validation(monkeypatch, at: int = 2):
    """classification.validate raises KeyboardInterrupt on its `at`-th call (Ctrl-C during a run); returns
    the function that puts the real validate back."""
    real, calls = classification.validate, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(classification, "validate", interrupted)
    return lambda: monkeypatch.setattr(classification, "validate", real)
