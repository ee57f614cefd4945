import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # tiny models: one thread is as fast, and robust to a busy machine

from tiny_models import build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """(folder, transformers model) of a tiny seeded Llama."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    return folder, build_tiny_model(folder, "llama", seed=0)
