import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # tiny models: one thread is as fast, and robust to a busy machine

from freelunch.pool.local_engine import install_plugins  # noqa: E402

install_plugins()  # the engine's constraints and methods, as a worker installs them
from live_server import live_server, tiny_app  # noqa: E402
from tiny_models import build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """(folder, transformers model) of a tiny seeded Llama."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    return folder, build_tiny_model(folder, "llama", seed=0)


@pytest.fixture(scope="module")
def loaded(tiny_llama):
    """The tiny Llama loaded by our loader in float32 (one per test module: tests change its state)."""
    from freelunch.models.loader import load_model, resolve_source

    folder, _ = tiny_llama
    return load_model(resolve_source(str(folder)), "float32")


@pytest.fixture(scope="module")
def server(tiny_llama):
    """A real uvicorn server on loopback over the tiny Llama: (base url, model id, HF model, worker)."""
    folder, hf_model = tiny_llama
    app, worker = tiny_app(folder)
    with live_server(app) as base:
        yield base, folder.name, hf_model, worker
