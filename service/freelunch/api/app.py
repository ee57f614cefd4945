"""Wire the FastAPI app: middleware, routes, error handlers, the pool's lifetime."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from freelunch import __version__
from freelunch.api.errors import install_error_handlers
from freelunch.api.metrics import Metrics
from freelunch.api.routes import router
from freelunch.api.security import APIKeyAuth, BodySizeLimit
from freelunch.api.serving import Serving
from freelunch.config import ServerConfig
from freelunch.pool.pool import WorkerPool


def create_app(
    pool: WorkerPool, default_methods: dict[str, dict] | None = None, server: ServerConfig | None = None
) -> FastAPI:
    """`default_methods`: method options applied to every request that does not set them."""
    server = server or ServerConfig()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        pool.start()
        try:
            yield
        finally:
            pool.shutdown()

    app = FastAPI(title="freelunch", version=__version__, lifespan=lifespan)
    metrics = Metrics(pool.stats, lambda: sum(w.alive for w in pool.workers))
    app.state.serving = Serving(pool, metrics, default_methods, server)
    install_error_handlers(app)
    app.include_router(router)
    # The last added runs first: authentication looks at headers only, before any body is read.
    app.add_middleware(BodySizeLimit, max_bytes=server.max_body_bytes)
    app.add_middleware(APIKeyAuth, keys=server.api_keys, protect_metrics=server.metrics_require_key)
    return app
