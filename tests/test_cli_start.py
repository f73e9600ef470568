"""Start-up: `--help`, argument errors and recipe / path checks answer before torch, timm, onnxruntime or
matplotlib are imported (issue #31: every command took 13-20 s to start, a typo as long)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import vislora.cli as cli
from vislora import fewshot

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "timm", "onnxruntime", "matplotlib")
# runs `python -m vislora ARGS` in this process and reports, at exit, which heavy modules it imported
PROBE = f"""
import atexit, json, runpy, sys
atexit.register(lambda: print("HEAVY=" + json.dumps([m for m in {HEAVY!r} if m in sys.modules]), file=sys.stderr))
sys.argv = ["vislora", *sys.argv[1:]]
runpy.run_module("vislora", run_name="__main__", alter_sys=True)
"""


def vislora(*argv: str, cwd: Path = ROOT) -> tuple[int, str, list[str]]:
    """(exit code, stderr without the probe line, heavy modules imported) of `python -m vislora ARGV`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=120)
    lines = proc.stderr.splitlines()
    heavy = json.loads(next(line for line in lines if line.startswith("HEAVY="))[6:])
    return proc.returncode, "\n".join(line for line in lines if not line.startswith("HEAVY=")), heavy


@pytest.fixture(scope="module")
def bad_recipe(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("start")
    (tmp / "images").mkdir()
    data = {"path": str(tmp / "images")}
    (tmp / "good.yaml").write_text(yaml.safe_dump({"model": {"name": "resnet18"}, "data": data}))
    path = tmp / "bad.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "resnet18"}, "adaptor": {"r": 4},
                                    "data": {"path": str(tmp / "images")}}))
    return path


def test_help_imports_nothing_heavy():
    code, err, heavy = vislora("--help")
    assert code == 0 and heavy == [], (heavy, err)
    code, _, heavy = vislora("train", "--help")
    assert code == 0 and heavy == []


@pytest.mark.parametrize("argv,expected", [
    (["train", "{bad}"], "did you mean 'adapter'?"),
    (["train", "{tmp}/good.yaml", "--set", "train.epoch=3"], "did you mean 'train.epochs'?"),
    (["train", "{tmp}/good.yaml", "--data", "{tmp}/no_images"], "no_images does not exist"),
    (["train", "epochs=3"], "--set train.epochs=3"),
    (["train", "{bad}", "imgsz=64"], "--set data.img_size=64"),
    (["train", "{bad}", "--model", "resnet50"], "--set model.name=resnet50"),
    (["predict", "{bad}", "x.jpg"], "train it first"),
    (["eval", "{bad}"], "train it first"),
    (["train", "--resume", "--out", "{tmp}/no_run"], "is not a vislora run"),
])
def test_refusals_come_before_torch_is_imported(bad_recipe, argv, expected):
    argv = [a.format(bad=bad_recipe, tmp=bad_recipe.parent) for a in argv]
    code, err, heavy = vislora(*argv)
    assert code == 2 and expected in err and "Traceback" not in err, err
    assert heavy == [], f"{argv} imported {heavy} before refusing"


def test_offline_pretrained_fails_fast_naming_the_offline_options(bad_recipe, monkeypatch):
    """A closed local port stands for a hub that cannot be reached: one line, no download retries."""
    recipe = bad_recipe.parent / "hub.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name": "resnet18", "pretrained": True},
                                      "data": {"path": str(bad_recipe.parent / "images")}}))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    for name in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    code, err, heavy = vislora("train", str(recipe), "--out", str(bad_recipe.parent / "o"))
    assert code == 2 and "model.checkpoint" in err and "tools/import_weights.py" in err and err.count("\n") == 0
    assert heavy == []


def test_the_cli_lists_fewshots_contenders_and_lr_scale():
    assert cli.CONTENDERS == fewshot.CONTENDERS
    text = cli.build_parser()._subparsers._group_actions[0].choices["fewshot"].format_help()
    assert all(f"{c} {s:g}" in " ".join(text.split()) for c, s in fewshot.LR_SCALE.items()), text
