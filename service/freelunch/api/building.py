"""Validated API requests -> engine requests: checks the schema cannot express, method options
(the server's defaults, prompts inside options), sampling parameters, one engine request per choice."""

from __future__ import annotations

import difflib
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from fastapi import Request
from pydantic import TypeAdapter, ValidationError

from freelunch.api.errors import APIError
from freelunch.api.metrics import Metrics
from freelunch.api.protocol import (
    NO_OP_FIELDS,
    UNSERVED_FIELDS,
    UNSERVED_MESSAGE_FIELDS,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    SamplingFields,
    unknown_fields,
    unserved,
)
from freelunch.api.rate_limit import RateLimited, RateLimiter
from freelunch.api.rendering import PromptRenderer, RenderedPrompt
from freelunch.api.structured import StructuredOutputs
from freelunch.engine.messages import ConstraintSpec, GenerationRequest, SamplingParams
from freelunch.methods import OptionError, fallbacks, method_specs, validate_options
from freelunch.pool.pool import WorkerPool

log = logging.getLogger("freelunch.api")

# options a request asked for that decode as plain decoding (a method's `fallback`: methods/spec.py)
FALLBACK_HEADER = "x-freelunch-fallback"
# request fields accepted and ignored under --ignore-unknown-fields (percent-encoded)
IGNORED_HEADER = "x-freelunch-ignored-fields"
MAX_FIELD_NAME = 64  # characters of a client's field name that errors, headers and logs repeat


def shown(name: str) -> str:
    """A client's field name as errors and logs may repeat it: cut, control characters escaped
    (a name holding a newline must not forge a log line)."""
    return json.dumps(name[:MAX_FIELD_NAME], ensure_ascii=True)[1:-1]


def unknown_field_message(name: str, endpoint: type[SamplingFields]) -> str:
    """OpenAI's wording, with the endpoint that serves the field, or the nearest field we know."""
    chat = issubclass(endpoint, ChatCompletionRequest)
    other, other_path = (CompletionRequest, "/v1/completions") if chat else (ChatCompletionRequest, "/v1/chat/completions")
    if name in other.model_fields:
        return f"`{shown(name)}` is not a field of this endpoint: it is served on {other_path}"
    known = [*endpoint.model_fields, *NO_OP_FIELDS]
    near = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
    hint = f" (did you mean `{near[0]}`?)" if near else ""
    return (
        f"Unrecognized request argument supplied: {shown(name)}{hint}. A server started with "
        "--ignore-unknown-fields accepts such fields and names them in the x-freelunch-ignored-fields header"
    )


@dataclass(slots=True)
class Call:
    """One admitted API request: its engine requests (one per choice), deadline, response headers."""

    requests: list[GenerationRequest]
    timeout: float
    deadline: float
    headers: dict[str, str]
    prompt_tokens: int  # all prompts' tokens, counted once per choice (OpenAI's usage)


def client_of(raw: Request) -> str:
    """Who sent the request, for rate limits and fair shares: its API key's id, else its address."""
    return raw.scope.get("state", {}).get("api_key_id") or f"addr-{raw.client.host if raw.client else 'unknown'}"


def first_invalid_text(value: Any, path: str) -> str | None:
    """The path of the first string (or key) in `value` that is not valid Unicode: JSON lets a
    request carry a lone surrogate (`"\\ud800"`), which no tokenizer, encoder or response takes."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            bad = first_invalid_text(key, where) or first_invalid_text(item, where)
            if bad is not None:
                return bad
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            bad = first_invalid_text(item, f"{path}.{i}" if path else str(i))
            if bad is not None:
                return bad
    return None


class RequestBuilder:
    def __init__(
        self,
        pool: WorkerPool,
        renderer: PromptRenderer,
        metrics: Metrics,
        default_methods: dict[str, dict],
        limiter: RateLimiter,
        timeout: float,
        max_tokens_per_request: int = 65536,
        auto_tool_choice: bool = True,
        ignore_unknown_fields: bool = False,
        grammar_compile_timeout: float = 5.0,
    ) -> None:
        self.pool = pool
        self.ignore_unknown_fields = ignore_unknown_fields
        self.max_tokens_per_request = max_tokens_per_request
        self.structured = StructuredOutputs(
            pool.served.tokenizer, pool.served.vocab_size, metrics, auto_tool_choice, grammar_compile_timeout
        )
        self.metrics = metrics
        self.renderer = renderer
        self.default_methods = default_methods
        self.limiter = limiter
        self.request_timeout = timeout
        self.specs = method_specs()

    # ---- checks the schema cannot express ------------------------------------------------
    def check(self, req: SamplingFields, messages: list[ChatMessage] | None = None) -> str:
        """Every check a request passes before any work: room to run it (a burst's 429s cost no
        tokenising), valid Unicode everywhere, no field the server does not serve, stream options
        that apply, a served model. Returns the model id."""
        if self.pool.would_refuse(req.n):
            self.metrics.request_failure.labels(reason="overloaded").inc()
            raise APIError(
                429, f"the server is at capacity ({self.pool.in_flight} generations in flight); retry shortly",
                None, "server_overloaded", {"Retry-After": "1"},
            )
        bad = first_invalid_text(req.model_dump(), "")
        if bad is not None:
            raise APIError(400, f"{bad}: the text is not valid Unicode (a lone surrogate)", bad, "invalid_value")
        name = unserved(req.model_extra, UNSERVED_FIELDS)
        if name is not None:
            raise APIError(400, f"`{name}` is not supported by this server", name, "unsupported_parameter")
        for i, m in enumerate(messages or []):
            name = unserved(m.model_extra, UNSERVED_MESSAGE_FIELDS)
            if name is not None:
                raise APIError(400, f"`{name}` in messages is not supported by this server", f"messages.{i}.{name}", "unsupported_parameter")
        unknown = unknown_fields(req)
        if unknown and not self.ignore_unknown_fields:
            raise APIError(400, unknown_field_message(unknown[0], type(req)), unknown[0][:MAX_FIELD_NAME], "unknown_parameter")
        if unknown:
            log.info("ignored unknown request fields: %s", ", ".join(shown(k) for k in unknown[:16]))
        self.stream_flags(req)
        return self.check_model(req.model)

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

    # ---- method options --------------------------------------------------------------------
    async def methods(self, req: SamplingFields) -> dict[str, dict[str, Any]]:
        """The request's method options (with a chat request's top-level aliases) over the
        server's defaults; an option that says "off" (its spec's `off`) opts
        out of its default. Prompts inside options become token ids."""
        own = req.method_options()
        for name, aliases in getattr(req, "method_aliases", {}).items():
            for alias in aliases:
                value = getattr(req, alias, None)
                if value is not None:
                    own.setdefault(name, {})[alias] = value
        # the server's defaults compose with the request's own options; an option the request
        # sets replaces that option's default, and one that says "off" removes it
        merged = {name: dict(opts) for name, opts in self.default_methods.items()} | own
        methods = {name: opts for name, opts in merged.items() if not self.specs[name].off(opts)}
        for name, opts in methods.items():
            try:
                validate_options(name, opts)  # again: aliases and defaults joined in
            except OptionError as e:
                raise APIError(400, str(e), e.param) from None
            for field_name, prompt in self.specs[name].prompts.items():
                value = opts.pop(field_name, None)
                if value is not None:
                    opts[prompt.ids] = await self._prompt_ids(value, prompt.kind, f"{name}.{field_name}")
        return methods

    async def _prompt_ids(self, value: Any, kind: str, param: str) -> list[int]:
        """A prompt inside a method option: text tokenised like a completions prompt, or chat
        messages rendered with a generation prompt. Empty: [] (the method's default)."""
        if kind == "text":
            return await self.renderer.text(value, param) if value else []
        try:
            chat = TypeAdapter(list[ChatMessage]).validate_python(value)
        except ValidationError as e:
            raise APIError(400, f"{param} must be a list of chat messages: {e.errors()[0]['msg']}", param) from e
        for i, m in enumerate(chat):
            name = unserved(m.model_extra, UNSERVED_MESSAGE_FIELDS)
            if name is not None:
                raise APIError(400, f"`{name}` in {param} is not supported by this server", f"{param}.{i}.{name}")
        return (await self.renderer.chat(chat, param, allow_images=False)).token_ids if chat else []

    # ---- constraints -------------------------------------------------------------------------------
    async def constraint(self, req: SamplingFields, raw: Request) -> tuple[ConstraintSpec | None, dict[int, float] | None]:
        """The request's structured output (response_format, structured_outputs or tools), compiled
        once here to refuse it before any decoding, and its logit bias."""
        spec, param = self.structured.spec(req)
        if spec is not None:
            if req.ignore_eos or req.min_tokens:
                bad = "ignore_eos" if req.ignore_eos else "min_tokens"
                raise APIError(400, f"{bad} cannot be combined with {param}: the output ends where its grammar does", bad)
            await self.structured.check(spec, param, client_of(raw))
        return spec, self.structured.logit_bias(req)

    # ---- prompts -----------------------------------------------------------------------------
    async def chat_prompt(self, req: ChatCompletionRequest) -> RenderedPrompt:
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools and req.tool_choice != "none" else None
        return await self.renderer.chat(
            req.messages, "messages", req.add_generation_prompt, req.continue_final_message, tools=tools
        )

    async def completion_prompts(self, prompt: str | list) -> list[RenderedPrompt]:
        if isinstance(prompt, str):
            return [RenderedPrompt(await self.renderer.text(prompt, "prompt"))]
        if not prompt:
            raise APIError(400, "prompt must not be empty", "prompt")
        if all(isinstance(x, str) for x in prompt):
            self.renderer.check_length(sum(len(x) for x in prompt), "prompt")
            return [RenderedPrompt(await self.renderer.text(x, "prompt")) for x in prompt]
        if all(isinstance(x, int) for x in prompt):
            return [RenderedPrompt(list(prompt))]
        return [RenderedPrompt(list(x)) for x in prompt]

    # ---- sampling and engine requests ---------------------------------------------------------
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
                400, f"the prompt has {prompt_len} tokens; this model's maximum context length is {limit}", prompt_param,
                "context_length_exceeded",
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

    def call(
        self,
        raw: Request,
        req: SamplingFields,
        base_id: str,
        prompts: list[RenderedPrompt],
        params: list[SamplingParams],
        methods: dict[str, dict[str, Any]],
        model: str,
        prompt_tokens: int,
        constraint: tuple[ConstraintSpec | None, dict[int, float] | None] = (None, None),
    ) -> Call:
        """One engine request per choice, the caller's rate limit applied, the deadline fixed;
        `prompt_tokens` as usage reports them. Admission to the pool happens when the generation
        starts (generation.py)."""
        n = req.n
        requests = []
        # the caller's API key (its id), whatever the body says: per-tenant state (draft tables) is keyed by it
        tenant = raw.scope.get("state", {}).get("api_key_id")
        vocab = self.pool.served.vocab_size
        for p_idx, (prompt, sp) in enumerate(zip(prompts, params)):
            if any(not 0 <= t < vocab for t in prompt.token_ids):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
            for j in range(n):
                choice_params = SamplingParams(**{f: getattr(sp, f) for f in SamplingParams.__slots__})
                if sp.seed is not None:
                    choice_params.seed = sp.seed + j  # each choice its own, reproducible stream
                rid = f"{base_id}-{p_idx * n + j}"
                requests.append(
                    GenerationRequest(
                        rid,
                        list(prompt.token_ids),
                        choice_params,
                        methods,
                        model=model,
                        images=prompt.images,
                        tenant=tenant,
                        constraint=constraint[0],
                        logit_bias=constraint[1],
                    )
                )
        asked = sum(r.params.max_tokens for r in requests)
        if asked > self.max_tokens_per_request:
            raise APIError(
                400,
                f"the request asks for up to {asked} generated tokens (n x max_tokens over its prompts); this server "
                f"allows {self.max_tokens_per_request} per request: lower n or max_tokens",
                "max_tokens",
                "request_too_large",
            )
        missing = self.pool.unsupported(requests[0]) if requests else None
        if missing is not None:
            backends = sorted({w.served.backend for w in self.pool.workers if w.served is not None})
            names = {"images": ("image inputs are", "messages"), "constraint": ("a structured output is", "response_format")}
            what, param = names.get(missing, (f"`{missing.replace('+', '` with `')}` is", missing.split("+")[0]))
            raise APIError(
                400,
                f"{what} not available on this server's {' and '.join(backends)} engine; "
                "with --engine vllm, start native workers for it with --native-workers N",
                param,
            )
        headers: dict[str, str] = {}
        if self.limiter.enabled:
            bucket = client_of(raw)
            tokens = sum(len(r.prompt_token_ids) + r.params.max_tokens for r in requests)
            try:
                headers = self.limiter.acquire(bucket, tokens)
            except RateLimited as e:
                self.metrics.request_failure.labels(reason="rate_limited").inc()
                raise APIError(429, str(e), None, "rate_limit_exceeded", e.headers) from e
            except ValueError as e:
                raise APIError(400, str(e), "max_tokens", "request_too_large") from e
        ignored = unknown_fields(req)
        if ignored:  # only with --ignore-unknown-fields: check() refused them otherwise
            headers = {**headers, IGNORED_HEADER: ", ".join(quote(k[:MAX_FIELD_NAME], safe="_-.") for k in ignored[:16])}
        fallen_back = fallbacks(requests[0]) if requests else {}
        if fallen_back:  # also in usage.method_stats; a header reaches clients that read no usage
            headers = {**headers, FALLBACK_HEADER: "; ".join(f"{name}: {why}" for name, why in fallen_back.items())}
        timeout = min(self.request_timeout, req.timeout or math.inf)
        return Call(requests, timeout, time.monotonic() + timeout, headers, prompt_tokens)
