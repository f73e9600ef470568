"""Export a merged model to TorchScript and ONNX and verify each file in its own runtime against
PyTorch.

The exported files are self-contained: they load with torch (`torch.jit.load`) or onnxruntime alone,
in a process that never imports vislora or timm (vislora.exported runs them). The preprocessing
(input size, mean, std, interpolation, crop_pct), the class names and the task travel beside them in
preprocess.json, and inside them (TorchScript extra files, ONNX metadata_props) so that a file
copied on its own still carries them. How a task's model is exported is plain data, the task's
EXPORT (vislora.tasks): this module never asks which task it is.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from vislora import rundir, tasks
from vislora.errors import VisloraError
from vislora.exported import FILE_NAMES, PREPROCESS_NAME, REPORT_NAME, onnx_predictor, quiet_jit
from vislora.files import write_json
from vislora.image import PREPROCESS_KEYS, check_preprocess, input_hw
from vislora.inject import FROZEN_BN, unload
from vislora.layers import LoraLayer

LATENCY_BATCHES = (1, 8)
# the EXPORT of a model that takes an NCHW batch and returns a tensor (timm classifiers):
# tasks.classification's
BATCH_MODEL = {"torchscript": "trace", "onnx": None, "input": "batch", "served": None}

log = logging.getLogger(__name__)


# ---- checks --------------------------------------------------------------------------------------
def check_no_adapters(model: nn.Module) -> None:
    """Raise ValueError naming the first module (or hook) that still belongs to vislora.

    An exported adapter graph would carry the unmerged A/B matrices (and vislora code in a scripted
    model): call vislora.unload(model) first, which merges every adapter and restores the plain
    torch layers.
"""
    modules = list(model.named_modules())
    modules.sort(key=lambda item: not isinstance(item[1], LoraLayer))  # name an unmerged adapter first
    for name, m in modules:
        where = f"module '{name or '<root>'}' ({type(m).__name__})"
        if isinstance(m, LoraLayer):
            raise VisloraError(f"{where} is an unmerged vislora adapter: call vislora.unload(model) before exporting")
        if type(m) in FROZEN_BN.values():
            raise VisloraError(f"{where} is vislora's frozen BatchNorm: call vislora.unload(model) before exporting")
        if any(".lora_" in f".{n}" for n in m._parameters) or "updates" in m._modules:
            raise VisloraError(f"{where} carries adapter weights (lora_*): merge and unload it before exporting")
        hooks = [*m._forward_pre_hooks.values(), *m._forward_hooks.values()]
        for hook in hooks:
            if getattr(hook, "__module__", "") and hook.__module__.startswith("vislora"):
                raise VisloraError(f"{where} has a vislora forward hook ({hook.__module__}): "
                                 "call vislora.unload(model) before exporting")


def _metadata_json(metadata: dict | None) -> dict[str, str]:
    return {str(k): json.dumps(v) for k, v in (metadata or {}).items()}


# ---- export --------------------------------------------------------------------------------------
def export_torchscript(model: nn.Module, example: torch.Tensor | None, path: str | os.PathLike,
                       method: str = "trace", freeze: bool = False, metadata: dict | None = None) -> Path:
    """Trace (timm classifiers) or script (torchvision detectors) an eval-mode, merged model; save
    it to `path`.

    metadata is stored as JSON extra files in the archive (read back with
    torch.jit.load(_extra_files=...)).
"""
    check_no_adapters(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    with torch.no_grad(), quiet_jit(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # timm's shape checks: constants once traced
        if method == "trace":
            if example is None:
                raise VisloraError("method='trace' needs an example input")
            module = torch.jit.trace(model, example, check_trace=False)
        elif method == "script":
            module = torch.jit.script(model)
        else:
            raise VisloraError(f"unknown TorchScript method '{method}': use 'trace' or 'script'")
        if freeze:
            module = torch.jit.freeze(module)
        torch.jit.save(module, str(path), _extra_files={f"{k}.json": v for k, v in _metadata_json(metadata).items()})
    return path


def _onnx_classic(model, example, path, opset, dynamic_batch) -> None:
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch announces the classic exporter's deprecation on every call
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset, input_names=["input"],
                          output_names=["logits"], dynamic_axes=axes, do_constant_folding=True)


def _onnx_dynamo(model, example, path, opset, dynamic_batch) -> None:
    shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    program = torch.onnx.export(model, (example,), None, dynamo=True, opset_version=opset, input_names=["input"],
                                output_names=["logits"], dynamic_shapes=shapes)
    program.save(str(path), external_data=False)


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | os.PathLike, opset: int = 17,
                dynamic_batch: bool = True, metadata: dict | None = None) -> Path:
    """Export to ONNX (input 'input' NCHW float32, output 'logits'), batch axis dynamic unless told
    otherwise.

    Uses the classic TorchScript-based exporter (robust for timm models), then the dynamo exporter
    if that fails; `metadata` values are stored as JSON strings in model.metadata_props. The file is
    checked with onnx.checker. Raises NotImplementedError when both exporters fail.
"""
    import onnx

    check_no_adapters(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    errors = []
    for exporter in (_onnx_classic, _onnx_dynamo):
        try:
            with torch.no_grad():
                exporter(model, example, path, opset, dynamic_batch)
            break
        except Exception as e:  # every exporter failure is reported below
            errors.append(f"{exporter.__name__.removeprefix('_onnx_')}: {type(e).__name__}: {str(e)[:300]}")
    else:
        raise NotImplementedError(f"ONNX export of {type(model).__name__} failed with both exporters; "
                                  "use the TorchScript export instead.\n  " + "\n  ".join(errors))
    proto = onnx.load(str(path))
    for key, value in _metadata_json(metadata).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path))
    return path


# ---- export + verify + measure -------------------------------------------------------------------
def median_latency(fn: Callable, inputs, warmup: int = 3, repeats: int = 20) -> float:
    """Median wall time of fn(inputs) in seconds, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn(inputs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(inputs)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def paired_latency(base: Callable, merged: Callable, inputs, rounds: int = 5, repeats: int = 5) -> dict:
    """Batch-1 latency of the base and the merged model, measured in alternating rounds (load on a
    shared machine moves both alike), with the ratio merged / base per round: its median and range.
    One pair of medians swung 7.9x -> 0.84x between two runs (issue #31); the range says how far to
    trust the figure."""
    times, ratios = {"base": [], "merged": []}, []
    for _ in range(rounds):
        b, m = (median_latency(fn, inputs, warmup=1, repeats=repeats) for fn in (base, merged))
        times["base"].append(b)
        times["merged"].append(m)
        ratios.append(m / b)
    return {"base_latency_b1_s": statistics.median(times["base"]),
            "merged_latency_b1_s": statistics.median(times["merged"]),
            "latency_ratio": statistics.median(ratios), "latency_ratio_range": [min(ratios), max(ratios)],
            "latency_rounds": rounds}


def _flatten(out) -> list[np.ndarray]:
    """Every tensor in a (nested) output as numpy: logits, or a detector's (losses, detections)."""
    if isinstance(out, (torch.Tensor, np.ndarray)):
        return [out.detach().cpu().numpy() if isinstance(out, torch.Tensor) else out]
    if isinstance(out, dict):
        return [a for k in sorted(out) for a in _flatten(out[k])]
    if isinstance(out, (list, tuple)):
        return [a for o in out for a in _flatten(o)]
    return []


def _max_diffs(ref: list[np.ndarray], got: list[np.ndarray], fmt: str) -> tuple[float, float]:
    if len(ref) != len(got) or any(r.shape != g.shape for r, g in zip(ref, got, strict=False)):
        raise VisloraError(f"{fmt} export gives outputs of shapes {[g.shape for g in got]}, "
                         f"the PyTorch model {[r.shape for r in ref]}")
    if not ref:
        return 0.0, 0.0
    abs_diff = max(float(np.abs(r.astype(np.float64) - g).max(initial=0.0)) for r, g in zip(ref, got, strict=True))
    scale = max(float(np.abs(r).max(initial=0.0)) for r in ref)
    return abs_diff, abs_diff / max(scale, 1e-12)


def _prepared(model: nn.Module) -> nn.Module:
    """The model as exported: fp32 on CPU, eval mode (a copy when it has to move or change
    dtype)."""
    params = list(model.parameters()) + list(model.buffers())
    if any(p.device.type != "cpu" or (p.is_floating_point() and p.dtype != torch.float32) for p in params):
        model = copy.deepcopy(model).float().cpu()
    return model.eval()


@dataclass
class _Check:
    """What verifying one exported file needs: the inputs, the PyTorch reference and how to call and
    time."""

    inputs: torch.Tensor
    reference: list[np.ndarray]
    call: Callable
    listed: bool
    repeats: int

    def latencies(self, fn: Callable, as_numpy: bool, batches: Sequence[int] = LATENCY_BATCHES) -> dict:
        """Median latency of fn at each batch size (the inputs cycled to fill it)."""
        out = {}
        for b in batches:
            x = self.inputs[torch.arange(b) % len(self.inputs)]
            out[f"batch{b}"] = median_latency(fn, x.numpy() if as_numpy else x, repeats=self.repeats)
        return out


def _torchscript_entry(net: nn.Module, path: Path, check: _Check, method: str, metadata: dict) -> tuple[dict, list]:
    """Write model.pt, reload it in torch.jit, run and time it; (report entry, outputs on [all
    inputs, one])."""
    example = check.inputs[:2] if len(check.inputs) >= 2 else check.inputs  # 2: no singleton batch baked in
    export_torchscript(net, example, path, method=method, metadata=metadata)
    with quiet_jit():
        loaded = torch.jit.load(str(path), map_location="cpu").eval()
    with torch.inference_mode():
        got = [_flatten(check.call(loaded, check.inputs)),
               [] if check.listed else _flatten(check.call(loaded, check.inputs[:1]))]
        latency = check.latencies(lambda x: check.call(loaded, x), as_numpy=False)
    return {"path": path.name, "latency_s": latency, "method": method}, got


def _onnx_entry(net: nn.Module, path: Path, check: _Check, opset: int, dynamic_batch: bool, metadata: dict
                ) -> tuple[dict, list]:
    """Write model.onnx, run and time it in onnxruntime; (report entry, outputs on [all inputs,
    one])."""
    import onnx

    example = (check.inputs[:2] if len(check.inputs) >= 2 else check.inputs) if dynamic_batch else check.inputs[:1]
    export_onnx(net, example, path, opset, dynamic_batch, metadata)
    predictor, _ = onnx_predictor(path)
    got = [[predictor(check.inputs.numpy())], [predictor(check.inputs[:1].numpy())]]
    latency = check.latencies(predictor, as_numpy=True, batches=LATENCY_BATCHES if dynamic_batch else (1,))
    nodes = len(onnx.load(str(path), load_external_data=False).graph.node)
    return {"path": path.name, "latency_s": latency, "nodes": nodes, "opset": opset,
            "dynamic_batch": dynamic_batch}, got


def _compare(entry: dict, check: _Check, got: list, fmt: str) -> None:
    """Max abs / rel difference to PyTorch, on the whole batch and (batch models) on a batch of one,
    which catches a batch size baked into the graph."""
    diffs = [_max_diffs(check.reference, got[0], fmt)]
    if not check.listed:
        diffs.append(_max_diffs([r[:1] for r in check.reference], got[1], fmt))
    entry["max_abs_diff"], entry["max_rel_diff"] = (max(d) for d in zip(*diffs, strict=True))


def export_model(model: nn.Module, preprocess: dict, out_dir: str | os.PathLike,
                 formats: Sequence[str] = ("torchscript", "onnx"), opset: int = 17, dynamic_batch: bool = True,
                 inputs: torch.Tensor | None = None, tol: float = 1e-4, repeats: int = 20,
                 spec: dict = BATCH_MODEL) -> dict:
    """Export a merged, unloaded model; verify every file in its own runtime; measure it; write
    export.json.

    Writes model.pt / model.onnx and preprocess.json to out_dir. Each export runs `inputs` (a batch
    of real images, else 8 random ones) in torch.jit / onnxruntime; the max abs difference to the
    PyTorch model must be <= tol, else ValueError (after export.json is written). Also records
    median latency at batch 1 and 8 (each runtime and PyTorch, same thread count), file sizes, ONNX
    node count and parameter count. spec: the task's EXPORT: TorchScript "trace" or "script";
    "input" "batch" (NCHW tensor) or "list" (a list of CHW images, torchvision detectors, compared
    on every output tensor); "onnx" None or why it is unsupported.
"""
    unknown = set(formats) - set(FILE_NAMES)
    if unknown:
        raise VisloraError(f"unknown export formats {sorted(unknown)}: use {sorted(FILE_NAMES)}")
    if "onnx" in formats and spec["onnx"]:
        raise NotImplementedError(spec["onnx"])
    check_no_adapters(model)
    was_training, net, listed = model.training, _prepared(model), spec["input"] == "list"
    check_preprocess(preprocess, ("input_size",) if listed else PREPROCESS_KEYS)  # list-input models normalise inside
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = "random" if inputs is None else "given"
    if inputs is None:
        inputs = torch.randn(8, 3, *input_hw(preprocess), generator=torch.Generator().manual_seed(0))
    inputs = inputs.detach().float().cpu()
    metadata = {**preprocess, "class_names": preprocess.get("class_names")}
    write_json(out_dir / PREPROCESS_NAME, metadata)
    report: dict = {"parameters": sum(p.numel() for p in net.parameters()), "tol": tol,
                    "inputs": {"source": source, "shape": list(inputs.shape)},
                    "threads": torch.get_num_threads(), "preprocess": PREPROCESS_NAME}
    failures = []
    try:
        call = (lambda m, x: m(list(x))) if listed else (lambda m, x: m(x))
        with torch.inference_mode():
            check = _Check(inputs, _flatten(call(net, inputs)), call, listed, repeats)
            report["pytorch"] = {"latency_s": check.latencies(lambda x: call(net, x), as_numpy=False)}
        for fmt in formats:
            path = out_dir / FILE_NAMES[fmt]
            entry, got = (_torchscript_entry(net, path, check, spec["torchscript"], metadata) if fmt == "torchscript"
                          else _onnx_entry(net, path, check, opset, dynamic_batch, metadata))
            _compare(entry, check, got, fmt)
            entry["bytes"] = path.stat().st_size
            report[fmt] = entry
            if not entry["max_abs_diff"] <= tol:
                failures.append(f"{fmt}: max abs diff {entry['max_abs_diff']:.3g} > tol {tol:g}")
    finally:
        write_json(out_dir / REPORT_NAME, report)
        model.train(was_training)
    if failures:
        raise VisloraError(f"exported model does not match the PyTorch model ({out_dir / REPORT_NAME}): "
                         + "; ".join(failures))
    return report


# ---- run directories -----------------------------------------------------------------------------
def export_run(run_dir: str | os.PathLike, formats: str | Sequence[str] | None = None,
               out: str | os.PathLike | None = None, opset: int | None = None,
               dynamic_batch: bool | None = None) -> dict:
    """Rebuild a run's model, load its adapter, merge and unload, export and verify (`vislora
    export`). formats, opset, dynamic_batch: None = the recipe's export section.

    Also records that the merged export costs what the base model costs: parameter counts and
    PyTorch latency at batch 1 of the untouched base model next to the merged one.
"""
    model, recipe, preprocess = rundir.load_run(run_dir)
    task = tasks.get(recipe["task"])
    settings = recipe["export"]
    asked = formats is not None and formats != "all"  # named on the command line, not the recipe's defaults
    formats = settings["formats"] if formats is None else formats
    formats = tuple(FILE_NAMES) if formats == "all" else ((formats,) if isinstance(formats, str) else tuple(formats))
    if "onnx" in formats and task.EXPORT["onnx"]:
        if asked:
            raise VisloraError(task.EXPORT["onnx"])
        formats = tuple(f for f in formats if f != "onnx")  # the defaults: what this task can export
        log.warning("vislora export: not exporting ONNX (the recipe's default formats): %s", task.EXPORT["onnx"])
    unload(model)
    with torch.random.fork_rng(devices=[]):
        base = task.build_model(recipe, preprocess["class_names"]).eval()
    out_dir = Path(out) if out else Path(run_dir) / "export"
    report = export_model(model, preprocess, out_dir, formats, settings["opset"] if opset is None else opset,
                          settings["dynamic_batch"] if dynamic_batch is None else dynamic_batch,
                          task.example_inputs(recipe, preprocess), spec=task.EXPORT)
    h, w = input_hw(preprocess)
    x = torch.randn(1, 3, h, w)
    call = (lambda m, t: m(list(t))) if task.EXPORT["input"] == "list" else (lambda m, t: m(t))
    with torch.inference_mode():
        report["cost"] = {"base_parameters": sum(p.numel() for p in base.parameters()),
                          "merged_parameters": sum(p.numel() for p in model.parameters()),
                          **paired_latency(lambda t: call(base, t), lambda t: call(model, t), x)}
    if "onnx" not in formats and task.EXPORT["onnx"]:
        report["not_exported"] = {"onnx": task.EXPORT["onnx"]}
    report["run"] = str(Path(run_dir).resolve())  # `vislora eval` of these files scores this run's val split
    if report["cost"]["base_parameters"] != report["cost"]["merged_parameters"]:
        raise VisloraError(f"merged model has {report['cost']['merged_parameters']} parameters, the base model "
                         f"{report['cost']['base_parameters']}: something was left unmerged")
    write_json(out_dir / REPORT_NAME, report)
    return report


# ---- what `vislora export` prints ----------------------------------------------------------------
def _ms(seconds: float | None) -> str:
    return f"{1000 * seconds:.2f} ms" if isinstance(seconds, (int, float)) else "-"


def _mb(n: int | None) -> str:
    return f"{n / 1e6:.1f} MB" if n else "-"


def format_export(report: dict, out_dir: Path) -> str:
    """A short table: each runtime's file, size, difference to PyTorch and latencies, then the cost
    line."""
    batches = sorted({b for fmt in ("pytorch", *FILE_NAMES) for b in report.get(fmt, {}).get("latency_s", {})},
                     key=lambda b: int(b.removeprefix("batch")))
    head = f"{'runtime':<12} {'file':<11} {'size':>8} {'max |diff|':>10}" + "".join(f" {b:>10}" for b in batches)
    lines = [head]
    for fmt in ("pytorch", *FILE_NAMES):
        entry = report.get(fmt)
        if entry is None:
            continue
        diff = f"{entry['max_abs_diff']:.1e}" if "max_abs_diff" in entry else "-"
        lines.append(f"{fmt:<12} {entry.get('path', '-'):<11} {_mb(entry.get('bytes')):>8} {diff:>10}"
                     + "".join(f" {_ms(entry['latency_s'].get(b)):>10}" for b in batches))
    cost = report.get("cost", {})
    if "latency_ratio" in cost:
        low, high = cost["latency_ratio_range"]
        lines.append(f"merged / base latency at batch 1 (PyTorch): {cost['latency_ratio']:.2f}x ({low:.2f}-"
                     f"{high:.2f}x over {cost['latency_rounds']} alternating rounds); {cost['merged_parameters']:,} "
                     "parameters, as the base")
    for fmt, why in report.get("not_exported", {}).items():
        lines.append(f"not exported: {fmt} ({why})")
    files = [report[f]["path"] for f in FILE_NAMES if f in report] + [PREPROCESS_NAME, REPORT_NAME]
    lines.append(f"vislora: exported to {out_dir}: {', '.join(files)} (each verified within {report['tol']:g} of "
                 "PyTorch)")
    return "\n".join(lines)
