"""`vislora fewshot`: k-shot sampling (k per class, nested, the same for every contender), the fixed step budget,
the outputs, and a grid that resumes without retraining."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from vislora import fewshot as fs
from vislora.cli import main
from vislora.data import make_synthetic_folder, scan_folder
from vislora.recipe import resolve

VIT = {"name": "vit_tiny_patch16_224", "pretrained": False, "kwargs": {"img_size": 32, "patch_size": 8, "depth": 1}}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_synthetic_folder(tmp_path_factory.mktemp("fewshot") / "images", classes=3, per_class=12, size=32,
                                 split=True)


def recipe_for(folder: Path, model: dict = VIT, adapter=None) -> dict:
    return resolve({"model": model, "adapter": adapter or {"r": 2, "targets": "vit"},
                    "data": {"path": str(folder), "img_size": 32, "workers": 0},
                    "train": {"epochs": 2, "batch_size": 4, "warmup_epochs": 1, "lr": 1e-3}})


def test_sampling_is_k_per_class_nested_and_seeded(folder):
    train, _ = scan_folder(folder)
    sets = fs.sample_shots(train, [4, 1, 2], seed=0)
    assert sorted(sets) == [1, 2, 4]
    for k, items in sets.items():
        assert sorted(y for _, y in items) == sorted(list(range(3)) * k)
        assert set(items) <= set(train.items)
    assert set(sets[1]) < set(sets[2]) < set(sets[4])
    assert fs.sample_shots(train, [1, 2, 4], seed=0) == sets
    assert fs.sample_shots(train, [4], seed=1)[4] != sets[4]
    with pytest.raises(ValueError, match="class 'class_0' has 9 training images, fewer than --shots 10"):
        fs.sample_shots(train, [10], seed=0)


def test_step_budget_and_learning_rates(folder):
    recipe = recipe_for(folder)
    assert fs.default_steps(recipe, 16, 3) == 100  # 2 epochs x 12 batches < the floor
    assert fs.default_steps({**recipe, "train": {**recipe["train"], "epochs": 20}}, 16, 3) == 240
    assert fs.contender_lrs(recipe) == pytest.approx({"lora": 1e-3, "probe": 5e-3, "full": 5e-4})
    probe = resolve({**recipe, "adapter": "linear_probe"})
    assert fs.contender_lrs(probe, {"full": 1e-4}) == pytest.approx({"lora": 2e-4, "probe": 1e-3, "full": 1e-4})
    assert fs.contender_adapter(probe, "lora")["targets"] == "vit"  # the default LoRA for a probe recipe
    cell = fs.cell_recipe(recipe, "full", 2, folder, steps=7, lr=0.5)
    assert cell["adapter"] is None and cell["data"]["val_fraction"] == 0 and cell["data"]["path"] == str(folder)
    assert (cell["train"]["seed"], cell["train"]["max_steps"], cell["train"]["epochs"]) == (2, 7, 1)
    assert cell["train"]["lr"] == 0.5 and cell["train"]["warmup_epochs"] == 0.5  # the recipe's warm-up share


def test_grid_trains_identical_subsets_writes_outputs_and_resumes(folder, tmp_path, monkeypatch):
    recipe, out = recipe_for(folder), tmp_path / "grid"
    seen = []
    real_train = fs.train

    def spy(cell_recipe, run_dir, **kwargs):
        root = Path(cell_recipe["data"]["path"])
        links = [p for p in root.rglob("*") if p.is_file()]
        seen.append({"cell": Path(run_dir).name, "links": len(links), "steps": cell_recipe["train"]["max_steps"],
                     "images": {(p.parent.name, os.path.realpath(p)) for p in links}})
        return real_train(cell_recipe, run_dir, **kwargs)

    monkeypatch.setattr(fs, "train", spy)
    rows = fs.fewshot(recipe, out, shots=[1, 2], seeds=1, steps=3)
    assert len(rows) == len(seen) == 6
    images = {s["cell"]: s["images"] for s in seen}
    for k in (1, 2):
        lora, probe, full = (images[f"shots{k}_seed0_{c}"] for c in ("lora", "probe", "full"))
        assert lora == probe == full  # the same images for every contender
        assert sorted(c for c, _ in lora) == sorted(["class_0", "class_1", "class_2"] * k)  # k per class
    assert images["shots1_seed0_lora"] < images["shots2_seed0_lora"]  # nested
    assert all(s["links"] == 3 * 4 and s["steps"] == 3 for s in seen)  # steps x batch samples, whatever k

    saved = json.loads((out / "fewshot.json").read_text())
    assert saved["settings"]["steps"] == 3 and len(saved["rows"]) == 6
    for row in saved["rows"]:
        assert {"shots", "seed", "contender", "top1", "macro_f1", "trainable", "wall_s"} <= set(row)
        assert 0 <= row["top1"] <= 1 and row["val_images"] == 9
        assert not (Path(row["run_dir"]) / "checkpoints").exists()
    trainable = {r["contender"]: r["trainable"] for r in rows}
    assert trainable["probe"] < trainable["lora"] < trainable["full"]
    table = (out / "fewshot.md").read_text()
    assert "| shots | lora | probe | full |" in table and "| 2 |" in table and " ± " in table
    assert (out / "fewshot.png").stat().st_size > 0
    subsets = json.loads((out / "subsets.json").read_text())
    assert len(subsets["0"]["2"]) == 6 and set(subsets["0"]["1"]) < set(subsets["0"]["2"])
    assert not (out / "data" / "seed0_shots1").exists()  # k-shot folders go once their cells are done

    seen.clear()
    again = fs.fewshot(recipe, out, shots=[1, 2], seeds=1, steps=3)  # resumes: nothing left to train
    assert seen == [] and again == rows
    more = fs.fewshot(recipe, out, shots=[1, 2], seeds=2, steps=3, contenders=["probe"])  # only the new cells
    assert sorted(s["cell"] for s in seen) == ["shots1_seed1_probe", "shots2_seed1_probe"]
    assert len(more) == 8 and more[:6] == rows
    with pytest.raises(ValueError, match="other settings"):
        fs.fewshot(recipe, out, shots=[1, 2], seeds=2, steps=4)


def test_cli_fewshot_on_a_cnn(folder, tmp_path, capsys):
    """The command as a user types it, on a conv LoRA recipe (the MobileNetV2 benchmark's shape)."""
    recipe = {"model": {"name": "test_efficientnet", "pretrained": False}, "adapter": {"r": 2, "targets": "conv"},
              "data": {"path": str(folder), "img_size": 32, "workers": 0},
              "train": {"epochs": 1, "batch_size": 4, "warmup_epochs": 0}}
    (tmp_path / "cnn.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "cnn"
    assert main(["fewshot", str(tmp_path / "cnn.yaml"), "--shots", "1", "--seeds", "1", "--steps", "2",
                 "--lr", "full=1e-4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| 1 |" in printed and "full 0.0001" in printed
    progress = [line for line in printed.splitlines() if line.startswith("fewshot ")]  # one line per finished run
    assert [line.split(":")[0] for line in progress] == ["fewshot 1/3", "fewshot 2/3", "fewshot 3/3"]
    assert "val top-1" in progress[0] and "ETA" in progress[0] and "grid done" in progress[-1]
    assert {r["contender"] for r in json.loads((out / "fewshot.json").read_text())["rows"]} == set(fs.CONTENDERS)
    assert main(["fewshot", str(tmp_path / "cnn.yaml"), "--shots", "20", "--out", str(tmp_path / "bad")]) == 2
    assert "fewer than --shots 20" in capsys.readouterr().err
    assert main(["fewshot", str(tmp_path / "cnn.yaml"), "--lr", "probe", "--out", str(tmp_path / "bad")]) == 2
    assert "CONTENDER=LR" in capsys.readouterr().err


def test_lp_ft_recipes_repeated_contenders_and_a_class_named_valid(tmp_path):
    """A recipe with train.head_epochs runs its head stage as the same share of each cell's one epoch;
    `--contenders probe probe` is one contender; a class folder called `valid` is a class, not a split."""
    flat = make_synthetic_folder(tmp_path / "flat", classes=3, per_class=8, size=32)
    (flat / "class_2").rename(flat / "valid")
    recipe = resolve({"model": VIT, "adapter": {"r": 2, "targets": "vit"},
                      "data": {"path": str(flat), "img_size": 32, "workers": 0},
                      "train": {"epochs": 4, "batch_size": 4, "head_epochs": 1, "lr": 1e-3}})
    cell = fs.cell_recipe(recipe, "lora", 0, flat, steps=8, lr=1e-3)
    assert cell["train"]["head_epochs"] == 0.25 and cell["train"]["epochs"] == 1
    rows = fs.fewshot(recipe, tmp_path / "grid", shots=[1], seeds=1, contenders=["lora", "probe", "probe"],
                      steps=4)
    assert [r["contender"] for r in rows] == ["lora", "probe"]
    assert all(r["val_images"] == len(scan_folder(flat)[1].items) == 5 for r in rows)  # `valid` is a class
