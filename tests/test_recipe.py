"""vislora.recipe: where a recipe's relative paths point (the recipe's folder, or the working directory for a
path given on the command line)."""

import os

import yaml

from vislora.cli import main
from vislora.recipe import load_recipe, resolve

from zoo import write_recipe


def test_relative_paths_resolve_against_the_recipe_or_the_working_directory(tmp_path, split_images, monkeypatch):
    repo = os.getcwd()
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(os.path.join(repo, "recipes/demo_vit_lora.yaml"))
    assert recipe["data"]["path"] == os.path.join(repo, "data", "mnist")
    assert recipe["model"]["checkpoint"] == os.path.join(repo, "data", "vit_fmnist.safetensors")
    (tmp_path / "work").mkdir()
    os.symlink(split_images, tmp_path / "work" / "imgs")
    write_recipe(tmp_path / "r.yaml", "unused", {"r": 4, "targets": "vit"}, epochs=1)
    monkeypatch.chdir(tmp_path / "work")
    assert main(["train", "../r.yaml", "--data", "imgs", "--out", "run"]) == 0  # --data: the working directory
    saved = yaml.safe_load((tmp_path / "work/run/recipe.yaml").read_text())
    assert saved["data"]["path"] == str(tmp_path / "work" / "imgs")
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "work/run", "--out", "e.json"]) == 0  # evaluated from another folder



def test_the_step_floor_is_off_unless_a_recipe_sets_it():
    """train.min_steps (issue #30) is an option: measured, it did not hold on every proof folder."""
    assert resolve({"data": {"path": "x"}})["train"]["min_steps"] is None
    assert resolve({"data": {"path": "x"}, "train": {"min_steps": 60}})["train"]["min_steps"] == 60
