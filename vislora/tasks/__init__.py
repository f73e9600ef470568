"""Tasks: what the training loop, evaluation and export ask of a recipe's `task`, never testing which one it is.

A task is a module with the same few names (see docs/adding-a-task.md):

  NAME                                    the recipe's `task` value
  SCORE                                   the validation metric that picks the best epoch (higher is better)
  EXPORT                                  plain data: {"torchscript": "trace" | "script", "input": "batch" | "list",
                                          "onnx": None or why not, "served": None or why exported files are not run}
  build(recipe) -> Setup                  datasets, class names, preprocessing and the base model (not adapted)
  build_model(recipe, classes)            the base model alone for these class names, seeded (to rebuild a run)
  adapt(model, recipe) -> model           the recipe's adapter: LoRA, linear_probe or full fine-tuning
  loss(model, batch, device, recipe)      -> (loss, {name: float}, batch size) for one training step
  validate(model, loader, device, amp_dtype, world) -> {"val_...": float}, SCORE included
  health(row, num_classes) -> str | None  a warning when an epoch's numbers show a collapsed run
  preview(batch, preprocess, classes)     a training batch as [(HxWx3 uint8, caption)]: the run's train_batch.png
  predictor(model)                        the trained model as the callable evaluate() and predict() take
  evaluate(predictor, preprocess, recipe, data, out, batch_size, workers, run_dir) -> report (written to out,
                                          with plots); without data, the run's (run_dir's) val split
  format_report(report) -> str
  example_inputs(recipe, preprocess)      real inputs to verify an export with, or None (random)
  predict(predictor, preprocess, paths, topk, out_dir) -> [{"path", ...} or {"path", "error"}]; files go to out_dir
  format_prediction(result) -> str
"""

from __future__ import annotations

from types import ModuleType

from vislora.errors import VisloraError
from vislora.tasks import classification, detection, segmentation

TASKS: dict[str, ModuleType] = {"classification": classification, "detection": detection,
                                  "segmentation": segmentation}


def get(name: str | None) -> ModuleType:
    """The task module for a recipe's (or an exported file's) task name; None means classification."""
    name = name or "classification"
    if name not in TASKS:
        raise VisloraError(f"task must be one of {', '.join(TASKS)}, not {name!r}")
    return TASKS[name]
