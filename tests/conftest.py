import os

import socket
import threading
import time

import httpx
import pytest
import torch
import uvicorn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # tiny models: one thread is as fast, and robust to a busy machine

from tiny_models import build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """(folder, transformers model) of a tiny seeded Llama."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    return folder, build_tiny_model(folder, "llama", seed=0)


@pytest.fixture(scope="module")
def server(tiny_llama):
    """A real uvicorn server on loopback over the tiny Llama: (base url, model id, HF model, worker)."""
    from freelunch.api.app import create_app
    from freelunch.config import EngineConfig
    from freelunch.pool.pool import WorkerPool
    from freelunch.pool.worker import ThreadWorker

    folder, hf_model = tiny_llama
    worker = ThreadWorker.load(EngineConfig(model=str(folder), dtype="float32", max_model_len=512, kv_cache_gib=0.05))
    app = create_app(WorkerPool([worker]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(base + "/ready").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    yield base, folder.name, hf_model, worker
    srv.should_exit = True
    thread.join(timeout=10)
