"""Wire the FastAPI app: routes, error handlers, the pool's lifetime."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from freelunch import __version__
from freelunch.api.errors import install_error_handlers
from freelunch.api.metrics import Metrics
from freelunch.api.routes import router
from freelunch.api.serving import Serving
from freelunch.pool.pool import WorkerPool


def create_app(pool: WorkerPool, default_methods: dict[str, dict] | None = None) -> FastAPI:
    """`default_methods`: method options applied to every request that does not set them."""
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        pool.start()
        try:
            yield
        finally:
            pool.shutdown()

    app = FastAPI(title="freelunch", version=__version__, lifespan=lifespan)
    metrics = Metrics(pool.stats)
    app.state.serving = Serving(pool, metrics, default_methods)
    install_error_handlers(app)
    app.include_router(router)
    return app
