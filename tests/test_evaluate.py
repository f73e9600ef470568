"""vislora.evaluate: eval and predict report what training saw, on the run and on its exported files (issue 14's
silent wrong results), and the recipe's eval / export options take effect."""

import numpy as np
import pytest
from PIL import Image

import vislora.data as vdata
from vislora.cli import main
from vislora.evaluate import evaluate, predict

from zoo import best_top1, write_recipe


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, split_images):
    """LoRA on a random-init base (pretrained: false, no checkpoint), trained and exported through the CLI."""
    tmp = tmp_path_factory.mktemp("run")
    recipe = write_recipe(tmp / "r.yaml", split_images, {"r": 4, "targets": "vit"})
    assert main(["train", str(recipe), "--out", str(tmp / "run")]) == 0
    assert main(["export", str(tmp / "run")]) == 0
    return tmp / "run"


def test_eval_reproduces_the_reported_top1_on_a_random_init_base(lora_run, split_images, tmp_path):
    reported = best_top1(lora_run)
    first = evaluate(lora_run, out=tmp_path / "a.json")["top1"]
    second = evaluate(lora_run, out=tmp_path / "b.json")["top1"]
    assert first == second == reported
    for exported in ("model.pt", "model.onnx"):  # the deployed files keep it
        assert evaluate(lora_run / "export" / exported, data=split_images,
                        out=tmp_path / "x.json")["top1"] == reported


def _twins(tmp_path):
    """An upright photo and its EXIF-rotated twin (pixels stored sideways, orientation 6), a 16-bit PNG and its
    8-bit twin."""
    rng = np.random.default_rng(0)
    base = np.zeros((40, 30, 3), np.uint8)
    base[5:20, 4:12] = (230, 40, 40)
    base[25:35, 15:28] = (40, 200, 60)
    base += rng.integers(0, 30, base.shape, dtype=np.uint8)
    Image.fromarray(base).save(tmp_path / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": store the pixels rotated 90 CCW
    Image.fromarray(np.rot90(base, 1).copy()).save(tmp_path / "rotated.png", exif=exif)
    gray = base.mean(2).astype(np.uint8)
    Image.fromarray(gray).save(tmp_path / "gray8.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "gray16.png")
    return [tmp_path / n for n in ("upright.png", "rotated.png", "gray8.png", "gray16.png")]


@pytest.mark.parametrize("target", ["run", "export/model.pt", "export/model.onnx"])
def test_predict_reads_images_as_training_does(lora_run, tmp_path, target):
    paths = _twins(tmp_path)
    _, results = predict(lora_run if target == "run" else lora_run / target, paths, topk=3)
    probs = [dict(r["top"]) for r in results]
    for a, b in ((0, 1), (2, 3)):
        assert max(abs(probs[a][c] - probs[b][c]) for c in probs[a]) <= 1e-3, (paths[a].name, paths[b].name)
    assert max(abs(probs[0][c] - probs[2][c]) for c in probs[0]) > 1e-4  # the twins are not all the same picture


def test_options_are_read(tmp_path, split_images, monkeypatch):
    """eval.topk, the recipe's export section and eval --batch-size all take effect."""
    recipe = write_recipe(tmp_path / "r.yaml", split_images, {"r": 4, "targets": "vit"}, epochs=1)
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--out", str(run), "--set", "eval.topk=2",
                 "--set", "export.formats=[torchscript]", "--set", "export.opset=18"]) == 0
    assert main(["export", str(run)]) == 0
    assert (run / "export/model.pt").is_file() and not (run / "export/model.onnx").exists()
    sizes, real = [], vdata.build_loader
    monkeypatch.setattr(vdata, "build_loader", lambda ds, bs, *a, **k: sizes.append(bs) or real(ds, bs, *a, **k))
    report = evaluate(run, out=tmp_path / "e.json", batch_size=3)
    assert "top2" in report and "top5" not in report and sizes == [3]
