"""HTTP routes: short handlers over the API services (deps.py). The completion endpoints' body
models carry a field per registered method (`with_methods`), so the router is built per app."""

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from freelunch.api.deps import Services, get_services
from freelunch.api.errors import APIError
from freelunch.api.formatting import ChatShapes, CompletionShapes
from freelunch.api.openapi import ChatCompletion, Completion, error_responses, generation_responses
from freelunch.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    MethodCard,
    ModelCard,
    ModelList,
    new_id,
    now,
    with_methods,
)
from freelunch.methods.spec import MethodSpec
from freelunch.pool.pool import WorkerPool

ServicesDep = Annotated[Services, Depends(get_services)]


def model_card(model_id: str, pool: WorkerPool, methods: list[MethodCard]) -> ModelCard:
    """The card of a served model, with the methods some worker of the pool serves on this model
    (with `--engine vllm`, its native workers' too; a method is listed where the model has what it
    requires, MoE layers or a vision side) and whether any takes images."""
    served = pool.capabilities or pool.served.capabilities  # every worker restarting: the primary's, as loaded
    return ModelCard(
        id=model_id,
        max_model_len=pool.served.max_model_len,
        methods=[m for m in methods if m.option in served and set(m.requires) <= served],
        images="images" in served,
    )


def build_router(specs: dict[str, MethodSpec], defaults: dict[str, dict] | None = None) -> APIRouter:
    """The API's routes; `defaults`, the server's default options by method (its flags)."""
    router = APIRouter()
    ChatBody = with_methods(ChatCompletionRequest, specs, chat=True)
    CompletionBody = with_methods(CompletionRequest, specs, chat=False)
    defaults = defaults or {}
    methods = [
        MethodCard(
            option=option,
            description=spec.description,
            options_schema=spec.options.model_json_schema(),
            requires=list(spec.requires),
            server_default=defaults.get(option),
            off_options=spec.off_options,
        )
        for option, spec in sorted(specs.items())
    ]

    @router.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @router.get("/ready")
    async def ready(api: ServicesDep) -> Response:
        """200 while any worker serves ("degraded" if some are restarting); 503 when none does or
        the server is draining, so that a load balancer sends traffic elsewhere."""
        pool = api.pool
        workers = [
            {"name": w.name, "alive": w.alive, "in_flight": w.in_flight, "restarts": w.restarts, "pid": w.pid}
            for w in pool.worker_states()
        ]
        if not pool.ready:
            reason = "the server is shutting down" if pool.draining else "no engine worker is ready"
            return JSONResponse({"status": "unavailable", "reason": reason, "workers": workers}, status_code=503)
        status = "degraded" if pool.degraded else "ready"
        return JSONResponse({"status": status, "model": pool.served.name, "workers": workers})

    @router.get("/metrics")
    async def metrics(api: ServicesDep) -> Response:
        return PlainTextResponse(generate_latest(api.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @router.get("/v1/models", responses=error_responses(401))
    async def list_models(api: ServicesDep) -> ModelList:
        return ModelList(data=[model_card(m, api.pool, methods) for m in api.pool.models()])

    @router.get("/v1/models/{model_id:path}", responses=error_responses(401, 404))
    async def retrieve_model(model_id: str, api: ServicesDep) -> ModelCard:
        if model_id not in api.pool.models():
            raise APIError(404, f"The model `{model_id}` does not exist", "model", "model_not_found")
        return model_card(model_id, api.pool, methods)

    @router.post("/v1/chat/completions", response_model=None, responses=generation_responses(ChatCompletion))
    async def chat_completions(body: ChatBody, raw: Request, api: ServicesDep) -> Response:  # type: ignore[valid-type]
        build = api.builder
        model = build.check(body, body.messages)
        include_usage, continuous = build.stream_flags(body)
        prompt = await build.chat_prompt(body)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = build.sampling_params(body, max_tokens, len(prompt.token_ids), logprobs, None, "messages")
        methods = await build.methods(body)
        constraint = await build.constraint(body, raw)
        rid = new_id("chatcmpl")
        call = build.call(raw, body, rid, [prompt], [params], methods, model, len(prompt.token_ids), constraint)
        tools = bool(body.tools) and body.tool_choice != "none"
        shapes = ChatShapes(api.formatter, call, rid, now(), model, body.logprobs, include_usage, tools)
        if not body.stream:
            return JSONResponse(shapes.response(await api.runner.collect(call, raw)), headers=call.headers)
        return await api.runner.sse(call, shapes, include_usage, shapes.usage if continuous else None)

    @router.post("/v1/completions", response_model=None, responses=generation_responses(Completion))
    async def completions(body: CompletionBody, raw: Request, api: ServicesDep) -> Response:  # type: ignore[valid-type]
        build = api.builder
        model = build.check(body)
        include_usage, continuous = build.stream_flags(body)
        if body.suffix:
            raise APIError(400, "suffix is not supported", "suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(400, "best_of is not supported (use n)", "best_of")
        prompts = await build.completion_prompts(body.prompt)
        prompt_lp = body.logprobs if body.echo and body.logprobs is not None else None
        max_tokens = body.max_tokens if body.max_tokens is not None else 16
        params = [build.sampling_params(body, max_tokens, len(p.token_ids), body.logprobs, prompt_lp, "prompt") for p in prompts]
        methods = await build.methods(body)
        constraint = await build.constraint(body, raw)
        rid = new_id("cmpl")
        prompt_tokens = sum(len(p.token_ids) for p in prompts) * body.n
        call = build.call(raw, body, rid, prompts, params, methods, model, prompt_tokens, constraint)
        texts = [api.formatter.tokenizer.decode(p.token_ids) for p in prompts] if body.echo else None
        shapes = CompletionShapes(api.formatter, call, rid, now(), model, body.n, body.logprobs, texts, include_usage)
        if not body.stream:
            return JSONResponse(shapes.response(await api.runner.collect(call, raw)), headers=call.headers)
        return await api.runner.sse(call, shapes, include_usage, shapes.usage if continuous else None)

    return router
