"""The HTTP server: uvicorn with httptools, bounded request heads, and a drain on SIGTERM.

uvicorn's httptools protocol reads a request head of any size (a 64 MB `Authorization` header is
buffered whole before the app sees it). `BoundedHeadProtocol` answers 431 once the head passes
`MAX_HEAD_BYTES` (bytes before the blank line that ends it) or `MAX_HEADERS` header lines, before
any authentication or routing, and closes the connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from freelunch.api.errors import error_body
from freelunch.pool.pool import WorkerPool

log = logging.getLogger("freelunch")

MAX_HEAD_BYTES = 64 << 10  # request line + headers; nginx's default large_client_header_buffers is 4 x 8 KB
MAX_HEADERS = 128
_HEAD_END = b"\r\n\r\n"


class BoundedHeadProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0  # of the request being read, until its head ends
        self._tail = b""  # the last bytes seen, to find a head's end across reads

    def data_received(self, data: bytes) -> None:
        if self._head_bytes >= 0:  # still in a request head
            end = (self._tail + data).find(_HEAD_END)
            head_here = len(data) if end < 0 else end + len(_HEAD_END) - len(self._tail)
            if self._head_bytes + head_here > MAX_HEAD_BYTES:
                self._refuse(f"the request head is larger than {MAX_HEAD_BYTES} bytes")
                return
            self._head_bytes = -1 if end >= 0 else self._head_bytes + len(data)
            self._tail = (self._tail + data)[-3:]
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes, self._tail = 0, b""

    def on_headers_complete(self) -> None:
        self._head_bytes = -1
        if len(self.headers) > MAX_HEADERS:
            self._refuse(f"the request has more than {MAX_HEADERS} headers")
            return
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._head_bytes, self._tail = 0, b""  # a pipelined or keep-alive request's head comes next

    def _refuse(self, message: str) -> None:
        body = json.dumps(error_body(431, message, None, "request_header_fields_too_large")).encode()
        head = (
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n"
            b"connection: close\r\n\r\n"
        )
        self._head_bytes = -1
        if not self.transport.is_closing():
            self.transport.write(head + body)
            self.transport.close()


def server_config(app: Any, host: str, port: int, **kwargs: Any) -> uvicorn.Config:
    """uvicorn's config for the API: bounded request heads (httptools)."""
    return uvicorn.Config(app, host=host, port=port, http=BoundedHeadProtocol, **kwargs)


# After the drain deadline: how long cut generations get to send their error event and [DONE].
CUT_FLUSH_S = 3.0


class DrainingServer(uvicorn.Server):
    """On SIGTERM / SIGINT, what Kubernetes expects of a pod being removed:
    - at once: `/ready` turns 503 and new generations get 503 with Retry-After, while the socket
      stays open (keep-alive connections too) so that nobody gets connection refused;
    - in-flight generations finish, for up to `drain_timeout` seconds;
    - those still running then are cut: each ends with an OpenAI-style error event and
      `data: [DONE]` (a non-streamed one with a 503);
    - then uvicorn stops listening and the process exits. A second signal exits at once."""

    def __init__(self, config: uvicorn.Config, pool: WorkerPool, drain_timeout: float) -> None:
        super().__init__(config)
        self.pool = pool
        self.drain_timeout = drain_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.pool.draining or self._loop is None:  # a second signal, or not serving yet
            super().handle_exit(sig, frame)
            return
        self.pool.draining = True
        log.info("draining: %d generation(s) in flight get up to %.0f s", self.pool.in_flight, self.drain_timeout)
        self._loop.call_soon_threadsafe(self._start_drain, sig, frame)

    def _start_drain(self, sig: int, frame: Any) -> None:
        self._drain_task = asyncio.ensure_future(self._drain(sig, frame))

    async def _drain(self, sig: int, frame: Any) -> None:
        deadline = time.monotonic() + self.drain_timeout
        while self.pool.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.pool.in_flight:
            log.warning("drain timeout: cutting %d generation(s)", self.pool.in_flight)
            self.pool.cut_all()
            flushed = time.monotonic() + CUT_FLUSH_S
            while self.pool.in_flight and time.monotonic() < flushed:
                await asyncio.sleep(0.05)
        super().handle_exit(sig, frame)
