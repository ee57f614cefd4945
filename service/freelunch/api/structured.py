"""Structured outputs and tools at the API: `response_format` (OpenAI), `structured_outputs`
(vLLM's names), `tools` / `tool_choice` / `parallel_tool_calls` and `logit_bias` become the
request's constraint (engine/request.py `ConstraintSpec`) and logit bias.

Every constraint is compiled here first, under a time limit and on a small thread pool, so that
a bad schema, an unsupported feature or a grammar that explodes is a 400 naming its parameter
before any decoding, and no request can hang the server with one. Compiled grammars are cached
by spec (LRU), here and in each worker.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import anyio
import xgrammar as xgr
from xgrammar.structural_tag import JSONSchemaFormat, StructuralTag, TagFormat, TagsWithSeparatorFormat

from freelunch.api.errors import APIError
from freelunch.api.protocol import ChatCompletionRequest, SamplingFields
from freelunch.api.protocol import StructuredOutputs as ProtocolStructuredOutputs
from freelunch.constraints.compile_guard import CompileGuard, GrammarTimeout
from freelunch.constraints.grammar import GrammarError, tokenizer_info_json
from freelunch.constraints.json_layout import (
    DEFAULT_MAX_NUMBER_DIGITS,
    DEFAULT_MAX_STRING_LENGTH,
    DEFAULT_WHITESPACE,
    TOOL_WHITESPACE_MAX,
    MAX_SCHEMA_DEPTH,
    any_object_schema,
    bounded_schema,
    external_ref,
    schema_depth,
    string_bound,
)
from freelunch.engine.messages import ConstraintSpec

COMPILE_PROCESSES = 2  # distinct new grammars compiled at once
TOOL_FORMAT = "qwen_3"  # xgrammar's name for the Hermes format: <tool_call>{"name", "arguments"}</tool_call>


def _call_tag(function: dict[str, Any], layout: "JSONLayout") -> TagFormat:
    """One Hermes call of `function`, its arguments following its parameter schema."""
    return TagFormat(
        begin=f'<tool_call>\n{{"name": "{function["name"]}", "arguments": ',
        content=JSONSchemaFormat(json_schema=function["parameters"], max_whitespace_cnt=layout.tool_whitespace),
        end="}\n</tool_call>",
    )


def shown_ref(ref: str) -> str:
    return json.dumps(ref[:80])


@dataclass(frozen=True, slots=True)
class JSONLayout:
    """How a request's JSON may look where its schema does not say (json_layout.py)."""

    whitespace: str = DEFAULT_WHITESPACE
    max_string: int | None = DEFAULT_MAX_STRING_LENGTH
    max_digits: int | None = DEFAULT_MAX_NUMBER_DIGITS

    @classmethod
    def of(cls, so: ProtocolStructuredOutputs | None) -> JSONLayout:
        return cls() if so is None else cls(so.whitespace(), so.max_string_length, so.max_number_digits)

    def schema(self, schema: dict[str, Any], param: str) -> ConstraintSpec:
        bounded = json.dumps(self.bound(schema, param))
        return ConstraintSpec("json_schema", bounded, self.whitespace, string_bound(schema, self.max_string))

    def bound(self, schema: dict[str, Any], param: str) -> dict[str, Any]:
        """`schema` checked (nesting, references) with its free numbers bounded; strings are
        bounded on the output (`ConstraintSpec.max_string`), not in the grammar."""
        depth = schema_depth(schema)
        if depth > MAX_SCHEMA_DEPTH:
            raise APIError(400, f"the schema nests {depth} levels deep; at most {MAX_SCHEMA_DEPTH}", param)
        ref = external_ref(schema)
        if ref is not None:
            raise APIError(400, f"$ref {shown_ref(ref)} points outside the schema: only local references (#/...) resolve", param)
        return bounded_schema(schema, None, self.max_digits)

    @property
    def tool_whitespace(self) -> int:
        return TOOL_WHITESPACE_MAX[self.whitespace]


class StructuredOutputs:
    def __init__(
        self, tokenizer: Any, vocab_size: int, metrics: Any, auto_tool_choice: bool, compile_timeout: float = 5.0
    ) -> None:
        self.vocab_size = vocab_size
        self.compile_timeout = compile_timeout
        self.metrics = metrics
        self.auto_tool_choice = auto_tool_choice
        self._tokenizer = tokenizer
        self._guard: CompileGuard | None = None  # started at the first constrained request

    # ---- what the request asks for ----------------------------------------------------------
    def spec(self, req: SamplingFields) -> tuple[ConstraintSpec | None, str | None]:
        """(the constraint, the parameter it came from), refused (400) where the request is
        contradictory. Tools are a constraint too (a structural tag) unless tool_choice is none.
        JSON gets the request's layout (`structured_outputs`' JSON options, or the defaults)."""
        so = req.structured_outputs
        layout = JSONLayout.of(so)
        found: list[tuple[ConstraintSpec, str]] = []
        rf = req.response_format
        if rf is not None and rf.type == "json_object":
            found.append((layout.schema(any_object_schema(), "response_format"), "response_format"))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise APIError(400, "response_format json_schema needs json_schema.schema", "response_format.json_schema")
            found.append((layout.schema(rf.json_schema.schema_, "response_format.json_schema.schema"), "response_format"))
        if so is not None:
            try:
                kind = so.constraint_kind()
            except ValueError as e:
                raise APIError(400, f"structured_outputs: {e}", "structured_outputs") from None
            if kind is not None:
                found.append((self._structured(so, kind, layout), "structured_outputs"))
        if isinstance(req, ChatCompletionRequest):
            tools = self.tool_spec(req, layout)
            if tools is not None:
                found.append((tools, "tools"))
        if len(found) > 1:
            raise APIError(400, f"give one of {' and '.join(p for _, p in found)}, not both", found[1][1])
        if so is not None and not found:
            raise APIError(
                400,
                "structured_outputs takes one of json, regex, choice, grammar, json_object, structural_tag, or "
                "JSON options beside response_format or tools",
                "structured_outputs",
            )
        return found[0] if found else (None, None)

    @staticmethod
    def _structured(so: ProtocolStructuredOutputs, kind: str, layout: JSONLayout) -> ConstraintSpec:
        value = getattr(so, "json_" if kind == "json" else kind)
        if kind == "json":
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except (ValueError, RecursionError):
                    raise APIError(400, "structured_outputs.json is not valid JSON (or nests too deeply)", "structured_outputs.json") from None
            if not isinstance(value, dict):
                raise APIError(400, "structured_outputs.json must be a JSON schema (an object)", "structured_outputs.json")
            return layout.schema(value, "structured_outputs.json")
        if kind == "json_object":
            return layout.schema(any_object_schema(), "structured_outputs")
        if kind == "choice":
            return ConstraintSpec("choice", json.dumps(value))
        if kind == "structural_tag":
            return ConstraintSpec(kind, value if isinstance(value, str) else json.dumps(value))
        return ConstraintSpec(kind, value)

    def tool_spec(self, req: ChatCompletionRequest, layout: JSONLayout = JSONLayout()) -> ConstraintSpec | None:
        """A structural tag for the request's tools: `required` and a named function force a call
        whose arguments follow the function's schema; `auto` lets the model write text or, once it
        opens `<tool_call>`, a call constrained the same way; `none` constrains nothing. Argument
        schemas get the request's JSON bounds."""
        choice = req.tool_choice
        if not req.tools:
            if choice not in (None, "none"):
                raise APIError(400, "tool_choice needs tools", "tool_choice")
            return None
        if choice == "none":
            return None
        if choice in (None, "auto") and not self.auto_tool_choice:
            raise APIError(
                400, '"auto" tool choice needs a server started with --enable-auto-tool-choice', "tool_choice"
            )
        tools = [t.model_dump(exclude_none=True) for t in req.tools]
        for i, t in enumerate(tools):
            params = t["function"].get("parameters") or {"type": "object"}
            t["function"]["parameters"] = layout.bound(params, f"tools.{i}.function.parameters")
        if hasattr(choice, "function"):
            names = [t.function.name for t in req.tools]
            if choice.function.name not in names:
                raise APIError(400, f"tool_choice names `{choice.function.name}`, which is not in tools", "tool_choice")
            tools = [t for t in tools if t["function"]["name"] == choice.function.name]
        parallel = req.parallel_tool_calls is not False
        # `required` and named calls: the whole output is calls, whose text the string bound can
        # follow; under `auto` free text comes first, where a stray quote would mislead it
        forced = choice not in (None, "auto")
        longest = max(string_bound(t["function"]["parameters"], layout.max_string) for t in tools) if forced else 0
        try:
            if choice in (None, "auto"):  # text, or calls once the model opens <tool_call>
                tag = xgr.get_model_structural_tag(
                    TOOL_FORMAT, tools=tools, tool_choice="auto", reasoning="disabled", parallel_tool_calls=parallel,
                    max_whitespace_cnt=layout.tool_whitespace,
                )
            else:  # required or named: calls from the first token on, no free text to wander off in
                tag = StructuralTag(
                    format=TagsWithSeparatorFormat(
                        tags=[_call_tag(t["function"], layout) for t in tools],
                        separator="\n",
                        at_least_one=True,
                        stop_after_first=not parallel or hasattr(choice, "function"),
                    )
                )
        except (ValueError, TypeError) as e:
            raise APIError(400, f"the tools cannot be turned into a grammar: {e}", "tools") from None
        return ConstraintSpec("structural_tag", tag.model_dump_json(), max_string=longest)

    def logit_bias(self, req: SamplingFields) -> dict[int, float] | None:
        """OpenAI's `logit_bias`: token id (a string key) -> bias in [-100, 100]."""
        if not req.logit_bias:
            return None
        bias: dict[int, float] = {}
        for key, value in req.logit_bias.items():
            param = f"logit_bias.{key}"
            try:
                token = int(key)
            except ValueError:
                raise APIError(400, f"logit_bias keys are token ids, not {key!r}", param) from None
            if not 0 <= token < self.vocab_size:
                raise APIError(400, f"logit_bias token ids must be in [0, {self.vocab_size}), not {token}", param)
            if not -100 <= value <= 100:
                raise APIError(400, f"logit_bias values must be in [-100, 100], not {value}", param)
            bias[token] = float(value)
        return bias

    # ---- compiling before admission -------------------------------------------------------------
    async def check(self, spec: ConstraintSpec, param: str, client: str = "") -> None:
        """Compile `spec` once, in a child process under the compile timeout (compile_guard.py), or
        find its verdict remembered; 400 naming `param` if it does not compile, or not in time."""
        guard = await self.guard()
        start = time.perf_counter()
        try:
            remembered = await guard.check(spec, client)
        except GrammarTimeout as e:
            self.metrics.grammar_refused.labels(reason="timeout").inc()
            raise APIError(400, f"the {param} {e}", param) from None
        except GrammarError as e:
            self.metrics.grammar_refused.labels(reason="invalid").inc()
            raise APIError(400, str(e), param) from None
        if remembered:
            self.metrics.grammar_cache_hits.inc()
        else:
            self.metrics.grammar_compile_seconds.observe(time.perf_counter() - start)

    async def guard(self) -> CompileGuard:
        """The compile guard, started at the first call (the server's start-up makes it)."""
        if self._guard is None:
            info = await anyio.to_thread.run_sync(tokenizer_info_json, self._tokenizer, self.vocab_size)
            if self._guard is None:
                self._guard = CompileGuard(info, self.compile_timeout, COMPILE_PROCESSES)
        return self._guard

    async def start(self) -> None:
        """At start-up, in the background: a compile process ready before the first grammar."""
        await (await self.guard()).start()

    def close(self) -> None:
        if self._guard is not None:
            self._guard.close()
