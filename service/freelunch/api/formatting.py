"""Engine outputs -> OpenAI response bodies and stream chunks, for both endpoints."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from freelunch.api import tool_calls
from freelunch.api.building import Call
from freelunch.engine.messages import RequestOutput, TokenLogprob


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
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    method_stats: dict[str, Any] | None = None
    first_token_at: float | None = None


def envelope(rid: str, obj: str, created: int, model: str, choices: list[dict], **extra: Any) -> dict:
    """The fields every completion response and stream chunk carries."""
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": choices, **extra}


def usage(choices: list[ChoiceState], prompt_tokens: int, cached_tokens: int) -> dict:
    completion = sum(c.output_tokens for c in choices)
    out: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
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
        out["method_stats"] = stats
    return out


def _is_setting(key: str) -> bool:
    """Stats that describe a setting (e.g. a method's scale) or a mean are not summed over choices."""
    return not (key.endswith(("_tokens", "_rows", "steps")) or key.startswith("mean_"))


class Formatter:
    """Token texts for logprobs (the tokenizer's), shared by both endpoints."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

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


# a choice that ended inside a tool call (max_tokens, a stop): what it had written of the call,
# {"name", "text"}, beside finish_reason; the markup never reaches `content`
CUT_CALL = "cut_tool_call"


class ChatShapes:
    """`chat.completion` bodies and `chat.completion.chunk` events of one request. With `tools`,
    calls in the output become `message.tool_calls` (streamed as tool-call deltas) and a choice
    that made one ends with finish_reason "tool_calls"."""

    def __init__(
        self, fmt: Formatter, call: Call, rid: str, created: int, model: str, logprobs: bool, include_usage: bool, tools: bool = False
    ) -> None:
        self.fmt, self.call, self.rid, self.created, self.model = fmt, call, rid, created, model
        self.logprobs, self.include_usage, self.tools = logprobs, include_usage, tools
        self._sent_role: set[int] = set()
        self._parsers: dict[int, tool_calls.StreamParser] = {}

    def _finish(self, reason: str | None, made_calls: bool) -> str | None:
        return "tool_calls" if made_calls and reason == "stop" else reason

    def response(self, choices: list[ChoiceState]) -> dict:
        out = []
        for c in choices:
            message: dict[str, Any] = {"role": "assistant", "content": c.text}
            calls: list = []
            cut = None
            if self.tools:
                content, calls, cut = tool_calls.parse(c.text)
                if calls or cut:
                    message = {"role": "assistant", "content": content or None} | ({"tool_calls": calls} if calls else {})
            choice = {
                "index": c.index,
                "message": message,
                "logprobs": self.fmt.chat_logprobs(c.logprobs) if self.logprobs else None,
                "finish_reason": self._finish(c.finish_reason, bool(calls)),
            }
            out.append(choice | ({CUT_CALL: cut} if cut else {}))
        return envelope(self.rid, "chat.completion", self.created, self.model, out, usage=self.usage(choices))

    def usage(self, choices: list[ChoiceState]) -> dict:
        # the prompt counts once for all `n` choices: so does its use of the cache (the first
        # choice's; the others reuse the blocks it computed)
        return usage(choices, self.call.prompt_tokens, choices[0].cached_tokens if choices else 0)

    def chunk(self, choices: list[dict[str, Any]], usage_now: dict | None = None) -> dict:
        extra = {"usage": usage_now} if self.include_usage else {}
        return envelope(self.rid, "chat.completion.chunk", self.created, self.model, choices, **extra)

    def events(self, c: ChoiceState, out: RequestOutput) -> list[dict]:
        chunks = []
        if c.index not in self._sent_role:
            self._sent_role.add(c.index)
            chunks.append(self.chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]))
        text, calls = out.new_text, []
        if self.tools:
            parser = self._parsers.setdefault(c.index, tool_calls.StreamParser())
            text, calls = parser.feed(out.new_text, final=out.finished)
        if text or out.logprobs:
            lp = self.fmt.chat_logprobs(out.logprobs) if self.logprobs and out.logprobs else None
            chunks.append(self.chunk([{"index": c.index, "delta": {"content": text}, "logprobs": lp, "finish_reason": None}]))
        for delta in calls:
            chunks.append(self.chunk([{"index": c.index, "delta": {"tool_calls": [delta]}, "logprobs": None, "finish_reason": None}]))
        if out.finished:
            parser = self._parsers.get(c.index)
            reason = self._finish(c.finish_reason, bool(parser and parser.calls))
            last = {"index": c.index, "delta": {}, "logprobs": None, "finish_reason": reason}
            chunks.append(self.chunk([last | ({CUT_CALL: parser.cut} if parser and parser.cut else {})]))
        return chunks

    def usage_chunk(self, choices: list[ChoiceState]) -> dict:
        return self.chunk([], self.usage(choices))


class CompletionShapes:
    """`text_completion` bodies and events of one request (echo and logprobs included)."""

    def __init__(
        self,
        fmt: Formatter,
        call: Call,
        rid: str,
        created: int,
        model: str,
        n: int,
        logprobs: int | None,
        prompt_texts: list[str] | None,
        include_usage: bool,
    ) -> None:
        self.fmt, self.call, self.rid, self.created, self.model, self.n = fmt, call, rid, created, model, n
        self.logprobs, self.prompt_texts, self.include_usage = logprobs, prompt_texts, include_usage
        self._echoed: set[int] = set()

    def _logprobs(self, c: ChoiceState, records: list[TokenLogprob], with_prompt: bool) -> dict | None:
        if self.logprobs is None:
            return None
        prefix: list[TokenLogprob] = []
        offset = 0
        if with_prompt:
            prompt = self.call.requests[c.index].prompt_token_ids
            prefix = [TokenLogprob(prompt[0], math.nan, [])] + list((c.prompt_logprobs or [None])[1:])
        elif self.prompt_texts is not None:
            offset = len(self.prompt_texts[c.index // self.n])
        return self.fmt.completion_logprobs(prefix + records, offset)

    def response(self, choices: list[ChoiceState]) -> dict:
        echo = self.prompt_texts is not None
        return envelope(
            self.rid,
            "text_completion",
            self.created,
            self.model,
            [
                {
                    "index": c.index,
                    "text": (self.prompt_texts[c.index // self.n] if echo else "") + c.text,
                    "logprobs": self._logprobs(c, c.logprobs, echo),
                    "finish_reason": c.finish_reason,
                }
                for c in choices
            ],
            usage=self.usage(choices),
        )

    def usage(self, choices: list[ChoiceState]) -> dict:
        return usage(choices, self.call.prompt_tokens, sum(c.cached_tokens for c in choices))

    def chunk(self, choices: list[dict], usage_now: dict | None = None) -> dict:
        extra = {"usage": usage_now} if self.include_usage else {}
        return envelope(self.rid, "text_completion", self.created, self.model, choices, **extra)

    def events(self, c: ChoiceState, out: RequestOutput) -> list[dict]:
        text = out.new_text
        with_prompt = False
        if self.prompt_texts is not None and c.index not in self._echoed:
            self._echoed.add(c.index)
            text = self.prompt_texts[c.index // self.n] + text
            with_prompt = True
        if not text and not out.finished and not out.logprobs:
            return []
        choice = {
            "index": c.index,
            "text": text,
            "logprobs": self._logprobs(c, out.logprobs or [], with_prompt),
            "finish_reason": c.finish_reason if out.finished else None,
        }
        return [self.chunk([choice])]

    def usage_chunk(self, choices: list[ChoiceState]) -> dict:
        return self.chunk([], self.usage(choices))
