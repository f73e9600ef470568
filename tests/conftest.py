"""Fixtures shared by the test files."""

import pytest
import torch

from vislora.data import make_synthetic_folder
from vislora.defaults import TASK_DEFAULTS


@pytest.fixture(autouse=True)
def no_step_floor(monkeypatch):
    """Classification's train.min_steps default (60) would run every tiny test folder for 60 steps: tests train
    for the epochs they name; the tests of the floor set train.min_steps themselves."""
    monkeypatch.setitem(TASK_DEFAULTS["classification"]["train"], "min_steps", None)
    return monkeypatch  # .undo() puts the real default back


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread (torch and onnxruntime) avoids contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def split_images(tmp_path_factory):
    """3 classes x 12 synthetic 32 px images, split train/val: what zoo.write_recipe's tiny runs train on."""
    return make_synthetic_folder(tmp_path_factory.mktemp("images"), classes=3, per_class=12, size=32, split=True)
