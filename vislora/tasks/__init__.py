"""Tasks: what the loop, evaluation, export, footprint and fewshot ask of a recipe's `task`, never
testing which one.

A task is a module of vislora/tasks/ (see docs/adding-a-task.md). It must write REQUIRED:

  NAME                                    the recipe's `task` value
  SCORE                                   the validation metric that picks the best epoch (higher is better)
  EXPORT                                  plain data: {"torchscript": "trace" | "script", "input": "batch" | "list",
                                          "onnx": None or why not, "served": None or why exported files are not run}
  build(recipe) -> Setup                  datasets, class names, preprocessing and the base model (not adapted)
  build_model(recipe, classes)            the base model alone for these class names, seeded (to rebuild a run)
  adapt(model, recipe) -> model           the recipe's adapter: LoRA, linear_probe or full fine-tuning
  loss(model, batch, device, recipe)      -> (loss, {name: float}, batch size) for one training step; batch is the
                                          collate's (images, targets), images (batch[0]) what the model takes
  validate(model, loader, device, amp_dtype, world) -> {"val_...": float}, SCORE included
  preview(batch, preprocess, classes)     a training batch as [(HxWx3 uint8, caption)]: the run's train_batch.png
  predictor(model)                        the trained model as the callable evaluate() and predict() take
  evaluate(predictor, preprocess, recipe, data, out, batch_size, workers, run_dir) -> report (written to out,
                                          with plots); without data, the run's (run_dir's) val split
  format_report(report) -> str
  predict(predictor, preprocess, paths, topk, out_dir) -> [{"path", ...} or {"path", "error"}]; files go to out_dir
  format_prediction(result) -> str

and may write the capabilities of OPTIONAL, which get(), through the registry, fills in with these
defaults:

  health(row, num_classes) -> str | None  a warning when an epoch's numbers show a collapsed run; default: None
  example_inputs(recipe, preprocess)      real inputs to verify an export with; default: None (random ones)
  confusion(model, loader, device, amp_dtype, world) -> [[int]] | None  the val confusion matrix train.log's
                                          loggers end with; default: None (no image)
  synthetic_batch(preprocess, n, seed)    a random training batch as the collate makes it (preprocess's input_size
                                          and class_names), what `vislora footprint` measures steps and latency on;
                                          default: NCHW normal noise and one class index per image
  recipe_classes(recipe) -> [str] | None  the class names a recipe's data declares, read without scanning it
                                          (footprint of a recipe); default: None (ten placeholders)
  KSHOT                                   True: one class per image in class folders, so `vislora fewshot` can
                                          sample k images per class and score val top-1; default: False
"""

from __future__ import annotations

from types import ModuleType

from vislora.errors import VisloraError
from vislora.tasks import classification, detection, segmentation
from vislora.tasks.common import class_batch

REQUIRED = ("NAME", "SCORE", "EXPORT", "build", "build_model", "adapt", "loss", "validate", "preview", "predictor",
            "evaluate", "format_report", "predict", "format_prediction")


def _none(*args, **kwargs) -> None:
    """The default of an optional capability whose absence is None: no warning, no real inputs, no
    matrix."""
    return None


OPTIONAL = {"health": _none, "example_inputs": _none, "confusion": _none, "synthetic_batch": class_batch,
            "recipe_classes": _none, "KSHOT": False}


def _registered(module: ModuleType) -> ModuleType:
    """The task module with every OPTIONAL name it does not write set to its default: the one place
    defaults live, so callers ask `task.confusion(...)` and never `hasattr(task, ...)`."""
    for name, default in OPTIONAL.items():
        if name not in vars(module):
            setattr(module, name, default)
    return module


TASKS: dict[str, ModuleType] = {m.NAME: _registered(m) for m in (classification, detection, segmentation)}


def get(name: str | None) -> ModuleType:
    """The task module for a recipe's (or an exported file's) task name; None means
    classification."""
    name = name or classification.NAME
    if name not in TASKS:
        raise VisloraError(f"task must be one of {', '.join(TASKS)}, not {name!r}")
    return TASKS[name]


def having(capability: str) -> list[str]:
    """The names of the tasks whose `capability` (an OPTIONAL flag) is true: what an error can
    suggest instead."""
    return [name for name, task in TASKS.items() if getattr(task, capability)]
