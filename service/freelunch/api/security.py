"""ASGI middleware in front of the routes: API-key authentication and the request-body limit."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable, Sequence

import anyio
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from freelunch.api.errors import error_body

OPEN_PATHS = ("/health", "/ready")
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")
# the API's own documentation: behind the keys like the API it describes, unless --public-docs
DOC_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
DOC_ASSETS = "/static-offline-docs/"


async def send_error(
    send: Send, status: int, message: str, code: str | None, param: str | None = None, headers: dict[str, str] | None = None
) -> None:
    body = json.dumps(error_body(status, message, param, code)).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


def key_id(key: str) -> str:
    """A name for a key that is safe to log and to use as a rate-limit bucket."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]


class APIKeyAuth:
    """Requires `Authorization: Bearer <key>` on `/v1/*`, on the API's documentation (`/docs`,
    `/redoc`, `/openapi.json`) unless `public_docs`, and on `/metrics` if asked. The key is
    compared in constant time against every configured key, so timing reveals nothing."""

    def __init__(self, app: ASGIApp, keys: Sequence[str], protect_metrics: bool = False, public_docs: bool = False) -> None:
        self.app = app
        self._digests = [(hashlib.sha256(k.encode()).digest(), key_id(k)) for k in keys]
        self.protect_metrics = protect_metrics
        self.public_docs = public_docs

    def _protected(self, path: str) -> bool:
        if path.startswith("/v1/") or path == "/v1" or (self.protect_metrics and path == "/metrics"):
            return True
        return not self.public_docs and (path in DOC_PATHS or path.startswith(DOC_ASSETS))

    def match(self, authorization: str | None) -> str | None:
        scheme, _, token = (authorization or "").partition(" ")
        digest = hashlib.sha256(token.strip().encode()).digest()
        found = None
        for known, name in self._digests:  # no early exit: every key is compared
            if hmac.compare_digest(known, digest) and scheme.lower() == "bearer":
                found = name
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._digests or not self._protected(scope["path"]):
            await self.app(scope, receive, send)
            return
        name = self.match(Headers(scope=scope).get("authorization"))
        if name is None:
            await send_error(
                send,
                401,
                "Incorrect or missing API key: send `Authorization: Bearer <key>`",
                "invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
            return
        scope.setdefault("state", {})["api_key_id"] = name
        await self.app(scope, receive, send)


class BodySizeLimit:
    """Refuses request bodies over `max_bytes` with 413 before any parsing, and bodies that do
    not arrive whole within `read_timeout` seconds with 408 (a client trickling its body holds a
    connection no longer than that). The body is read here (the routes need all of it anyway) and
    replayed to the app."""

    def __init__(self, app: ASGIApp, max_bytes: int, read_timeout: float = 30.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout = read_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        too_large = f"the request body is larger than {self.max_bytes} bytes"
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await send_error(send, 413, too_large, "request_too_large")
            return
        chunks: list[bytes] = []
        size = 0
        with anyio.move_on_after(self.read_timeout) as timer:
            while True:
                message = await receive()
                if message["type"] != "http.request":  # disconnected while sending
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_bytes:
                    await send_error(send, 413, too_large, "request_too_large")
                    return
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
        if timer.cancelled_caught:
            message = f"the request body did not arrive within {self.read_timeout:g} s"
            await send_error(send, 408, message, "body_timeout", headers={"Connection": "close"})
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # later calls wait for the disconnect, as the app expects

        await self.app(scope, replay, send)


class AdmissionGate:
    """A generation request that even one more choice would not fit gets 429 here, before its
    body is read, parsed or validated: a burst is refused at the cost of its headers."""

    def __init__(self, app: ASGIApp, full: Callable[[], bool], on_refused: Callable[[], None]) -> None:
        self.app = app
        self.full = full
        self.on_refused = on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in GENERATION_PATHS and self.full():
            self.on_refused()
            await send_error(
                send, 429, "the server is at capacity; retry shortly", "server_overloaded", headers={"Retry-After": "1"}
            )
            return
        await self.app(scope, receive, send)
