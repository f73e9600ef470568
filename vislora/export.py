"""Export a merged model to TorchScript and ONNX, verify each file in its own runtime, and predict with it.

The exported files are self-contained: they load with torch (`torch.jit.load`) or onnxruntime alone, in a
process that never imports vislora or timm. The preprocessing (input size, mean, std, interpolation, crop_pct)
and the class names travel beside them in preprocess.json, and inside them (TorchScript extra file, ONNX
metadata_props) so that a file copied on its own still carries them.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from vislora.inject import FROZEN_BN
from vislora.layers import LoraLayer

PREPROCESS_NAME, REPORT_NAME = "preprocess.json", "export.json"
FILE_NAMES = {"torchscript": "model.pt", "onnx": "model.onnx"}
PREPROCESS_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct")
LATENCY_BATCHES = (1, 8)


# ---- checks ---------------------------------------------------------------------------------------
def check_no_adapters(model: nn.Module) -> None:
    """Raise ValueError naming the first module (or hook) that still belongs to vislora.

    An exported adapter graph would carry the unmerged A/B matrices (and vislora code in a scripted model):
    call vislora.unload(model) first, which merges every adapter and restores the plain torch layers.
    """
    for name, m in model.named_modules():
        where = f"module '{name or '<root>'}' ({type(m).__name__})"
        if isinstance(m, LoraLayer):
            raise ValueError(f"{where} is an unmerged vislora adapter: call vislora.unload(model) before exporting")
        if type(m) in FROZEN_BN.values():
            raise ValueError(f"{where} is vislora's frozen BatchNorm: call vislora.unload(model) before exporting")
        if any(k in m._parameters or k in m._modules or k in m.__dict__ for k in ("lora_A", "lora_B")):
            raise ValueError(f"{where} carries lora_A/lora_B adapter weights: merge and unload it before exporting")
        hooks = [*m._forward_pre_hooks.values(), *m._forward_hooks.values()]
        for hook in hooks:
            if getattr(hook, "__module__", "") and hook.__module__.startswith("vislora"):
                raise ValueError(f"{where} has a vislora forward hook ({hook.__module__}): "
                                 "call vislora.unload(model) before exporting")


def _is_detector(model: nn.Module) -> bool:
    """torchvision detection models (FCOS, RetinaNet, Faster R-CNN) take a list of CHW images."""
    return type(getattr(model, "transform", None)).__name__ == "GeneralizedRCNNTransform"


@contextlib.contextmanager
def _quiet_jit():
    """Recent torch releases mark every torch.jit entry point deprecated; the files still load everywhere."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..* is deprecated", category=FutureWarning)
        yield


def _metadata_json(metadata: dict | None) -> dict[str, str]:
    return {str(k): json.dumps(v) for k, v in (metadata or {}).items()}


# ---- export ---------------------------------------------------------------------------------------
def export_torchscript(model: nn.Module, example: torch.Tensor | None, path: str | os.PathLike,
                       method: str = "trace", freeze: bool = False, metadata: dict | None = None) -> Path:
    """Trace (timm classifiers) or script (torchvision detectors) an eval-mode, merged model; save it to `path`.

    metadata is stored as JSON extra files in the archive (read back with torch.jit.load(_extra_files=...)).
    """
    check_no_adapters(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    with torch.no_grad(), _quiet_jit():
        if method == "trace":
            if example is None:
                raise ValueError("method='trace' needs an example input")
            module = torch.jit.trace(model, example, check_trace=False)
        elif method == "script":
            module = torch.jit.script(model)
        else:
            raise ValueError(f"unknown TorchScript method '{method}': use 'trace' or 'script'")
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
    """Export to ONNX (input 'input' NCHW float32, output 'logits'), batch axis dynamic unless told otherwise.

    Uses the classic TorchScript-based exporter (robust for timm models), then the dynamo exporter if that
    fails; `metadata` values are stored as JSON strings in model.metadata_props. The file is checked with
    onnx.checker. Raises NotImplementedError when both exporters fail, and for torchvision detection models.
    """
    import onnx

    check_no_adapters(model)
    if _is_detector(model):
        raise NotImplementedError(f"ONNX export of the torchvision detector {type(model).__name__} is not supported "
                                  "(list-of-images input, post-processing with data-dependent shapes): "
                                  "export it to TorchScript (method='script') instead")
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


# ---- loading and running --------------------------------------------------------------------------
def _read_preprocess_file(path: Path) -> dict | None:
    side = path.parent / PREPROCESS_NAME
    if not side.is_file():
        return None
    try:
        return json.loads(side.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{side} is not valid JSON: {e}") from e


def _onnx_predictor(path: Path) -> tuple[Callable[[np.ndarray], np.ndarray], dict]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    spec = session.get_inputs()[0]
    static = spec.shape[0] if isinstance(spec.shape[0], int) else None

    def run(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if static is None or len(x) == static:
            return session.run(None, {spec.name: x})[0]
        if len(x) % static:
            raise ValueError(f"{path} has a static batch of {static}; got a batch of {len(x)}")
        return np.concatenate([session.run(None, {spec.name: x[i:i + static]})[0] for i in range(0, len(x), static)])

    meta = session.get_modelmeta().custom_metadata_map
    return run, {k: json.loads(v) for k, v in meta.items()}


def _torchscript_predictor(path: Path) -> tuple[Callable[[np.ndarray], np.ndarray], dict]:
    files = {f"{k}.json": "" for k in (*PREPROCESS_KEYS, "class_names")}
    with _quiet_jit():
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=files)
    module.eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()

    return run, {k[:-5]: json.loads(v) for k, v in files.items() if v}


def load_exported(path: str | os.PathLike) -> tuple[Callable[[np.ndarray], np.ndarray], dict]:
    """Load model.pt (TorchScript) or model.onnx (onnxruntime, CPU) -> (NCHW float32 batch -> logits, preprocess).

    A directory picks model.onnx, else model.pt. preprocess comes from preprocess.json beside the file,
    else from the metadata stored inside it.
    """
    path = Path(path)
    if path.is_dir():
        found = [path / FILE_NAMES[f] for f in ("onnx", "torchscript") if (path / FILE_NAMES[f]).is_file()]
        if not found:
            raise FileNotFoundError(f"no model.onnx or model.pt in {path}")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"no exported model at {path}")
    if path.suffix == ".onnx":
        predictor, embedded = _onnx_predictor(path)
    elif path.suffix in (".pt", ".pth", ".jit"):
        predictor, embedded = _torchscript_predictor(path)
    else:
        raise ValueError(f"{path}: unknown export format '{path.suffix}' (expected .pt or .onnx)")
    return predictor, _read_preprocess_file(path) or embedded


# ---- preprocessing and prediction -----------------------------------------------------------------
def _height_width(preprocess: dict) -> tuple[int, int]:
    size = preprocess["input_size"]
    size = [size] if isinstance(size, (int, float)) else list(size)
    if len(size) not in (1, 2, 3):
        raise ValueError(f"preprocess 'input_size' must be S, [H, W] or [C, H, W], not {preprocess['input_size']}")
    return int(size[-2] if len(size) > 1 else size[0]), int(size[-1])


def _check_preprocess(preprocess: dict, keys: Sequence[str] = PREPROCESS_KEYS) -> None:
    missing = [k for k in keys if k not in preprocess]
    if missing:
        raise ValueError(f"preprocess dict is missing {missing} (has {sorted(preprocess)})")


def eval_transform(preprocess: dict):
    """The eval geometry as an albumentations pipeline: resize the shorter side to size / crop_pct, center crop
    to input_size, normalize with mean/std (timm's eval transform; a non-square size resizes both sides)."""
    import albumentations as A
    import cv2

    _check_preprocess(preprocess)
    interpolations = {"nearest": cv2.INTER_NEAREST, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC,
                      "area": cv2.INTER_AREA, "box": cv2.INTER_AREA, "lanczos": cv2.INTER_LANCZOS4}
    name = preprocess["interpolation"]
    if name not in interpolations:
        raise ValueError(f"preprocess 'interpolation'={name!r} is not one of {sorted(interpolations)}")
    h, w = _height_width(preprocess)
    crop_pct = float(preprocess["crop_pct"] or 1.0)
    if h == w:
        resize = A.SmallestMaxSize(max_size=int(math.floor(h / crop_pct)), interpolation=interpolations[name])
    else:
        resize = A.Resize(int(math.floor(h / crop_pct)), int(math.floor(w / crop_pct)),
                          interpolation=interpolations[name])
    return A.Compose([resize, A.CenterCrop(h, w),
                      A.Normalize(mean=tuple(preprocess["mean"]), std=tuple(preprocess["std"]), max_pixel_value=255.0)])


def preprocess_image(path: str | os.PathLike, preprocess: dict) -> np.ndarray:
    """Read one image (any PIL mode, converted to RGB) and apply the eval transform -> CHW float32."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no image at {path}")
    try:
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    out = eval_transform(preprocess)(image=rgb)["image"]
    return np.ascontiguousarray(out.transpose(2, 0, 1), dtype=np.float32)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def predict_files(predictor: Callable[[np.ndarray], np.ndarray], preprocess: dict,
                  image_paths: Sequence[str | os.PathLike], topk: int = 5, batch_size: int = 16) -> list[dict]:
    """Top-k (class_name, probability) per image, in input order; an unreadable image gets {"path", "error"}."""
    results: list[dict] = [{"path": str(p)} for p in image_paths]
    ready: list[tuple[int, np.ndarray]] = []
    for i, p in enumerate(image_paths):
        try:
            ready.append((i, preprocess_image(p, preprocess)))
        except (FileNotFoundError, ValueError) as e:
            results[i]["error"] = str(e)
    names = preprocess.get("class_names")
    for start in range(0, len(ready), batch_size):
        chunk = ready[start:start + batch_size]
        probs = _softmax(np.asarray(predictor(np.stack([x for _, x in chunk]))))
        if names is not None and len(names) != probs.shape[1]:
            raise ValueError(f"preprocess has {len(names)} class_names but the model outputs {probs.shape[1]} "
                             "classes")
        for (i, _), row in zip(chunk, probs, strict=True):
            order = np.argsort(-row, kind="stable")[:topk]
            results[i]["top"] = [(names[k] if names is not None else str(k), float(row[k])) for k in order]
    return results


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


# ---- export + verify + measure --------------------------------------------------------------------
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
        raise ValueError(f"{fmt} export gives outputs of shapes {[g.shape for g in got]}, "
                         f"the PyTorch model {[r.shape for r in ref]}")
    if not ref:
        return 0.0, 0.0
    abs_diff = max(float(np.abs(r.astype(np.float64) - g).max(initial=0.0)) for r, g in zip(ref, got, strict=True))
    scale = max(float(np.abs(r).max(initial=0.0)) for r in ref)
    return abs_diff, abs_diff / max(scale, 1e-12)


def _prepared(model: nn.Module) -> nn.Module:
    """The model as exported: fp32 on CPU, eval mode (a copy when it has to move or change dtype)."""
    params = list(model.parameters()) + list(model.buffers())
    if any(p.device.type != "cpu" or (p.is_floating_point() and p.dtype != torch.float32) for p in params):
        model = copy.deepcopy(model).float().cpu()
    return model.eval()


def export_model(model: nn.Module, preprocess: dict, out_dir: str | os.PathLike,
                 formats: Sequence[str] = ("torchscript", "onnx"), opset: int = 17, dynamic_batch: bool = True,
                 inputs: torch.Tensor | None = None, tol: float = 1e-4, repeats: int = 20,
                 torchscript_method: str | None = None) -> dict:
    """Export a merged, unloaded model; verify every file in its own runtime; measure it; write export.json.

    Writes model.pt / model.onnx and preprocess.json to out_dir. Each export runs `inputs` (a batch of real
    images, else 8 random ones) in torch.jit / onnxruntime; the max abs difference to the PyTorch model must
    be <= tol, else ValueError (after export.json is written). Also records median latency at batch 1 and 8
    (each runtime and PyTorch, same thread count), file sizes, ONNX node count and parameter count.
    torchscript_method: "trace" (default) or "script" (default for torchvision detectors, which take a list
    of CHW images and are compared on every output tensor).
    """
    unknown = set(formats) - set(FILE_NAMES)
    if unknown:
        raise ValueError(f"unknown export formats {sorted(unknown)}: use {sorted(FILE_NAMES)}")
    check_no_adapters(model)
    was_training = model.training
    net = _prepared(model)
    detector = _is_detector(net)
    _check_preprocess(preprocess, ("input_size",) if detector else PREPROCESS_KEYS)  # detectors normalize inside
    out_dir = Path(out_dir)
    if detector and "onnx" in formats:
        export_onnx(net, None, out_dir / FILE_NAMES["onnx"])  # raises NotImplementedError with the reason
    out_dir.mkdir(parents=True, exist_ok=True)
    h, w = _height_width(preprocess)
    source = "random" if inputs is None else "given"
    if inputs is None:
        inputs = torch.randn(8, 3, h, w, generator=torch.Generator().manual_seed(0))
    inputs = inputs.detach().float().cpu()
    # a batch of 2 keeps the tracer from specializing on a singleton batch; static ONNX exports batch 1
    example = inputs[:2] if len(inputs) >= 2 else inputs
    call = (lambda m, x: m(list(x))) if detector else (lambda m, x: m(x))
    metadata = {**preprocess, "class_names": preprocess.get("class_names")}
    (out_dir / PREPROCESS_NAME).write_text(json.dumps(metadata, indent=2))

    latency_inputs = {b: inputs[torch.arange(b) % len(inputs)] for b in LATENCY_BATCHES}

    def latencies(fn: Callable, as_numpy: bool, batches=LATENCY_BATCHES) -> dict:
        lat = {}
        for b in batches:
            x = latency_inputs[b].numpy() if as_numpy else latency_inputs[b]
            lat[f"batch{b}"] = median_latency(fn, x, repeats=repeats)
        return lat

    report: dict = {"parameters": sum(p.numel() for p in net.parameters()), "tol": tol,
                    "inputs": {"source": source, "shape": list(inputs.shape)},
                    "threads": torch.get_num_threads(), "preprocess": PREPROCESS_NAME}
    failures = []
    try:
        with torch.inference_mode():
            reference = _flatten(call(net, inputs))
            report["pytorch"] = {"latency_s": latencies(lambda x: call(net, x), as_numpy=False)}
        for fmt in formats:
            path = out_dir / FILE_NAMES[fmt]
            entry: dict = {"path": path.name}
            if fmt == "torchscript":
                method = torchscript_method or ("script" if detector else "trace")
                export_torchscript(net, example, path, method=method, metadata=metadata)
                with _quiet_jit():
                    loaded = torch.jit.load(str(path), map_location="cpu").eval()
                with torch.inference_mode():
                    got = _flatten(call(loaded, inputs))
                    single = [] if detector else _flatten(call(loaded, inputs[:1]))

                    def run(x, loaded=loaded):
                        return call(loaded, x)

                    entry["latency_s"] = latencies(run, as_numpy=False)
                entry["method"] = method
            else:
                export_onnx(net, example if dynamic_batch else inputs[:1], path, opset, dynamic_batch, metadata)
                import onnx

                predictor, _ = _onnx_predictor(path)
                got, single = [predictor(inputs.numpy())], [predictor(inputs[:1].numpy())]
                entry["latency_s"] = latencies(predictor, as_numpy=True,
                                               batches=LATENCY_BATCHES if dynamic_batch else (1,))
                entry.update(nodes=len(onnx.load(str(path), load_external_data=False).graph.node), opset=opset,
                             dynamic_batch=dynamic_batch)
            diffs = [_max_diffs(reference, got, fmt)]
            if not detector:  # a batch other than the traced one: catches a batch size baked into the graph
                diffs.append(_max_diffs([r[:1] for r in reference], single, fmt))
            entry["max_abs_diff"], entry["max_rel_diff"] = (max(d) for d in zip(*diffs, strict=True))
            entry["bytes"] = path.stat().st_size
            report[fmt] = entry
            if not entry["max_abs_diff"] <= tol:
                failures.append(f"{fmt}: max abs diff {entry['max_abs_diff']:.3g} > tol {tol:g}")
    finally:
        (out_dir / REPORT_NAME).write_text(json.dumps(report, indent=2))
        model.train(was_training)
    if failures:
        raise ValueError(f"exported model does not match the PyTorch model ({out_dir / REPORT_NAME}): "
                         + "; ".join(failures))
    return report


# ---- run directories ------------------------------------------------------------------------------
def _val_batch(recipe: dict, preprocess: dict, n: int = 8) -> torch.Tensor | None:
    """Up to n real images of the run's val split, through the eval pipeline (None if none can be read)."""
    from vislora import data as vdata

    d = recipe["data"]
    try:
        _, val = vdata.scan_folder(d["path"], d["val_fraction"], recipe["train"]["seed"])
    except (FileNotFoundError, ValueError):
        return None
    dataset = vdata.ImageDataset(vdata.Split(val.items[:n], val.classes), vdata.build_transform(preprocess, False))
    images = [item[0] for item in (dataset[i] for i in range(len(dataset))) if item is not None]
    return torch.stack(images) if images else None


def export_run(run_dir: str | os.PathLike, formats: str | Sequence[str] = "all", out: str | os.PathLike | None = None,
               opset: int = 17, dynamic_batch: bool = True) -> dict:
    """Rebuild a run's model, load its adapter, merge and unload, export and verify (`vislora export`).

    Also records that the merged export costs what the base model costs: parameter counts and PyTorch
    latency at batch 1 of the untouched base model next to the merged one.
    """
    from vislora.evaluate import load_run
    from vislora.inject import unload

    formats = tuple(FILE_NAMES) if formats == "all" else ((formats,) if isinstance(formats, str) else tuple(formats))
    model, recipe, preprocess = load_run(run_dir)
    unload(model)
    detection = recipe["task"] == "detection"
    if detection:
        from vislora.detection import build_detector

        base = build_detector(recipe["model"], recipe["detector"], len(preprocess["class_names"]))
        formats = tuple(f for f in formats if f != "onnx") or ("torchscript",)
        inputs = None
    else:
        from vislora.train import build_classifier

        base = build_classifier(recipe, len(preprocess["class_names"]))
        inputs = _val_batch(recipe, preprocess)
    out_dir = Path(out) if out else Path(run_dir) / "export"
    report = export_model(model, preprocess, out_dir, formats, opset, dynamic_batch, inputs)
    h, w = _height_width(preprocess)
    x = torch.randn(1, 3, h, w)
    call = (lambda m, t: m(list(t))) if detection else (lambda m, t: m(t))
    base.eval()
    with torch.inference_mode():
        report["cost"] = {
            "base_parameters": sum(p.numel() for p in base.parameters()),
            "merged_parameters": sum(p.numel() for p in model.parameters()),
            "base_latency_b1_s": median_latency(lambda t: call(base, t), x),
            "merged_latency_b1_s": median_latency(lambda t: call(model, t), x),
        }
    report["cost"]["latency_ratio"] = report["cost"]["merged_latency_b1_s"] / report["cost"]["base_latency_b1_s"]
    if report["cost"]["base_parameters"] != report["cost"]["merged_parameters"]:
        raise ValueError(f"merged model has {report['cost']['merged_parameters']} parameters, the base model "
                         f"{report['cost']['base_parameters']}: something was left unmerged")
    (out_dir / REPORT_NAME).write_text(json.dumps(report, indent=2))
    return report


def predictor_for(target: str | os.PathLike) -> tuple[Callable[[np.ndarray], np.ndarray], dict]:
    """A predictor for `vislora predict`: a run directory (merged in memory), a .pt or an .onnx file."""
    target = Path(target)
    if target.is_dir() and (target / "recipe.yaml").is_file():
        from vislora.evaluate import load_run
        from vislora.inject import unload

        model, _, preprocess = load_run(target)
        unload(model)

        def run(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return model(torch.from_numpy(x)).float().numpy()

        return run, preprocess
    return load_exported(target)
