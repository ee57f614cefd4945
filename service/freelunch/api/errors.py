"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}} with the matching status."""

from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    500: "server_error",
    503: "service_unavailable",
}


SERVED_ENDPOINTS = ("POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models")

_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none", "bytes"}


def _is_union_tag(part: object) -> bool:
    """pydantic puts the tried union member into `loc` (`stop.str`, `content.list[...]`,
    `messages.0.content.TextPart`): not a field the client sent."""
    if isinstance(part, int):
        return False
    return part in _TYPE_NAMES or not part.replace("_", "a").isalnum() or not part[:1].islower()


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param, "code": code}}


class ErrorResponse(JSONResponse):
    """JSON with non-ASCII escaped: an error may quote any text a request held, lone surrogates too."""

    def render(self, content: object) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return ErrorResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return error_response(e.status, e.message, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _is_union_tag(p)]
        field = (first.get("ctx") or {}).get("field")  # a check across fields names the one it refuses
        if isinstance(field, str):
            loc.append(field)
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            return error_response(400, "the request body is not valid JSON", None, "invalid_json")
        return error_response(400, f"{param}: {msg}" if param else msg, param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        if e.status_code in (404, 405):  # an endpoint (or method) this server does not have
            return error_response(
                404 if e.status_code == 404 else 405,
                f"{request.method} {request.url.path} is not served here; this server serves "
                f"{', '.join(SERVED_ENDPOINTS)}",
                None,
                "unknown_endpoint",
            )
        return error_response(e.status_code, str(e.detail), None, None)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        return error_response(500, "internal server error", None, None)
