"""Wire the FastAPI app: middleware, routes, error handlers, the pool's lifetime."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from freelunch import __version__
from freelunch.api.building import RequestBuilder
from freelunch.api.deps import Services
from freelunch.api.errors import install_error_handlers
from freelunch.api.formatting import Formatter
from freelunch.api.generation import GenerationRunner
from freelunch.api.images import ImageLoader
from freelunch.api.metrics import Metrics
from freelunch.api.openapi import install_openapi
from freelunch.api.playground import build_playground_router
from freelunch.api.rate_limit import RateLimiter
from freelunch.api.rendering import PromptRenderer
from freelunch.api.routes import build_router
from freelunch.api.security import AdmissionGate, APIKeyAuth, BodySizeLimit
from freelunch.config import ServerConfig
from freelunch.methods import method_specs
from freelunch.pool.pool import WorkerPool


def create_app(
    pool: WorkerPool, default_methods: dict[str, dict] | None = None, server: ServerConfig | None = None
) -> FastAPI:
    """`default_methods`: method options applied to every request that does not set them."""
    server = server or ServerConfig()
    default_methods = default_methods or {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        pool.start()
        warm = asyncio.create_task(builder.structured.start())  # a grammar compile process, in the background
        try:
            yield
        finally:
            warm.cancel()
            builder.structured.close()  # the grammar compile processes
            pool.shutdown()

    # /docs and /redoc from Swagger UI's and ReDoc's files in the fastapi-offline package: no CDN
    app = FastAPIOffline(
        title="freelunch", version=__version__, lifespan=lifespan, swagger_ui_parameters={"validatorUrl": None},
        description="OpenAI-compatible server: chat and text completions, with training-free decoding methods as "
        "per-request options",
    )
    metrics = Metrics(pool.stats, lambda: sum(w.alive for w in pool.workers), method_specs())
    served = pool.served
    images = ImageLoader(
        server.allowed_image_hosts, server.image_fetch_timeout, allow_private_addresses=server.allow_private_image_addresses
    )
    renderer = PromptRenderer(served.tokenizer, served.max_model_len, images)
    limiter = RateLimiter(server.rate_limit_rpm, server.rate_limit_tpm)
    builder = RequestBuilder(
        pool,
        renderer,
        metrics,
        default_methods,
        limiter,
        server.request_timeout,
        server.max_tokens_per_request,
        server.enable_auto_tool_choice,
        server.ignore_unknown_fields,
        server.grammar_compile_timeout,
    )
    app.state.services = Services(pool, metrics, builder, GenerationRunner(pool, metrics), Formatter(served.tokenizer))
    install_error_handlers(app)
    install_openapi(app)
    app.include_router(build_router(method_specs(), default_methods))
    if server.playground:
        app.include_router(build_playground_router())
    # The last added runs first: authentication looks at headers only, before any body is read.
    app.add_middleware(BodySizeLimit, max_bytes=server.max_body_bytes, read_timeout=server.body_read_timeout)
    app.add_middleware(
        AdmissionGate,
        full=lambda: pool.would_refuse(1),
        on_refused=metrics.request_failure.labels(reason="overloaded").inc,
    )
    app.add_middleware(
        APIKeyAuth, keys=server.api_keys, protect_metrics=server.metrics_require_key, public_docs=server.public_docs
    )
    return app
