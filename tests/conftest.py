"""Fixtures shared by the test files."""

import pytest
import torch

from vislora.data import make_synthetic_folder


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
