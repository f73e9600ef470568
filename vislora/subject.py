"""What `vislora footprint` measures, resolved: a run directory, a recipe YAML, a timm model name or
an nn.Module as builders of the adapted model and its base, with the task (vislora.tasks) that draws
its random training batches (synthetic_batch) and computes its loss; a timm name or a module is the
default task's (a classifier's)."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import timm
import torch
import torch.nn as nn

from vislora import runpaths, tasks
from vislora.config import LoraConfig
from vislora.defaults import DEFAULTS
from vislora.errors import VisloraError
from vislora.files import read_json
from vislora.inject import eject, inject
from vislora.recipe import load_recipe
from vislora.targets import find_targets, lora_layers


@dataclass
class Subject:
    """A target resolved into builders: the adapted model (adapter in place, trainable set) and its
    base."""

    label: str
    kind: str  # run | recipe | timm | module
    build_adapted: Callable[[], nn.Module]
    build_base: Callable[[], nn.Module]
    img_size: int
    spec: dict | None  # what a subprocess needs to rebuild it (None for an in-memory module)
    task: ModuleType  # what draws its batches and computes its loss (vislora.tasks)
    recipe: dict  # what the task's loss reads (label smoothing): the run's, the recipe's or the defaults
    preprocess: dict | None = None  # a run's preprocess.json (input_size, class_names ...); None: none yet
    classes: list[str] | None = None  # None: as many as the model outputs (timm names and modules)


def default_lora(model: nn.Module) -> LoraConfig:
    """LoraConfig() defaults, targets 'vit' where the model has ViT projections, else 'conv'."""
    for targets in ("vit", "conv"):
        try:
            find_targets(model, LoraConfig(targets=targets))
            return LoraConfig(targets=targets)
        except ValueError:
            continue
    raise VisloraError(f"{type(model).__name__} has no layer the 'vit' or 'conv' presets adapt: pass a LoraConfig")


def _input_size(model: nn.Module, fallback: int = 224) -> int:
    """The input side of the timm model's pretrained_cfg: the model's own, or its timm body's (a
    detector's or a segmenter's), else `fallback`."""
    cfg = next((m.pretrained_cfg for m in model.modules() if getattr(m, "pretrained_cfg", None)), None) or {}
    size = cfg.get("input_size") or (3, fallback, fallback)
    return int(size[-1])


def placeholders(n: int = 10) -> list[str]:
    """Class names "0" .. "n-1", for a model whose data names none."""
    return [str(i) for i in range(n)]


def _default_task() -> tuple[ModuleType, dict]:
    """The task (and recipe) of a timm name or a module: the recipe defaults' task, a
    classifier's."""
    return tasks.get(DEFAULTS["task"]), copy.deepcopy(DEFAULTS)


def _timm_model(name: str, img_size: int | None, num_classes: int | None = None) -> nn.Module:
    kwargs = {"num_classes": num_classes} if num_classes else {}
    torch.manual_seed(0)
    if img_size:
        try:
            return timm.create_model(name, pretrained=False, img_size=img_size, **kwargs)
        except TypeError:  # CNNs take any input size and no img_size argument
            pass
    return timm.create_model(name, pretrained=False, **kwargs)


def _with_lora(model: nn.Module, lora: LoraConfig | None) -> nn.Module:
    return inject(model, copy.deepcopy(lora) if lora is not None else default_lora(model), verify=False)


def _run_subject(path: Path, img_size: int | None) -> Subject:
    """A run as training built it: the recipe's model and adapter (trainable set, PiSSA rank, linear
    probe), for any task."""
    recipe = runpaths.read_recipe(path)
    task = tasks.get(recipe["task"])
    preprocess = read_json(path / runpaths.PREPROCESS, "run's preprocessing")
    classes = preprocess["class_names"]
    return Subject(str(path), "run", lambda: task.adapt(task.build_model(recipe, classes), recipe),
                   lambda: task.build_model(recipe, classes).eval(),
                   img_size or int(preprocess["input_size"][-1]), {"target": str(path)}, task, recipe, preprocess,
                   list(classes))


def _recipe_subject(path: Path, img_size: int | None, lora: LoraConfig | None) -> Subject:
    """A recipe's model for the classes its data declares (the task's recipe_classes, else ten
    placeholders)."""
    recipe = load_recipe(path)
    task = tasks.get(recipe["task"])
    classes = task.recipe_classes(recipe) or placeholders()

    def adapted() -> nn.Module:
        model = task.build_model(recipe, classes)
        if isinstance(recipe["adapter"], dict) and lora is None:
            return task.adapt(model, recipe)
        return _with_lora(model, lora)  # full fine-tuning / linear-probe recipes: the LoRA they could use

    def base() -> nn.Module:
        return task.build_model(recipe, classes).eval()

    size = img_size or recipe["data"]["img_size"] or _input_size(base())
    return Subject(str(path), "recipe", adapted, base, size, {"target": str(path)}, task, recipe, None, classes)


def _timm_subject(name: str, img_size: int | None, lora: LoraConfig | None) -> Subject:
    def base() -> nn.Module:
        return _timm_model(name, img_size).eval()

    return Subject(name, "timm", lambda: _with_lora(_timm_model(name, img_size), lora), base,
                   img_size or _input_size(base()), {"target": name}, *_default_task())


def _module_subject(model: nn.Module, img_size: int | None, lora: LoraConfig | None) -> Subject:
    adapted = model if any(True for _ in lora_layers(model)) else _with_lora(copy.deepcopy(model), lora)

    def base() -> nn.Module:
        return eject(copy.deepcopy(adapted)).eval()

    return Subject(type(model).__name__, "module", lambda: copy.deepcopy(adapted), base,
                   img_size or _input_size(model), None, *_default_task())


def resolve_target(target: str | os.PathLike | nn.Module, img_size: int | None = None,
                   lora: LoraConfig | None = None) -> Subject:
    """A run directory, a recipe YAML, a timm model name or an nn.Module, as a Subject."""
    if isinstance(target, nn.Module):
        return _module_subject(target, img_size, lora)
    path = Path(target)
    if path.is_dir():
        if not (path / "recipe.yaml").is_file():
            raise FileNotFoundError(f"{path} is not a vislora run directory: no recipe.yaml")
        return _run_subject(path, img_size)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"recipe not found: {path}")
        return _recipe_subject(path, img_size, lora)
    if not timm.is_model(str(target)):
        raise VisloraError(f"'{target}' is neither a run directory, a recipe YAML nor a timm model name")
    return _timm_subject(str(target), img_size, lora)


# ---- its synthetic batches -----------------------------------------------------------------------
def to_device(batch: object, device: str) -> object:
    """Every tensor of a batch (nested in tuples, lists and dicts, as collates make them) on the
    device."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def batch_preprocess(subject: Subject, num_classes: int) -> dict:
    """What the task's synthetic_batch draws at: the run's preprocessing (if any) at the measured
    size, with the subject's class names (num_classes placeholders for a timm name or module)."""
    size = subject.img_size
    return {**(subject.preprocess or {}), "input_size": [3, size, size],
            "class_names": subject.classes or placeholders(num_classes)}


def synthetic(subject: Subject, n: int, num_classes: int, device: str) -> tuple:
    """A random training batch of n, as the subject's task collates them, on the device (seeded:
    every contender and the memory subprocess get the same one)."""
    return to_device(subject.task.synthetic_batch(batch_preprocess(subject, num_classes), n, 0), device)
