"""HTTP routes: thin handlers over `Serving`."""

from __future__ import annotations

import math
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from freelunch.api.errors import APIError, error_response
from freelunch.api.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, new_id, now
from freelunch.api.serving import ChoiceState, Serving
from freelunch.engine.request import RequestOutput, TokenLogprob


def get_serving(request: Request) -> Serving:
    return request.app.state.serving


ServingDep = Annotated[Serving, Depends(get_serving)]

router = APIRouter()


def envelope(rid: str, obj: str, created: int, model: str, choices: list[dict], **extra: Any) -> dict:
    """The fields every completion response and stream chunk carries."""
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": choices, **extra}


@router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready")
async def ready(serving: ServingDep) -> Response:
    """200 while any worker serves ("degraded" if some are restarting); 503 when none does or
    the server is draining, so that a load balancer sends traffic elsewhere."""
    pool = serving.pool
    workers = [
        {"name": w.name, "alive": w.alive, "in_flight": w.in_flight, "restarts": w.restarts}
        for w in pool.worker_states()
    ]
    if not pool.ready:
        reason = "the server is shutting down" if pool.draining else "no engine worker is ready"
        return JSONResponse({"status": "unavailable", "reason": reason, "workers": workers}, status_code=503)
    status = "degraded" if pool.degraded else "ready"
    return JSONResponse({"status": status, "model": pool.served.name, "workers": workers})


@router.get("/metrics")
async def metrics(serving: ServingDep) -> Response:
    return PlainTextResponse(generate_latest(serving.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models")
async def list_models(serving: ServingDep) -> ModelList:
    return ModelList(
        data=[ModelCard(id=m, max_model_len=serving.pool.served.max_model_len) for m in serving.pool.models()]
    )


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, serving: ServingDep) -> ModelCard:
    if model_id not in serving.pool.models():
        raise APIError(404, f"The model `{model_id}` does not exist", "model", "model_not_found")
    return ModelCard(id=model_id, max_model_len=serving.pool.served.max_model_len)


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, raw: Request, serving: ServingDep) -> Response:
    serving.check_fields(body, body.messages)
    include_usage, continuous = serving.stream_flags(body)
    model = serving.check_model(body.model)
    prompt = await serving.render_chat(body)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    top = body.top_logprobs if body.logprobs else None
    if body.top_logprobs is not None and not body.logprobs:
        top = None
    params = serving.sampling_params(
        body, max_tokens, len(prompt), (top or 0) if body.logprobs else None, None, "messages"
    )
    methods = serving.methods_for(body, raw)
    if body.negative_messages is not None:
        methods.setdefault("guidance", {})["negative_messages"] = [
            m.model_dump() for m in body.negative_messages
        ]
    serving.resolve_guidance(methods)
    rid = new_id("chatcmpl")
    call = serving.start_call(raw, body, serving.engine_requests(rid, [prompt], [params], body.n, methods, model))
    created = now()

    def choice_json(c: ChoiceState) -> dict:
        return {
            "index": c.index,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": serving.chat_logprobs(c.logprobs) if body.logprobs else None,
            "finish_reason": c.finish_reason,
        }

    if not body.stream:
        choices = await serving.collect(call, raw)
        return JSONResponse(
            envelope(
                rid,
                "chat.completion",
                created,
                model,
                [choice_json(c) for c in choices],
                usage=Serving.usage(choices, len(prompt)),
            ),
            headers=call.headers,
        )

    sent_role: set[int] = set()

    def chunk(choices: list[dict[str, Any]], usage: dict | None = None) -> dict:
        extra = {"usage": usage} if include_usage else {}
        return envelope(rid, "chat.completion.chunk", created, model, choices, **extra)

    def render(c: ChoiceState, out: RequestOutput) -> list[dict]:
        chunks = []
        if c.index not in sent_role:
            sent_role.add(c.index)
            chunks.append(
                chunk(
                    [
                        {
                            "index": c.index,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ]
                )
            )
        if out.new_text or out.logprobs:
            lp = serving.chat_logprobs(out.logprobs) if body.logprobs and out.logprobs else None
            chunks.append(
                chunk(
                    [
                        {
                            "index": c.index,
                            "delta": {"content": out.new_text},
                            "logprobs": lp,
                            "finish_reason": None,
                        }
                    ]
                )
            )
        if out.finished:
            chunks.append(
                chunk([{"index": c.index, "delta": {}, "logprobs": None, "finish_reason": c.finish_reason}])
            )
        return chunks

    usage_of = lambda cs: Serving.usage(cs, len(prompt))  # noqa: E731
    return await serving.sse(call, render, lambda cs: chunk([], usage_of(cs)), include_usage, usage_of if continuous else None)


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, raw: Request, serving: ServingDep) -> Response:
    serving.check_fields(body)
    include_usage, continuous = serving.stream_flags(body)
    model = serving.check_model(body.model)
    prompts = serving.completion_prompts(body)
    if body.suffix:
        return error_response(400, "suffix is not supported", "suffix")
    if body.best_of is not None and body.best_of != body.n:
        return error_response(400, "best_of is not supported (use n)", "best_of")
    prompt_lp = body.logprobs if body.echo and body.logprobs is not None else None
    max_tokens = body.max_tokens if body.max_tokens is not None else 16
    params = [
        serving.sampling_params(body, max_tokens, len(p), body.logprobs, prompt_lp, "prompt") for p in prompts
    ]
    rid = new_id("cmpl")
    methods = serving.methods_for(body, raw)
    serving.resolve_guidance(methods)
    call = serving.start_call(raw, body, serving.engine_requests(rid, prompts, params, body.n, methods, model))
    requests = call.requests
    created = now()
    prompt_tokens = sum(len(p) for p in prompts) * body.n
    prompt_texts = [serving.tokenizer.decode(p) for p in prompts] if body.echo else None

    def logprobs_json(c: ChoiceState, records: list[TokenLogprob], with_prompt: bool) -> dict | None:
        if body.logprobs is None:
            return None
        prefix: list[TokenLogprob] = []
        offset = 0
        if with_prompt:
            prompt = requests[c.index].prompt_token_ids
            prefix = [TokenLogprob(prompt[0], math.nan, [])] + list((c.prompt_logprobs or [None])[1:])
        elif body.echo:
            offset = len(prompt_texts[c.index // body.n])
        return serving.completion_logprobs(prefix + records, offset)

    if not body.stream:
        choices = await serving.collect(call, raw)
        return JSONResponse(
            envelope(
                rid,
                "text_completion",
                created,
                model,
                [
                    {
                        "index": c.index,
                        "text": (prompt_texts[c.index // body.n] if body.echo else "") + c.text,
                        "logprobs": logprobs_json(c, c.logprobs, body.echo),
                        "finish_reason": c.finish_reason,
                    }
                    for c in choices
                ],
                usage=Serving.usage(choices, prompt_tokens),
            ),
            headers=call.headers,
        )

    echoed: set[int] = set()

    def chunk(choices: list[dict], usage: dict | None = None) -> dict:
        extra = {"usage": usage} if include_usage else {}
        return envelope(rid, "text_completion", created, model, choices, **extra)

    def render(c: ChoiceState, out: RequestOutput) -> list[dict]:
        text = out.new_text
        with_prompt = False
        if body.echo and c.index not in echoed:
            echoed.add(c.index)
            text = prompt_texts[c.index // body.n] + text
            with_prompt = True
        if not text and not out.finished and not out.logprobs:
            return []
        return [
            chunk(
                [
                    {
                        "index": c.index,
                        "text": text,
                        "logprobs": logprobs_json(c, out.logprobs or [], with_prompt),
                        "finish_reason": c.finish_reason if out.finished else None,
                    }
                ]
            )
        ]

    usage_of = lambda cs: Serving.usage(cs, prompt_tokens)  # noqa: E731
    return await serving.sse(call, render, lambda cs: chunk([], usage_of(cs)), include_usage, usage_of if continuous else None)
