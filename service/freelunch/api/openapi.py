"""What /openapi.json says the endpoints answer: the response bodies, and the errors the server
really sends (OpenAI's shape, 400 for every invalid request: FastAPI's default 422 never leaves
this server, see errors.py)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field

from freelunch.api.protocol import Usage


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, not_found_error, timeout_error, "
                      "rate_limit_error, server_error or service_unavailable")
    param: str | None = Field(description="the request field the error is about, dotted (`<option>.<field>`)")
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


ERRORS: dict[int, str] = {
    400: "Invalid request: a value out of range, an unknown or unserved field, a schema that does not compile, "
    "a prompt over the context; `error.param` names the field",
    401: "Missing or wrong API key (a server started with --api-key)",
    404: "The model does not exist",
    408: "The request did not finish within its timeout",
    413: "The body is larger than --max-body-bytes",
    429: "At capacity (`Retry-After`), or over the API key's rate limit",
    431: "The request's headers are too large",
    500: "Internal error",
    503: "No engine worker is ready, or the server is shutting down",
}
GENERATION_ERRORS = (400, 401, 404, 408, 413, 429, 431, 500, 503)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorBody, "description": ERRORS[status]} for status in statuses}


class ToolCallFunction(BaseModel):
    name: str
    arguments: str = Field(description="JSON")


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class CutToolCall(BaseModel):
    name: str | None = Field(description="the function's name, where the output got that far")
    text: str = Field(description="what the output had written of the call")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: Literal["stop", "length", "tool_calls", "abort"] | None
    cut_tool_call: CutToolCall | None = Field(
        default=None, description="set where the output ended inside a tool call: its markup is never content"
    )


class ChatCompletion(BaseModel):
    """`stream: true` answers `text/event-stream` instead: `chat.completion.chunk` events, then `[DONE]`."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: Literal["stop", "length", "abort"] | None


class Completion(BaseModel):
    """`stream: true` answers `text/event-stream` instead: `text_completion` events, then `[DONE]`."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


def generation_responses(body: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    stream = {"text/event-stream": {"schema": {"type": "string", "description": "server-sent events (stream: true)"}}}
    return {200: {"model": body, "content": stream}, **error_responses(*GENERATION_ERRORS)}


def install_openapi(app: FastAPI) -> None:
    """/openapi.json without FastAPI's 422 (validation errors are 400s here, errors.py)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
