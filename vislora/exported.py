"""Running exported files: load model.pt (torch.jit) or model.onnx (onnxruntime) with its
preprocessing.

Needs numpy, torch.jit or onnxruntime, and vislora.image only: the files `vislora export` writes are
run without timm, albumentations or the rest of vislora. A predictor maps an NCHW float32 batch
(vislora.image's eval transform of each image) to the model's output as a numpy array.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from vislora.errors import VisloraError
from vislora.files import read_json
from vislora.image import PREPROCESS_KEYS

PREPROCESS_NAME = "preprocess.json"
REPORT_NAME = "export.json"  # what `vislora export` measured, and the run it exported
FILE_NAMES = {"torchscript": "model.pt", "onnx": "model.onnx"}
METADATA_KEYS = (*PREPROCESS_KEYS, "class_names", "task")


@contextlib.contextmanager
def quiet_jit() -> Iterator[None]:
    """Recent torch releases mark every torch.jit entry point deprecated; the files still load
    everywhere."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..* is deprecated", category=FutureWarning)
        yield


def _read_preprocess_file(path: Path) -> dict | None:
    side = path.parent / PREPROCESS_NAME
    if not side.is_file():
        return None
    content = read_json(side, "preprocessing of the exported model")
    if not isinstance(content, dict):
        raise VisloraError(f"{side} is not a JSON object (expected the keys {', '.join(PREPROCESS_KEYS)})")
    return content


def _metadata(entries: dict[str, str], path: Path) -> dict:
    """The preprocessing `vislora export` stores in a file (JSON strings); values that are not JSON
    are named."""
    try:
        return {k: json.loads(v) for k, v in entries.items()}
    except json.JSONDecodeError as e:
        raise VisloraError(f"{path}: its stored preprocessing is not JSON ({e})") from None


def onnx_predictor(path: Path) -> tuple[Callable[[np.ndarray], np.ndarray], dict]:
    """onnxruntime (CPU) session of an .onnx file -> (predictor, metadata stored in the file)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for unreadable models
        raise VisloraError(f"{path} is not an ONNX model onnxruntime can load: {type(e).__name__}: {e}") from e
    spec = session.get_inputs()[0]
    static = spec.shape[0] if isinstance(spec.shape[0], int) else None

    def run(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if static is None or len(x) == static:
            return session.run(None, {spec.name: x})[0]
        if len(x) % static:
            raise VisloraError(f"{path} has a static batch of {static}; got a batch of {len(x)}")
        return np.concatenate([session.run(None, {spec.name: x[i:i + static]})[0] for i in range(0, len(x), static)])

    meta = session.get_modelmeta().custom_metadata_map
    return run, _metadata({k: v for k, v in meta.items() if k in METADATA_KEYS}, path)


def torchscript_predictor(path: Path) -> tuple[Callable[[np.ndarray], np.ndarray], dict]:
    """torch.jit module of a .pt file -> (predictor, metadata stored in the archive's extra
    files)."""
    files = {f"{k}.json": "" for k in METADATA_KEYS}
    try:
        with quiet_jit():
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=files)
    except Exception as e:  # torch.jit raises RuntimeError, ValueError ... for files that are not TorchScript
        raise VisloraError(f"{path} is not a TorchScript model (a file written by torch.jit.save, e.g. by "
                         f"`vislora export`): {type(e).__name__}: {str(e).splitlines()[0][:200]}") from e
    module.eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()

    return run, _metadata({k[:-5]: v for k, v in files.items() if v}, path)


def load_exported(path: str | os.PathLike) -> tuple[Callable[[np.ndarray], np.ndarray], dict]:
    """Load model.pt (TorchScript) or model.onnx (onnxruntime, CPU) -> (NCHW float32 batch ->
    output, preprocess).

    A directory picks model.onnx, else model.pt. preprocess comes from preprocess.json beside the
    file, else from the metadata stored inside it.
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
        predictor, embedded = onnx_predictor(path)
    elif path.suffix in (".pt", ".pth", ".jit"):
        predictor, embedded = torchscript_predictor(path)
    else:
        raise VisloraError(f"{path}: unknown export format '{path.suffix}' (expected .pt or .onnx)")
    preprocess = _read_preprocess_file(path) or embedded
    if "input_size" not in preprocess:  # a file vislora did not export: nothing says how to feed it
        raise VisloraError(f"{path} carries no preprocessing: vislora reads it from {path.parent / PREPROCESS_NAME} "
                         "or from the metadata `vislora export` embeds; write that file (a run's preprocess.json: "
                         f"{', '.join(PREPROCESS_KEYS)}, class_names) beside the model")
    return predictor, preprocess
