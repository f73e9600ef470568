"""Export: merged LoRA models to TorchScript and ONNX, checked in a process without vislora or timm; prediction."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import vislora
from vislora.export import check_no_adapters, export_model, median_latency
from vislora.exported import load_exported
from vislora.image import load_input as preprocess_image
from vislora.inject import freeze_bn_stats
from vislora.tasks.classification import predict as predict_files

import zoo

PRE = {"input_size": [3, 32, 32], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
       "interpolation": "bicubic", "crop_pct": 0.875, "class_names": ["cat", "dog", "fox"]}
# timm's shape asserts warn when traced; export_model re-checks every file at a second batch size instead
pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")

EXPORTED = ["vit", "mobilenet", "vit-dora"]  # the zoo cases exported: Linear, depthwise / 1x1 convs, DoRA


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Small models on a shared 2-core machine: one thread (conftest.one_thread)."""


def _adapted(arch: str, targets: str, **kwargs):
    """A tiny timm model with a LoRA adapter whose B is random, so that the adapter changes the outputs."""
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=3, **kwargs).eval()
    return _randomized(vislora.inject(model, vislora.LoraConfig(targets=targets, r=4), verify=False))


def _adapted_case(case: zoo.Case):
    """A zoo case with a 3-class head and a rank-4 adapter whose B is random (as _adapted)."""
    return _randomized(vislora.inject(case.build(num_classes=3), case.config(r=4), verify=False))


def _randomized(model):
    """B random (std 0.05, drawn after the seeded build): the adapter changes the outputs."""
    with torch.no_grad():
        for _, layer in vislora.lora_layers(model):
            layer.lora_B.normal_(std=0.05)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    out = {}
    for key in EXPORTED:
        model = _adapted_case(zoo.case(key))
        if key == "mobilenet":  # the conv preset adapts the depthwise convs too
            assert any(layer.base_layer.groups > 1 for _, layer in vislora.lora_layers(model)
                       if isinstance(layer.base_layer, torch.nn.Conv2d))
        x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            adapted = model(x)
            base = vislora.eject(_adapted_case(zoo.case(key)))(x)
        assert (adapted - base).abs().max() > 1e-2, "the adapter must matter for the test to mean anything"
        vislora.unload(model)
        with torch.no_grad():
            merged = model(x)
        report = export_model(model, PRE, root / key, inputs=x, repeats=2)
        np.save(root / key / "x.npy", x.numpy())
        out[key] = {"dir": root / key, "x": x, "adapted": adapted, "merged": merged, "report": report,
                    "params": sum(p.numel() for p in model.parameters())}
    return out


CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np, onnxruntime as ort, torch
    out = {}
    for d in sys.argv[1:]:
        x = np.load(d + "/x.npy")
        files = {"class_names.json": ""}
        ts = torch.jit.load(d + "/model.pt", _extra_files=files).eval()
        sess = ort.InferenceSession(d + "/model.onnx", providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        with torch.no_grad():
            pt, pt1 = ts(torch.from_numpy(x)).numpy(), ts(torch.from_numpy(x[:1])).numpy()
        ox, ox1 = sess.run(None, {name: x})[0], sess.run(None, {name: x[:1]})[0]
        np.savez(d + "/child.npz", pt=pt, pt1=pt1, onnx=ox, onnx1=ox1)
        meta = sess.get_modelmeta().custom_metadata_map
        out[d] = {"onnx_classes": json.loads(meta["class_names"]), "pt_classes": json.loads(files["class_names.json"])}
    out["modules"] = sorted(m for m in sys.modules if m.split(".")[0] in ("vislora", "timm"))
    print(json.dumps(out))
""")


def test_exports_run_without_vislora_or_timm(exported, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    dirs = [str(e["dir"]) for e in exported.values()]
    proc = subprocess.run([sys.executable, "-c", CHILD, *dirs], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["modules"] == []
    for e in exported.values():
        got = np.load(e["dir"] / "child.npz")
        for runtime in ("pt", "onnx"):
            np.testing.assert_allclose(got[runtime], e["merged"].numpy(), rtol=0, atol=1e-4)
            np.testing.assert_allclose(got[runtime], e["adapted"].numpy(), rtol=0, atol=1e-4)
            np.testing.assert_allclose(got[runtime + "1"], e["merged"][:1].numpy(), rtol=0, atol=1e-4)
        assert result[str(e["dir"])] == {"onnx_classes": PRE["class_names"], "pt_classes": PRE["class_names"]}


def test_export_report(exported):
    for e in exported.values():
        on_disk = json.loads((e["dir"] / "export.json").read_text())
        assert on_disk == json.loads(json.dumps(e["report"]))
        assert on_disk["parameters"] == e["params"]
        assert on_disk["inputs"] == {"source": "given", "shape": [4, 3, 32, 32]}
        for fmt, name in (("torchscript", "model.pt"), ("onnx", "model.onnx")):
            entry = on_disk[fmt]
            assert entry["max_abs_diff"] <= 1e-4
            assert entry["bytes"] == (e["dir"] / name).stat().st_size > 0
            assert set(entry["latency_s"]) == {"batch1", "batch8"} and min(entry["latency_s"].values()) > 0
        assert on_disk["onnx"]["nodes"] > 10 and on_disk["onnx"]["opset"] == 17
        assert set(on_disk["pytorch"]["latency_s"]) == {"batch1", "batch8"}
        assert json.loads((e["dir"] / "preprocess.json").read_text()) == PRE


def test_check_no_adapters_rejects_unmerged_model(tmp_path):
    model = _adapted("vit_tiny_patch16_224", "vit", img_size=32, patch_size=4, depth=1)
    with pytest.raises(ValueError, match=r"'blocks\.0\.attn\.qkv'.*unload"):
        check_no_adapters(model)
    with pytest.raises(ValueError, match="unload"):
        export_model(model, PRE, tmp_path)
    assert not (tmp_path / "model.pt").exists()
    vislora.merge(model)  # merged but still wrapped: still an adapter graph
    with pytest.raises(ValueError, match="vislora"):
        check_no_adapters(model)
    check_no_adapters(vislora.unload(model))


def test_check_no_adapters_names_frozen_batchnorm():
    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    freeze_bn_stats(model)
    with pytest.raises(ValueError, match=r"'bn1'.*frozen BatchNorm.*unload"):
        check_no_adapters(model)
    check_no_adapters(vislora.unload(model))


def test_static_batch_and_tolerance(tmp_path):
    model = vislora.unload(_adapted("vit_tiny_patch16_224", "vit", img_size=32, patch_size=4, depth=1))
    x = torch.randn(3, 3, 32, 32)
    report = export_model(model, PRE, tmp_path / "static", formats=("onnx",), dynamic_batch=False, inputs=x,
                          repeats=1)
    assert set(report["onnx"]["latency_s"]) == {"batch1"} and not (tmp_path / "static" / "model.pt").exists()
    predictor, pre = load_exported(tmp_path / "static" / "model.onnx")
    with torch.no_grad():
        np.testing.assert_allclose(predictor(x.numpy()), model(x).numpy(), rtol=0, atol=1e-4)
    assert pre == PRE
    with pytest.raises(ValueError, match="does not match"):  # any difference fails a negative tolerance
        export_model(model, PRE, tmp_path / "strict", formats=("torchscript",), inputs=x, tol=-1.0, repeats=1)
    assert "max_abs_diff" in json.loads((tmp_path / "strict" / "export.json").read_text())["torchscript"]


def _write_images(folder):
    yy, xx = np.mgrid[0:40, 0:60]
    rgb = np.stack([xx * 4, yy * 6, (xx + yy) * 2], -1).astype(np.uint8)
    paths = [folder / "rgb.png", folder / "gray.png", folder / "rgba.png"]
    Image.fromarray(rgb).save(paths[0])
    Image.fromarray(rgb[..., 0]).save(paths[1])
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])).save(paths[2])
    return paths


def test_predict_files(exported, tmp_path):
    good = _write_images(tmp_path)
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    paths = [good[0], tmp_path / "missing.png", good[1], broken, good[2]]
    e = exported["mobilenet"]
    by_runtime = []
    for name in ("model.onnx", "model.pt"):
        predictor, pre = load_exported(e["dir"] / name)
        results = predict_files(predictor, pre, paths, topk=5)
        assert [r["path"] for r in results] == [str(p) for p in paths]
        assert "no image" in results[1]["error"] and "missing.png" in results[1]["error"]
        assert "unreadable image" in results[3]["error"] and "broken.png" in results[3]["error"]
        for r in (results[0], results[2], results[4]):
            assert "error" not in r and len(r["top"]) == 3  # topk is capped by the number of classes
            assert {c for c, _ in r["top"]} == set(PRE["class_names"])
            probs = [p for _, p in r["top"]]
            assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-5
        by_runtime.append([dict(r["top"]) for r in results if "top" in r])
    for a, b in zip(*by_runtime, strict=True):
        assert all(abs(a[c] - b[c]) < 1e-5 for c in a)


def test_preprocess_image_geometry(tmp_path):
    """Shorter side to size / crop_pct, center crop, normalize: timm's eval transform up to interpolation."""
    from timm.data import create_transform

    path = _write_images(tmp_path)[0]
    pre = {**PRE, "interpolation": "bilinear"}
    ours = preprocess_image(path, pre)
    assert ours.shape == (3, 32, 32) and ours.dtype == np.float32
    ref = create_transform(input_size=(3, 32, 32), crop_pct=0.875, interpolation="bilinear", mean=PRE["mean"],
                           std=PRE["std"])(Image.open(path).convert("RGB")).numpy()
    assert np.abs(ours - ref).max() < 0.05
    with pytest.raises(ValueError, match="interpolation"):
        preprocess_image(path, {**PRE, "interpolation": "cubic-ish"})
    with pytest.raises(ValueError, match="crop_pct"):
        preprocess_image(path, {k: v for k, v in PRE.items() if k != "crop_pct"})


def test_load_exported_errors_and_latency(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.onnx"):
        load_exported(tmp_path / "model.onnx")
    (tmp_path / "model.tflite").write_text("")
    with pytest.raises(ValueError, match="tflite"):
        load_exported(tmp_path / "model.tflite")
    calls = []
    assert median_latency(calls.append, 0, warmup=2, repeats=5) >= 0 and len(calls) == 7
