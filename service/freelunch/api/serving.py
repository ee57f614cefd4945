"""Turn validated API requests into engine requests, and engine outputs into OpenAI responses."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import TypeAdapter, ValidationError

from freelunch.api.errors import APIError, error_body
from freelunch.api.images import MAX_IMAGES_PER_REQUEST, ImageLoader, VisionPrompts
from freelunch.api.metrics import Metrics
from freelunch.api.protocol import (
    UNSERVED_FIELDS,
    UNSERVED_MESSAGE_FIELDS,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ImagePart,
    SamplingFields,
    TextPart,
    unserved,
)
from freelunch.api.rate_limit import RateLimited, RateLimiter
from freelunch.config import ServerConfig
from freelunch.engine.engine import EngineError
from freelunch.engine.request import GenerationRequest, ImageInput, RequestOutput, SamplingParams, TokenLogprob
from freelunch.methods import fallbacks
from freelunch.pool.pool import PoolOverloaded, PoolUnavailable, WorkerPool
from freelunch.pool.worker import WorkerDied

log = logging.getLogger("freelunch.api")

FINISH_REASONS = ("stop", "length", "abort", "error")
# options a request asked for that decode as plain decoding (e.g. Token Recycling under sampling)
FALLBACK_HEADER = "x-freelunch-fallback"


class ChatPrompt(list):
    """A rendered chat prompt's token ids, with the images its placeholder tokens stand for: a list,
    so that the route hands it on like any prompt, and `engine_requests` finds the images on it."""

    def __init__(self, token_ids: list[int], images: list[ImageInput]) -> None:
        super().__init__(token_ids)
        self.images = images


@dataclass(slots=True)
class ChoiceState:
    """Accumulated output of one choice."""

    index: int
    prompt_tokens: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None
    output_tokens: int = 0
    method_stats: dict[str, Any] | None = None
    first_token_at: float | None = None


@dataclass(slots=True)
class Call:
    """One admitted API request: its engine requests (one per choice), deadline, response headers."""

    requests: list[GenerationRequest]
    timeout: float
    deadline: float
    headers: dict[str, str]


async def get_within(queue: asyncio.Queue, timeout: float) -> Any:
    """`queue.get()` that raises TimeoutError after `timeout` seconds. Not `asyncio.wait_for`: before
    Python 3.12 it swallows a cancellation that lands in the tick an item arrives (cpython#86296),
    so a client that left mid-stream would not stop its generation."""
    getter = asyncio.ensure_future(queue.get())
    try:
        done, _ = await asyncio.wait({getter}, timeout=max(0.0, timeout))
    finally:
        getter.cancel()  # no-op once it has its item
    if not done:
        raise TimeoutError
    return getter.result()


class Serving:
    def __init__(
        self,
        pool: WorkerPool,
        metrics: Metrics,
        default_methods: dict[str, dict] | None = None,
        server: ServerConfig | None = None,
    ) -> None:
        self.pool = pool
        self.metrics = metrics
        self.tokenizer = pool.served.tokenizer
        self.default_methods = default_methods or {}
        self.server = server or ServerConfig()
        self.limiter = RateLimiter(self.server.rate_limit_rpm, self.server.rate_limit_tpm)
        self.vision = VisionPrompts.for_tokenizer(self.tokenizer)  # None: the model takes no images
        self.images = ImageLoader(self.server.allowed_image_hosts, self.server.image_fetch_timeout)

    def methods_for(self, req: SamplingFields, raw: Request) -> dict[str, dict]:
        """The request's own method options, or else the server's defaults (a request that asks for
        a method of its own does not also get the defaults: one method runs per request);
        `{"method": "none"}` opts out of a default. Speculative tables are scoped to the caller's
        API key, whatever the body says."""
        own = req.method_options()
        methods = {name: opts for name, opts in own.items() if opts.get("method") != "none"}
        if not methods:
            methods = {name: dict(opts) for name, opts in self.default_methods.items() if name not in own}
        if isinstance(methods.get("speculative"), dict):
            methods["speculative"] = {**methods["speculative"], "scope": raw.scope.get("state", {}).get("api_key_id")}
        return methods

    # ---- request building ----------------------------------------------------------------
    def check_fields(self, req: SamplingFields, messages: list[ChatMessage] | None = None, param: str = "messages") -> None:
        """A 400 for a field that would change the output and that this server does not serve;
        one log line for the others it ignores."""
        name = unserved(req.model_extra, UNSERVED_FIELDS)
        if name is not None:
            raise APIError(400, f"`{name}` is not supported by this server", name, "unsupported_parameter")
        for i, m in enumerate(messages or []):
            name = unserved(m.model_extra, UNSERVED_MESSAGE_FIELDS)
            if name is not None:
                raise APIError(400, f"`{name}` in messages is not supported by this server", f"{param}.{i}.{name}", "unsupported_parameter")
        ignored = sorted(k for k, v in (req.model_extra or {}).items() if v is not None)
        if ignored:
            log.info("ignored request fields (they change nothing here): %s", ", ".join(ignored)[:200])

    @staticmethod
    def stream_flags(req: SamplingFields) -> tuple[bool, bool]:
        """(include_usage, continuous_usage_stats), refused where they cannot apply."""
        opts = req.stream_options
        if opts is None:
            return False, False
        if not req.stream:
            raise APIError(400, "stream_options is only allowed with stream: true", "stream_options")
        if opts.continuous_usage_stats and not opts.include_usage:
            raise APIError(
                400, "stream_options.continuous_usage_stats needs include_usage: true", "stream_options.continuous_usage_stats"
            )
        return opts.include_usage, opts.continuous_usage_stats

    def check_model(self, model: str | None) -> str:
        served = self.pool.served.name
        if model is not None and model not in self.pool.models():
            raise APIError(404, f"the model `{model}` does not exist; this server serves `{served}`", "model", "model_not_found")
        return model or served

    async def render_chat(self, req: ChatCompletionRequest) -> ChatPrompt:
        """The request's messages as token ids, image placeholders expanded: images are fetched
        and decoded, and the processor runs, off the event loop."""
        param = "messages"
        messages, refs = self._chat_messages(req.messages, param, True)
        images = await self.images.load_all(refs)
        text = self._chat_text(
            messages, req.add_generation_prompt and not req.continue_final_message, req.continue_final_message, param
        )
        if self.vision is not None and images:
            return ChatPrompt(*await anyio.to_thread.run_sync(self.vision.encode, text, images, param))
        return self._encode_chat(text, param)

    def chat_ids(
        self,
        chat: list[ChatMessage],
        add_generation_prompt: bool,
        continue_final_message: bool,
        param: str,
    ) -> ChatPrompt:
        """Messages without images rendered with the model's chat template, as token ids (image
        parts are refused here: requests with images go through `render_chat`)."""
        messages, _ = self._chat_messages(chat, param, False)
        return self._encode_chat(self._chat_text(messages, add_generation_prompt, continue_final_message, param), param)

    def _chat_messages(
        self, chat: list[ChatMessage], param: str, allow_images: bool
    ) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
        """The messages as chat templates take them, and each image's (url, param), checked
        (count, scheme, host) but not loaded."""
        messages = []
        refs: list[tuple[str, str]] = []
        for i, m in enumerate(chat):
            if isinstance(m.content, list):
                content = self._chat_content(m.content, param, f"{param}.{i}.content", refs, allow_images)
            else:
                content = m.content or ""
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": content})
        return messages, refs

    def _chat_text(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool, continue_final_message: bool, param: str
    ) -> str:
        template = (self.vision and self.vision.chat_template) or getattr(self.tokenizer, "chat_template", None)
        if template is None:
            raise APIError(400, "this model has no chat template; use /v1/completions", param)
        try:
            text = self.tokenizer.apply_chat_template(
                messages,
                chat_template=template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
            )
        except Exception as e:  # template errors are the request's fault (e.g. role order)
            raise APIError(400, f"the chat template rejected these messages: {e}", param) from e
        return text

    def _encode_chat(self, text: str, param: str) -> ChatPrompt:
        """Rendered chat text without images -> token ids (a vision model's processor checks that
        the text holds no image placeholders)."""
        if self.vision is None:
            return ChatPrompt(self.tokenizer.encode(text, add_special_tokens=False), [])
        return ChatPrompt(*self.vision.encode(text, [], param))

    def _chat_content(
        self, parts: list[TextPart | ImagePart], param: str, parts_param: str, refs: list[tuple[str, str]], allow_images: bool
    ) -> str | list[dict[str, str]]:
        """Text parts joined; with images, the content list chat templates take ({"type": "image"}
        where each image goes), each image's (url, param) appended to `refs` once checked."""
        if not any(p.type == "image_url" for p in parts):
            return "".join(p.text for p in parts)
        if self.vision is None:
            raise APIError(400, f"the model `{self.pool.served.name}` does not accept images", param)
        if not allow_images:
            raise APIError(400, f"{param} cannot hold images", parts_param)
        content: list[dict[str, str]] = []
        for j, p in enumerate(parts):
            if p.type == "text":
                content.append({"type": "text", "text": p.text})
                continue
            if len(refs) == MAX_IMAGES_PER_REQUEST:
                raise APIError(400, f"at most {MAX_IMAGES_PER_REQUEST} images per request", f"{parts_param}.{j}")
            url_param = f"{parts_param}.{j}.image_url.url"
            self.images.check(p.image_url.url, url_param)
            refs.append((p.image_url.url, url_param))
            content.append({"type": "image"})
        return content

    def resolve_guidance(self, methods: dict[str, dict]) -> None:
        """Turn `guidance.negative_prompt` (text, tokenised like a completions prompt) or
        `guidance.negative_messages` (chat, rendered with add_generation_prompt) into the
        `guidance.negative_prompt_ids` the engine takes. Empty = the default unconditional prompt."""
        opts = methods.get("guidance")
        if opts is None:
            return
        text = opts.pop("negative_prompt", None)
        chat = opts.pop("negative_messages", None)
        given = [name for name, v in (("negative_prompt", text), ("negative_messages", chat)) if v is not None]
        if "negative_prompt_ids" in opts:
            given.append("negative_prompt_ids")
        if len(given) > 1:
            raise APIError(400, f"give only one of guidance.{', guidance.'.join(given)}", f"guidance.{given[1]}")
        if text is not None:
            if not isinstance(text, str):
                raise APIError(400, "guidance.negative_prompt must be a string or null", "guidance.negative_prompt")
            if text:
                opts["negative_prompt_ids"] = self.tokenizer.encode(text)
        elif chat is not None:
            param = "guidance.negative_messages"
            try:
                parsed = TypeAdapter(list[ChatMessage]).validate_python(chat)
            except ValidationError as e:
                raise APIError(400, f"{param} must be a list of chat messages: {e.errors()[0]['msg']}", param) from e
            for i, m in enumerate(parsed):
                name = unserved(m.model_extra, UNSERVED_MESSAGE_FIELDS)
                if name is not None:
                    raise APIError(400, f"`{name}` in {param} is not supported by this server", f"{param}.{i}.{name}")
            if parsed:
                opts["negative_prompt_ids"] = list(self.chat_ids(parsed, True, False, param))

    def completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        p = req.prompt
        if isinstance(p, str):
            return [self.tokenizer.encode(p)]
        if not p:
            raise APIError(400, "prompt must not be empty", "prompt")
        if all(isinstance(x, str) for x in p):
            return [self.tokenizer.encode(x) for x in p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return [list(x) for x in p]

    def sampling_params(
        self,
        req: SamplingFields,
        max_tokens: int | None,
        prompt_len: int,
        logprobs: int | None,
        prompt_logprobs: int | None,
        prompt_param: str,
    ) -> SamplingParams:
        limit = self.pool.served.max_model_len
        if prompt_len >= limit:
            raise APIError(
                400, f"the prompt has {prompt_len} tokens; this model's maximum context length is {limit}", prompt_param
            )
        if max_tokens is None:
            max_tokens = limit - prompt_len
        elif prompt_len + max_tokens > limit:
            raise APIError(
                400,
                f"max_tokens ({max_tokens}) + prompt ({prompt_len} tokens) exceeds the maximum context length {limit}",
                "max_tokens",
            )
        if req.min_tokens > max_tokens:
            raise APIError(400, "min_tokens must not exceed max_tokens", "min_tokens")
        vocab = self.pool.served.vocab_size
        if req.stop_token_ids and any(not 0 <= t < vocab for t in req.stop_token_ids):
            raise APIError(400, f"stop_token_ids must be in [0, {vocab})", "stop_token_ids")
        return SamplingParams(
            max_tokens=max_tokens,
            min_tokens=req.min_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=max(0, req.top_k),
            min_p=req.min_p,
            seed=req.seed,
            stop=list(req.stop or []),
            stop_token_ids=list(req.stop_token_ids or []),
            ignore_eos=req.ignore_eos,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            include_stop_str_in_output=req.include_stop_str_in_output,
        )

    def engine_requests(
        self, base_id: str, prompts: list[list[int]], params: list[SamplingParams], n: int, methods: dict, model: str
    ) -> list[GenerationRequest]:
        out = []
        for p_idx, (prompt, sp) in enumerate(zip(prompts, params)):
            images = prompt.images if isinstance(prompt, ChatPrompt) else []
            for j in range(n):
                choice_params = SamplingParams(**{f: getattr(sp, f) for f in SamplingParams.__slots__})
                if sp.seed is not None:
                    choice_params.seed = sp.seed + j  # each choice its own, reproducible stream
                rid = f"{base_id}-{p_idx * n + j}"
                out.append(GenerationRequest(rid, list(prompt), choice_params, methods, model=model, images=images))
        missing = self.pool.unsupported(out[0]) if out else None
        if missing is not None:
            backends = sorted({w.served.backend for w in self.pool.workers if w.served is not None})
            what = "image inputs are" if missing == "images" else f"`{missing}` is"
            raise APIError(
                400,
                f"{what} not available on this server's {' and '.join(backends)} engine; "
                "with --engine vllm, start native workers for it with --native-workers N",
                "messages" if missing == "images" else missing,
            )
        return out

    # ---- running -------------------------------------------------------------------------
    def start_call(self, raw: Request, req: SamplingFields, requests: list[GenerationRequest]) -> Call:
        """Apply the caller's rate limit and fix the deadline. Admission to the pool happens when
        the generation starts (`stream_choices`)."""
        headers: dict[str, str] = {}
        if self.limiter.enabled:
            state = raw.scope.get("state", {})
            bucket = state.get("api_key_id") or f"addr-{raw.client.host if raw.client else 'unknown'}"
            tokens = sum(len(r.prompt_token_ids) + r.params.max_tokens for r in requests)
            try:
                headers = self.limiter.acquire(bucket, tokens)
            except RateLimited as e:
                self.metrics.request_failure.labels(reason="rate_limited").inc()
                raise APIError(429, str(e), None, "rate_limit_exceeded", e.headers) from e
            except ValueError as e:
                raise APIError(400, str(e), "max_tokens", "request_too_large") from e
        fallen_back = fallbacks(requests[0]) if requests else {}
        if fallen_back:  # also in usage.method_stats; a header reaches clients that read no usage
            headers = {**headers, FALLBACK_HEADER: "; ".join(f"{name}: {why}" for name, why in fallen_back.items())}
        timeout = min(self.server.request_timeout, req.timeout or math.inf)
        return Call(requests, timeout, time.monotonic() + timeout, headers)

    def _admit(self, count: int) -> None:
        try:
            self.pool.admit(count)
        except PoolOverloaded as e:
            self.metrics.request_failure.labels(reason="overloaded").inc()
            raise APIError(429, str(e), None, "server_overloaded", {"Retry-After": "1"}) from e
        except PoolUnavailable as e:
            raise APIError(503, str(e), None, "unavailable", {"Retry-After": "5"}) from e
        except ValueError as e:
            raise APIError(400, str(e), "n") from e

    async def stream_choices(self, call: Call) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Merge the choices' output streams; leaving early (client gone, timeout, error) aborts
        every choice still running."""
        requests = call.requests
        self._admit(len(requests))
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, request: GenerationRequest) -> None:
            try:
                async for out in self.pool.generate(request):
                    await queue.put((index, out))
            except Exception as e:
                await queue.put((index, e))

        tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
        remaining = len(requests)
        try:
            while remaining:
                try:
                    index, item = await get_within(queue, call.deadline - time.monotonic())
                except TimeoutError:
                    self.metrics.request_failure.labels(reason="timeout").inc()
                    raise APIError(
                        408, f"the request did not finish within {call.timeout:g} s", "timeout", "request_timeout"
                    ) from None
                if isinstance(item, Exception):
                    raise item
                if item.finished:
                    remaining -= 1
                yield index, item
        finally:
            # Release first: this may run under a cancelled scope (client gone), where every await raises.
            self.pool.release(len(requests))
            for t in tasks:
                t.cancel()  # each pump's exit aborts its generation on the worker
            await asyncio.gather(*tasks, return_exceptions=True)

    def _record(self, choice: ChoiceState, out: RequestOutput, started: float) -> None:
        if out.new_token_ids and choice.first_token_at is None:
            choice.first_token_at = time.monotonic()
        choice.text += out.new_text
        choice.token_ids.extend(out.new_token_ids)
        if out.logprobs:
            choice.logprobs.extend(out.logprobs)
        if out.prompt_logprobs is not None:
            choice.prompt_logprobs = out.prompt_logprobs
        choice.output_tokens = out.num_output_tokens
        if out.finished:
            # "abort" and "error" say so: a cut or failed choice is never passed off as `length`
            choice.finish_reason = out.finish_reason if out.finish_reason in FINISH_REASONS else "error"
            choice.method_stats = out.method_stats
            ttft = None if choice.first_token_at is None else choice.first_token_at - started
            self.metrics.observe_finished(
                choice.finish_reason,
                choice.prompt_tokens,
                choice.output_tokens,
                ttft,
                time.monotonic() - started,
                out.method_stats,
            )

    async def collect(self, call: Call, raw: Request) -> list[ChoiceState]:
        """Run to completion; a client that disconnects cancels the generation."""
        started = time.monotonic()
        choices = [ChoiceState(i, len(r.prompt_token_ids)) for i, r in enumerate(call.requests)]

        async def run() -> None:
            async for index, out in self.stream_choices(call):
                self._record(choices[index], out, started)

        async def client_gone() -> None:
            # Wait on the ASGI channel itself (as Starlette's streaming responses do): the body is
            # read, so the next message is the disconnect. Polling `is_disconnected()` missed some.
            while (await raw.receive())["type"] != "http.disconnect":
                pass

        task = asyncio.create_task(run())
        watcher = asyncio.create_task(client_gone())
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not task.done():  # the client left (or this handler was cancelled): stop generating
                task.cancel()
        if task.cancelled() or not task.done():
            await asyncio.gather(task, return_exceptions=True)
            raise APIError(499, "client disconnected")
        exc = task.exception()
        if exc is not None:
            raise self._as_api_error(exc)
        return choices

    def _as_api_error(self, e: BaseException) -> APIError:
        if isinstance(e, APIError):
            return e
        if isinstance(e, EngineError):
            return APIError(400, str(e), e.param)
        if isinstance(e, WorkerDied):
            self.metrics.request_failure.labels(reason="worker_died").inc()
            return APIError(503, str(e), None, "worker_died", {"Retry-After": "5"})
        self.metrics.request_failure.labels(reason="engine").inc()
        return APIError(500, str(e) or "engine error", None, "engine_error")

    async def sse(self, call: Call, render, final_usage, include_usage: bool, usage_of=None) -> StreamingResponse | JSONResponse:
        """Stream rendered chunks as SSE. The first output is awaited first, so that a request the
        engine refuses still gets a proper JSON error status instead of a broken stream.
        `usage_of(choices)`, when given, puts the usage so far in every chunk (continuous usage)."""
        started = time.monotonic()
        choices = [ChoiceState(i, len(r.prompt_token_ids)) for i, r in enumerate(call.requests)]
        it = self.stream_choices(call).__aiter__()
        try:
            first = await it.__anext__()
        except StopAsyncIteration:
            first = None
        except Exception as e:
            err = self._as_api_error(e)
            headers = {**call.headers, **(err.headers or {})}
            return JSONResponse(
                error_body(err.status, err.message, err.param, err.code), status_code=err.status, headers=headers
            )

        async def events() -> AsyncIterator[str]:
            try:
                item = first
                while item is not None:
                    index, out = item
                    self._record(choices[index], out, started)
                    for chunk in render(choices[index], out):
                        if usage_of is not None:
                            chunk["usage"] = usage_of(choices)
                        yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
                    try:
                        item = await it.__anext__()
                    except StopAsyncIteration:
                        item = None
                if include_usage:
                    yield f"data: {json.dumps(final_usage(choices), ensure_ascii=False)}\n\n"
                yield "data: [DONE]\n\n"
            except Exception as e:  # mid-stream failure: tell the client in-band, then end
                err = self._as_api_error(e)
                yield f"data: {json.dumps(error_body(err.status, err.message, err.param, err.code))}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                # Starlette cancels this generator when the client disconnects; shielded, the cleanup
                # (abort on the worker, admission released) still runs instead of being cancelled too.
                with anyio.CancelScope(shield=True):
                    await it.aclose()

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", **call.headers}
        )

    # ---- shapes --------------------------------------------------------------------------
    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def chat_logprobs(self, records: list[TokenLogprob]) -> dict:
        def entry(tid: int, lp: float) -> dict:
            s = self.token_text(tid)
            return {"token": s, "logprob": max(lp, -9999.0), "bytes": list(s.encode("utf-8"))}

        return {"content": [{**entry(r.token_id, r.logprob), "top_logprobs": [entry(t, lp) for t, lp in r.top]} for r in records]}

    def completion_logprobs(self, records: list[TokenLogprob], offset: int) -> dict:
        tokens, token_lps, tops, offsets = [], [], [], []
        for r in records:
            s = self.token_text(r.token_id)
            tokens.append(s)
            unscored = r.logprob != r.logprob  # NaN: the first prompt token has no context to score it
            token_lps.append(None if unscored else max(r.logprob, -9999.0))
            tops.append(None if unscored else {self.token_text(t): max(lp, -9999.0) for t, lp in r.top})
            offsets.append(offset)
            offset += len(s)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    @staticmethod
    def usage(choices: list[ChoiceState], prompt_tokens: int) -> dict:
        completion = sum(c.output_tokens for c in choices)
        usage: dict[str, Any] = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        }
        # counts add up over choices; means are averaged
        stats: dict[str, dict[str, Any]] = {}
        per_method: dict[str, int] = {}
        for c in choices:
            for method, values in (c.method_stats or {}).items():
                agg = stats.setdefault(method, {})
                per_method[method] = per_method.get(method, 0) + 1
                for k, v in values.items():
                    additive = isinstance(v, (int, float)) and not isinstance(v, bool) and not _is_setting(k)
                    agg[k] = agg.get(k, 0) + v if additive else agg.get(k, v)
        for method, agg in stats.items():
            for k in agg:
                if k.startswith("mean_"):
                    agg[k] /= per_method[method]
        if stats:
            usage["method_stats"] = stats
        return usage


def _is_setting(key: str) -> bool:
    """Stats that describe a setting (e.g. guidance scale) or a mean are not summed over choices."""
    return not (key.endswith(("_tokens", "_rows", "steps")) or key.startswith("mean_"))

