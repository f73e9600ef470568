"""Every bad input the CLI can get: a non-zero exit, one line naming the key, file or value, and no traceback."""

import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
import yaml
from PIL import Image

from vislora import cli, hub
from vislora.cli import main
from vislora.data import make_synthetic_folder

TINY = {"model": {"name": "vit_tiny_patch16_224", "pretrained": False,
                  "kwargs": {"img_size": 32, "patch_size": 8, "depth": 1}},
        "adapter": {"r": 4, "targets": "vit"},
        "train": {"epochs": 1, "batch_size": 8, "warmup_epochs": 0}}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny image folder, a recipe for it and one finished run (for eval / resume / predict cases)."""
    tmp = tmp_path_factory.mktemp("errors")
    folder = make_synthetic_folder(tmp / "images", classes=3, per_class=8, size=32, split=True)
    recipe = {**TINY, "data": {"path": str(folder), "img_size": 32, "workers": 0}}
    (tmp / "good.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", str(tmp / "good.yaml"), "--out", str(tmp / "run")]) == 0
    assert main(["train", str(tmp / "good.yaml"), "--out", str(tmp / "dora_run"), "--set",
                 "adapter.use_dora=true"]) == 0
    (tmp / "not_torchscript.pt").write_bytes(b"PK\x03\x04 this is not a TorchScript archive")
    (tmp / "empty_run").mkdir()
    shutil.copytree(tmp / "run", tmp / "old_groups_run")  # as a vislora before the head had groups of its own
    last = tmp / "old_groups_run" / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    groups = state["optimizer"]["param_groups"]
    state["optimizer"]["param_groups"] = [{**groups[0], "params": [p for g in groups for p in g["params"]]}]
    torch.save(state, last)
    for name, spoil in (("pickled_run", lambda f: torch.save({"epoch": 1, "model": {}, "optimizer": {},
                                                               "payload": print}, f)),
                        ("truncated_run", lambda f: f.write_bytes(f.read_bytes()[:200]))):
        shutil.copytree(tmp / "run", tmp / name)
        spoil(tmp / name / "checkpoints" / "last.pt")
    (tmp / "a_file").write_text("not a folder")
    (tmp / "no_pictures").mkdir()
    (tmp / "no_pictures" / "notes.txt").write_text("not an image")
    (tmp / "foreign").mkdir()
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "identity",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 32, 32])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3, 32, 32])])),
        str(tmp / "foreign" / "model.onnx"))
    return tmp


def recipe_with(env, **changes) -> str:
    """good.yaml with dotted keys changed (value None removes the key's value: null)."""
    recipe = yaml.safe_load((env / "good.yaml").read_text())
    for dotted, value in changes.items():
        node = recipe
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    path = env / f"bad_{len(list(env.glob('bad_*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


# (id, argv builder, text the one-line message must contain)
CASES = [
    ("kwargs-num-classes", lambda e: ["train", recipe_with(e, model__kwargs={"num_classes": 5, "img_size": 32,
                                                                            "patch_size": 8, "depth": 1}),
                                      "--out", str(e / "o1")], "model.kwargs"),
    ("unknown-model", lambda e: ["train", recipe_with(e, model__name="vit_nonexistent_model"), "--out",
                                 str(e / "o2")], "model.name"),
    ("scale-not-a-pair", lambda e: ["train", recipe_with(e, data__augment={"scale": 0.5}), "--out", str(e / "o3")],
     "data.augment.scale"),
    ("epochs-negative", lambda e: ["train", recipe_with(e, train__epochs=-1), "--out", str(e / "o4")], "train.epochs"),
    ("epochs-fraction", lambda e: ["train", recipe_with(e, train__epochs=2.5), "--out", str(e / "o4b")],
     "train.epochs"),
    ("grad-accum-zero", lambda e: ["train", recipe_with(e, train__grad_accum=0), "--out", str(e / "o5")],
     "train.grad_accum"),
    ("min-steps-zero", lambda e: ["train", recipe_with(e, train__min_steps=0), "--out", str(e / "o5b")],
     "train.min_steps"),
    ("device-missing", lambda e: ["train", recipe_with(e, train__device="mps"), "--out", str(e / "o6")],
     "train.device"),
    ("device-unknown", lambda e: ["train", recipe_with(e, train__device="tpu9"), "--out", str(e / "o6b")],
     "train.device"),
    ("diverging-lr", lambda e: ["train", recipe_with(e, train__lr=1e30, model__head_init="timm"), "--out",
                                str(e / "o7")], "train.lr"),
    ("head-epochs-all", lambda e: ["train", recipe_with(e, train__head_epochs=1), "--out", str(e / "o7b")],
     "train.head_epochs"),
    ("head-epochs-negative", lambda e: ["train", recipe_with(e, train__head_epochs=-2), "--out", str(e / "o7c")],
     "train.head_epochs"),
    ("head-lr-text", lambda e: ["train", recipe_with(e, train__head_lr="fast"), "--out", str(e / "o7d")],
     "train.head_lr"),
    ("unknown-key", lambda e: ["train", recipe_with(e, train__learning_rate=0.1), "--out", str(e / "o8")],
     "train.learning_rate"),
    ("unknown-task", lambda e: ["train", recipe_with(e, task="segmentatio"), "--out", str(e / "o9")], "task"),
    ("val-fraction", lambda e: ["train", recipe_with(e, data__val_fraction=1.5), "--out", str(e / "o10")],
     "data.val_fraction"),
    ("recipe-missing", lambda e: ["train", str(e / "nope.yaml")], "nope.yaml"),
    ("data-missing", lambda e: ["train", str(e / "good.yaml"), "--data", str(e / "no_images"), "--out",
                                str(e / "o11")], "no_images"),
    ("run-exists", lambda e: ["train", str(e / "good.yaml"), "--out", str(e / "run")], "--force"),
    ("resume-changed-rank", lambda e: ["train", str(e / "good.yaml"), "--out", str(e / "run"), "--resume",
                                       "--set", "adapter.r=2"], "adapter.r"),
    ("resume-no-checkpoint", lambda e: ["train", str(e / "good.yaml"), "--out", str(e / "empty_run"), "--resume"],
     "nothing to resume"),
    ("resume-no-recipe", lambda e: ["train", "--resume"], "RECIPE"),
    ("resume-other-optimizer-groups", lambda e: ["train", str(e / "good.yaml"), "--out", str(e / "old_groups_run"),
                                                 "--resume"], "parameter groups"),
    ("eval-not-torchscript", lambda e: ["eval", str(e / "not_torchscript.pt"), "--data", str(e / "images")],
     "not a TorchScript"),
    ("eval-missing", lambda e: ["eval", str(e / "no_run")], "no_run"),
    ("eval-exported-without-data", lambda e: ["eval", str(e / "not_torchscript.pt")], "not a TorchScript"),
    ("eval-unknown-class", lambda e: ["eval", str(e / "run"), "--data", str(e / "zoo")], "zoo"),
    ("predict-all-unreadable", lambda e: ["predict", str(e / "run"), str(e / "missing.png")], "missing.png"),
    ("export-onnx-opset", lambda e: ["export", str(e / "no_run")], "no_run"),
    ("extract-needs-model", lambda e: ["extract", "--tuned", str(e / "good.yaml"), "--out", str(e / "x")],
     "--model"),
    ("extract-kwargs-json", lambda e: ["extract", "--tuned", str(e / "w.safetensors"), "--model", "resnet18",
                                       "--kwargs", "{bad", "--out", str(e / "x")], "--kwargs"),
    ("footprint-unknown", lambda e: ["footprint", "not_a_model_or_file"], "not_a_model_or_file"),
    ("shrink-rank-zero", lambda e: ["shrink", str(e / "run"), "--rank", "0", "--out", str(e / "shrunk0")], "rank"),
    ("predict-topk-negative", lambda e: ["predict", str(e / "run"), str(e / "a_file"), "--topk", "-1"], "--topk"),
    ("set-malformed-yaml", lambda e: ["train", str(e / "good.yaml"), "--out", str(e / "o12"), "--set",
                                      "train.lr=[1,"], "train.lr=[1,"),
    ("set-reserved-yaml", lambda e: ["train", str(e / "good.yaml"), "--out", str(e / "o13"), "--set",
                                     "train.epochs=@x"], "train.epochs=@x"),
    ("set-rank-pattern-number", lambda e: ["train", str(e / "good.yaml"), "--out", str(e / "o14"), "--set",
                                           "adapter.rank_pattern=5"], "adapter.rank_pattern"),
    ("set-targets-number", lambda e: ["train", str(e / "good.yaml"), "--out", str(e / "o15"), "--set",
                                      "adapter.targets=5"], "adapter.targets"),
    ("train-out-is-a-file", lambda e: ["train", str(e / "good.yaml"), "--out", str(e / "a_file")], "is a file"),
    ("export-out-is-a-file", lambda e: ["export", str(e / "run"), "--out", str(e / "a_file")], "is a file"),
    ("predict-out-is-a-file", lambda e: ["predict", str(e / "run"), str(e / "a_file"), "--out", str(e / "a_file")],
     "is a file"),
    ("fewshot-out-is-a-file", lambda e: ["fewshot", str(e / "good.yaml"), "--out", str(e / "a_file")], "is a file"),
    ("extract-out-is-a-file", lambda e: ["extract", "--tuned", str(e / "run"), "--out", str(e / "a_file")],
     "is a file"),
    ("resume-pickle-payload", lambda e: ["train", "--resume", "--out", str(e / "pickled_run")],
     "not a training checkpoint"),
    ("resume-truncated-checkpoint", lambda e: ["train", "--resume", "--out", str(e / "truncated_run")],
     "not a training checkpoint"),
    ("dora-with-pissa", lambda e: ["train", recipe_with(e, adapter__use_dora=True, adapter__init="pissa"), "--out",
                                   str(e / "o16")], "pissa"),
    ("dora-on-stdconv", lambda e: ["train", recipe_with(e, model__name="resnetv2_50x1_bit", model__kwargs={},
                                                        adapter__targets="conv", adapter__use_dora=True),
                                   "--out", str(e / "o17")], "StdConv2d"),
    ("dora-with-lowrank-penalty", lambda e: ["train", recipe_with(e, adapter__use_dora=True,
                                                                  train__lowrank_penalty=0.1), "--out",
                                             str(e / "o18")], "train.lowrank_penalty"),
    ("dora-use-dora-text", lambda e: ["train", recipe_with(e, adapter__use_dora="yes please"), "--out",
                                      str(e / "o19")], "adapter.use_dora"),
    ("shrink-dora-run", lambda e: ["shrink", str(e / "dora_run"), "--rank", "1", "--out", str(e / "o20")], "DoRA"),
    ("spectrum-dora-run", lambda e: ["spectrum", str(e / "dora_run")], "DoRA"),
    ("lora-plus-on-probe", lambda e: ["train", str(e / "good.yaml"), "--out", str(e / "o21"), "--set",
                                      "adapter=linear_probe", "--set", "train.lora_plus_ratio=16"],
     "train.lora_plus_ratio"),
    ("lora-plus-negative", lambda e: ["train", str(e / "good.yaml"), "--out", str(e / "o22"), "--set",
                                      "train.lora_plus_ratio=-2"], "train.lora_plus_ratio"),
    ("eval-foreign-onnx", lambda e: ["eval", str(e / "foreign" / "model.onnx"), "--data", str(e / "images")],
     "preprocess.json"),
    # issue #31: messages that say what to do, checked before torch is imported where they can be
    ("unknown-top-level-key", lambda e: ["train", recipe_with(e, adaptor={"r": 4}), "--out", str(e / "o16")],
     "did you mean 'adapter'?"),
    ("unknown-key-elsewhere", lambda e: ["train", recipe_with(e, epochs=3), "--out", str(e / "o17")],
     "did you mean 'train.epochs'?"),
    ("unknown-key-alias", lambda e: ["train", str(e / "good.yaml"), "--out", str(e / "o18"), "--set",
                                     "train.learning_rate=0.1"], "did you mean 'train.lr'?"),
    ("unknown-model-close", lambda e: ["train", recipe_with(e, model__name="vit_tiny_patch16_22"), "--out",
                                       str(e / "o19")], "did you mean 'vit_tiny_patch16_224'"),
    ("train-key-value", lambda e: ["train", "epochs=3"], "--set train.epochs=3"),
    ("checkpoint-missing", lambda e: ["train", recipe_with(e, model__checkpoint=str(e / "w.safetensors")), "--out",
                                      str(e / "o20")], "model.checkpoint"),
    ("resume-not-a-run", lambda e: ["train", "--resume", "--out", str(e / "no_such_run")], "is not a vislora run"),
    ("resume-finished", lambda e: ["train", "--resume", "--out", str(e / "run")], "already finished"),
    ("eval-a-recipe", lambda e: ["eval", str(e / "good.yaml")], "train it first"),
    ("predict-a-recipe", lambda e: ["predict", str(e / "good.yaml"), str(e / "a_file")], "train it first"),
    ("export-a-recipe", lambda e: ["export", str(e / "good.yaml")], "train it first"),
    ("predict-folder-without-images", lambda e: ["predict", str(e / "run"), str(e / "no_pictures")],
     "no image files"),
    ("predict-glob-without-images", lambda e: ["predict", str(e / "run"), str(e / "no_pictures" / "*.jpg")],
     "no image files"),
]


@pytest.mark.parametrize("build,expected", [(c[1], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(env, build, expected, capsys):
    code = main(build(env))
    captured = capsys.readouterr()
    message = captured.err.strip().splitlines()
    assert code != 0, captured.out[-500:]
    assert message and expected in message[-1], captured.err[-1000:]
    assert "Traceback" not in captured.err + captured.out


def test_pretrained_without_network_is_one_line_naming_the_offline_options(env, monkeypatch, capsys):
    """A closed local port stands for a hub that cannot be reached: refused at once, no download retries."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    for name in ("HF_HUB_OFFLINE", *hub.PROXY_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    hub.unreachable.cache_clear()
    try:
        assert main(["train", recipe_with(env, model__pretrained=True), "--out", str(env / "o21")]) == 2
    finally:
        hub.unreachable.cache_clear()
    message = capsys.readouterr().err.strip().splitlines()
    assert len(message) == 1 and "model.checkpoint" in message[0] and "tools/import_weights.py" in message[0]


def test_bad_arguments_are_checked_before_anything_is_written(env):
    """A refused `shrink --rank 0 --out NEW` leaves no NEW behind (a corrected rerun would be refused)."""
    assert main(["shrink", str(env / "run"), "--rank", "0", "--out", str(env / "shrunk_bad")]) == 2
    assert not (env / "shrunk_bad").exists()


def test_no_traceback_in_a_real_process(env):
    """The same through the installed entry point, as a user sees it."""
    for argv in (["train", recipe_with(env, train__epochs=-1), "--out", str(env / "p1")],
                 ["eval", str(env / "not_torchscript.pt"), "--data", str(env / "images")]):
        proc = subprocess.run([sys.executable, "-m", "vislora", *argv], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def test_good_edge_values_are_accepted(env):
    """1e1 epochs is 10 (YAML reads it as a string); extract accepts --kwargs num_classes that agrees."""
    from vislora.recipe import resolve

    assert resolve({"train": {"epochs": "1e1"}})["train"]["epochs"] == 10


def test_predict_reports_a_decompression_bomb_per_file_and_goes_on(env, tmp_path, capsys, monkeypatch):
    big, ok = tmp_path / "bomb.png", tmp_path / "ok.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(big)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(ok)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x64 > 2x this limit: Pillow refuses it as a bomb
    assert main(["predict", str(env / "run"), str(big), str(ok)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "bomb.png: ERROR" in out[0] and "DecompressionBomb" in out[0] and "ERROR" not in out[1]


@pytest.mark.parametrize("error", [ValueError("a bug, not the user's input"), KeyError("missing")])
def test_an_internal_error_keeps_its_traceback(monkeypatch, capsys, error):
    """Only VisloraError (and FileNotFoundError, TrainingDiverged, refusals) is one line: a plain ValueError or a
    KeyError from a bug in vislora reaches the user with its traceback, so it can be reported."""
    def broken(args):
        raise error

    monkeypatch.setattr(cli, "command", lambda name: broken)
    monkeypatch.setitem(cli.PREPARE, "footprint", lambda args: None)
    with pytest.raises(type(error)):
        main(["footprint", "resnet18"])
    assert "error:" not in capsys.readouterr().err


def test_an_internal_error_prints_a_traceback_in_a_real_process(tmp_path):
    code = ("import sys, vislora.cli as c\n"
            "def broken(args): raise ValueError('internal')\n"
            "c.command = lambda name: broken\n"
            "c.PREPARE['footprint'] = lambda args: None\n"
            "sys.exit(c.main(['footprint', 'resnet18']))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 1 and "Traceback" in run.stderr and "ValueError: internal" in run.stderr, run.stderr
