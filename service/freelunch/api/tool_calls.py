"""Tool calls in the Hermes format (`--tool-call-parser hermes`, as vLLM names it): the prompt
that describes the tools to a model whose chat template does not take them, the messages of an
earlier call and its result rendered for such a template, and the parser that finds calls in the
output, whole or streamed.

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
_NAME = re.compile(r'"name"\s*:\s*"([^"\\]*)"')

# NousResearch's Hermes function-calling system prompt (what Hermes-style models and Qwen use):
# the default tool prompt for chat templates that do not render `tools` themselves.
HERMES_TOOL_PROMPT = (
    "You are a function calling AI model. You are provided with function signatures within <tools></tools> XML "
    "tags. You may call one or more functions to assist with the user query. Don't make assumptions about what "
    "values to plug into functions. Here are the available tools: <tools>{tools}</tools>\n"
    "For each function call return a json object with function name and arguments within <tool_call></tool_call> "
    "XML tags as follows:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-dict>}}\n</tool_call>"
)


def template_takes_tools(template: str | None) -> bool:
    return bool(template) and "tools" in template


def tool_system_prompt(tools: list[dict[str, Any]]) -> str:
    return HERMES_TOOL_PROMPT.format(tools="\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools))


def render_call(name: str, arguments: str) -> str:
    """An earlier call, as the model writes one."""
    try:
        args: Any = json.loads(arguments)
    except ValueError:
        args = arguments
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': args}, ensure_ascii=False)}\n{CLOSE}"


def render_result(content: str) -> str:
    """A tool's result, as Hermes templates wrap it."""
    return f"<tool_response>\n{content}\n</tool_response>"


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call(body: str) -> dict[str, Any] | None:
    """A call's JSON -> {"name", "arguments" (a JSON string)}, or None if it is not one."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", {})
    return {"name": obj["name"], "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}


def cut_call(partial: str) -> dict[str, Any]:
    """What an output cut inside a call (max_tokens, a stop) had written of it: the function's
    name where it got that far, and the call's text. Never content: markup is not an answer."""
    name = _NAME.search(partial)
    return {"name": name.group(1) if name else None, "text": partial.strip()}


def parse(text: str) -> tuple[str, list[dict[str, Any]], dict[str, Any] | None]:
    """(the text outside the calls, the calls as OpenAI's message.tool_calls, the call the output
    was cut inside, if any)."""
    cut = None
    start = text.rfind(OPEN)
    if start >= 0 and CLOSE not in text[start:]:  # an unclosed last call
        text, cut = text[:start], cut_call(text[start + len(OPEN) :])
    calls = []
    for match in _CALL.finditer(text):
        call = _call(match.group(1))
        if call is not None:
            calls.append({"id": new_call_id(), "type": "function", "function": call})
    if not calls and cut is None:
        return text, [], None
    return _CALL.sub("", text).strip(), calls, cut


@dataclass
class StreamParser:
    """Splits streamed text into content deltas and tool-call deltas, as OpenAI streams them: a
    call's first delta carries its index, id, type and name (arguments ""), the next its arguments.
    Text that may be the start of `<tool_call>` is held back until it is known not to be."""

    buffer: str = ""
    calls: int = 0
    inside: bool = False
    sent: list[dict[str, Any]] = field(default_factory=list)
    cut: dict[str, Any] | None = None  # the call the output ended inside (`cut_call`)

    def feed(self, text: str, final: bool = False) -> tuple[str, list[dict[str, Any]]]:
        self.buffer += text
        content, deltas = "", []
        while self.buffer:
            if not self.inside:
                start = self.buffer.find(OPEN)
                if start < 0:
                    keep = 0 if final else _partial_suffix(self.buffer, OPEN)
                    content += self.buffer[: len(self.buffer) - keep]
                    self.buffer = self.buffer[len(self.buffer) - keep :]
                    break
                content += self.buffer[:start]
                self.buffer = self.buffer[start + len(OPEN) :]
                self.inside = True
            end = self.buffer.find(CLOSE)
            if end < 0:
                if final:  # the output ended inside a call: reported, never streamed as content
                    self.cut = cut_call(self.buffer)
                    self.buffer = ""
                break
            call = _call(self.buffer[:end].strip())
            self.buffer = self.buffer[end + len(CLOSE) :]
            self.inside = False
            if call is None:
                continue
            index, call_id = self.calls, new_call_id()
            self.calls += 1
            deltas.append({"index": index, "id": call_id, "type": "function", "function": {"name": call["name"], "arguments": ""}})
            deltas.append({"index": index, "function": {"arguments": call["arguments"]}})
            self.sent.append({"id": call_id, "type": "function", "function": call})
        if self.calls and not content.strip():  # the newlines between and after calls
            content = ""
        return content, deltas


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0
