"""The shipped backbone matches its card, and the demo recipe builds on it."""

import hashlib
import json
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file

CARD = Path("data/vit_fmnist.json")


def test_card_matches_weights():
    card = json.loads(CARD.read_text())
    path = CARD.parent / card["file"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == card["sha256"]
    model = timm.create_model(card["architecture"], pretrained=False, num_classes=len(card["classes"]),
                              **card["kwargs"])
    state = load_file(str(path))
    model.load_state_dict(state, strict=True)
    assert sum(p.numel() for p in model.parameters()) == card["parameters"]
    assert all(v.dtype == torch.float16 for v in state.values())
    assert path.stat().st_size < 5_000_000
    assert 0 < card["source_val_top1"] <= 100


def test_demo_recipe_uses_the_card():
    from vislora.recipe import load_recipe

    card = json.loads(CARD.read_text())
    recipe = load_recipe("recipes/demo_vit_lora.yaml")
    assert recipe["model"]["name"] == card["architecture"] and recipe["model"]["kwargs"] == card["kwargs"]
    assert list(recipe["data"]["mean"]) == list(card["mean"]) and list(recipe["data"]["std"]) == list(card["std"])
