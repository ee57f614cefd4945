"""Real servers on loopback for API tests."""

import contextlib
import socket
import threading
import time

import httpx
import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(app, ready: str = "/ready"):
    """Serve an ASGI app with uvicorn on a free loopback port; yields the base URL once `ready` answers."""
    from freelunch.api.http_server import server_config

    port = free_port()
    srv = uvicorn.Server(server_config(app, "127.0.0.1", port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(base + ready).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    try:
        yield base
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


def tiny_app(folder, server_config=None, max_in_flight=None, default_methods=None, **engine):
    """(app, worker): the API over an in-process engine on a tiny model folder."""
    from freelunch.api.app import create_app
    from freelunch.config import EngineConfig
    from freelunch.pool.local_engine import ThreadWorker
    from freelunch.pool.pool import WorkerPool

    settings = {"dtype": "float32", "max_model_len": 512, "kv_cache_gib": 0.05, **engine}
    worker = ThreadWorker.load(EngineConfig(model=str(folder), **settings))
    return create_app(WorkerPool([worker], max_in_flight), default_methods, server=server_config), worker
