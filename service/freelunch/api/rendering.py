"""Prompts to token ids: chat templates, tokenising and images, all off the event loop.

Tokenising a long text takes seconds (8 MB: about 6 s here). It runs on a small thread pool, so
that `/health` and every stream in flight keep answering, and text that provably cannot fit the
context is refused before any tokenising: a token covers at most `longest_token_chars`
characters, so a text longer than the context length times that is too long whatever it holds.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio

from freelunch.api import tool_calls
from freelunch.api.errors import APIError
from freelunch.api.images import MAX_IMAGES_PER_REQUEST, ImageLoader, VisionPrompts
from freelunch.api.protocol import ChatMessage, ImagePart, TextPart
from freelunch.engine.messages import ImageInput

T = TypeVar("T")
RENDER_THREADS = 4  # tokenisers release the GIL while they encode: a few requests at once


@dataclass(slots=True)
class RenderedPrompt:
    """A prompt as the engine takes it: token ids, and the images its placeholder tokens stand for."""

    token_ids: list[int]
    images: list[ImageInput] = field(default_factory=list)


def longest_token_chars(tokenizer: Any) -> int:
    """An upper bound on the characters of text one token covers: its longest vocabulary entry
    (byte-level entries spell a byte as one character, so a multi-byte character counts in full),
    doubled where a normaliser may merge characters before tokenising."""
    longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return longest * (2 if getattr(backend, "normalizer", None) is not None else 1)


class PromptRenderer:
    def __init__(self, tokenizer: Any, max_model_len: int, images: ImageLoader) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.images = images
        self.vision = VisionPrompts.for_tokenizer(tokenizer)  # None: the model takes no images
        self.max_chars = max_model_len * longest_token_chars(tokenizer)
        self._threads = anyio.CapacityLimiter(RENDER_THREADS)

    async def _off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._threads)

    def check_length(self, chars: int, param: str) -> None:
        """Refuse, before tokenising, text too long for the context whatever its tokens."""
        if chars > self.max_chars:
            raise APIError(
                400,
                f"the prompt has {chars} characters: more than this model's maximum context length "
                f"({self.max_model_len} tokens) can hold",
                param,
                "context_length_exceeded",
            )

    async def text(self, text: str, param: str) -> list[int]:
        """A completions prompt (special tokens added as the tokenizer does)."""
        self.check_length(len(text), param)
        return await self._off_loop(self.tokenizer.encode, text)

    async def chat(
        self,
        chat: list[ChatMessage],
        param: str,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        allow_images: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> RenderedPrompt:
        """Messages rendered with the model's chat template, as token ids, image placeholders
        expanded: images are fetched, decoded and preprocessed off the event loop too. `tools`
        go to a template that renders them; other templates get the Hermes tool prompt as (the
        start of) the system message, and earlier calls and results as Hermes text."""
        messages, refs, chars = self._chat_messages(chat, param, allow_images)
        self.check_length(chars, param)
        images = await self.images.load_all(refs)
        native_tools = tools if tools and tool_calls.template_takes_tools(self._template()) else None
        if tools and native_tools is None:
            messages = _hermes_messages(messages, tools)
        text = await self._off_loop(
            self._chat_text,
            messages,
            add_generation_prompt and not continue_final_message,
            continue_final_message,
            param,
            native_tools,
        )
        if self.vision is None:
            return RenderedPrompt(await self._off_loop(self._encode_plain, text))
        token_ids, pixels = await self._off_loop(self.vision.encode, text, images, param)
        return RenderedPrompt(token_ids, pixels)

    def _encode_plain(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _chat_messages(
        self, chat: list[ChatMessage], param: str, allow_images: bool
    ) -> tuple[list[dict[str, Any]], list[tuple[str, str]], int]:
        """The messages as chat templates take them, each image's (url, param) checked (count,
        scheme, host) but not loaded, and the characters of text they hold."""
        messages = []
        refs: list[tuple[str, str]] = []
        chars = 0
        for i, m in enumerate(chat):
            if isinstance(m.content, list):
                content = self._chat_content(m.content, param, f"{param}.{i}.content", refs, allow_images)
                chars += sum(len(p.text) for p in m.content if isinstance(p, TextPart))
            else:
                content = m.content or ""
                chars += len(content)
            message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content}
            if m.tool_calls:
                message["tool_calls"] = [
                    {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                    for c in m.tool_calls
                ]
            if m.tool_call_id is not None:
                message["tool_call_id"] = m.tool_call_id
            messages.append(message)
        return messages, refs, chars

    def _template(self) -> str | None:
        return (self.vision and self.vision.chat_template) or getattr(self.tokenizer, "chat_template", None)

    def _chat_text(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        continue_final_message: bool,
        param: str,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        template = self._template()
        if template is None:
            raise APIError(400, "this model has no chat template; use /v1/completions", param)
        try:
            return self.tokenizer.apply_chat_template(
                messages,
                chat_template=template,
                tools=tools,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
            )
        except Exception as e:  # template errors are the request's fault (e.g. role order)
            raise APIError(400, f"the chat template rejected these messages: {e}", param) from e

    def _chat_content(
        self, parts: list[TextPart | ImagePart], param: str, parts_param: str, refs: list[tuple[str, str]], allow_images: bool
    ) -> str | list[dict[str, str]]:
        """Text parts joined; with images, the content list chat templates take ({"type": "image"}
        where each image goes), each image's (url, param) appended to `refs` once checked."""
        if not any(p.type == "image_url" for p in parts):
            return "".join(p.text for p in parts)
        if self.vision is None:
            raise APIError(400, "this model does not accept images", param)
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


def _arguments(arguments: str) -> Any:
    """A call's arguments as chat templates take them: the parsed JSON (the text if it is not JSON)."""
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def _hermes_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages for a template that knows nothing of tools: the tool prompt joins the system
    message (or becomes one), an assistant's calls and a tool's results become Hermes text."""
    prompt = tool_calls.tool_system_prompt(tools)
    out: list[dict[str, Any]] = []
    for m in messages:
        content = m["content"] if isinstance(m["content"], str) else m["content"]
        if m.get("tool_calls"):
            calls = "\n".join(tool_calls.render_call(c["function"]["name"], json.dumps(c["function"]["arguments"])) for c in m["tool_calls"])
            content = f"{content}\n{calls}" if content else calls
        if m["role"] == "tool" and isinstance(content, str):
            content = tool_calls.render_result(content)
        out.append({"role": m["role"], "content": content})
    if out and out[0]["role"] == "system" and isinstance(out[0]["content"], str):
        out[0] = {"role": "system", "content": f"{prompt}\n\n{out[0]['content']}" if out[0]["content"] else prompt}
    else:
        out.insert(0, {"role": "system", "content": prompt})
    return out
