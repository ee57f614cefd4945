"""Running a call: admission to the pool, its choices' output streams merged, cancellation when
the client leaves, deadlines, the drain's cut, and server-sent events."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from freelunch.api.building import Call
from freelunch.api.errors import APIError, error_body
from freelunch.api.formatting import ChoiceState
from freelunch.api.metrics import Metrics
from freelunch.engine.errors import EngineError
from freelunch.engine.messages import RequestOutput
from freelunch.pool.pool import PoolOverloaded, PoolUnavailable, Together, WorkerPool
from freelunch.pool.worker import WorkerDied

FINISH_REASONS = ("stop", "length", "abort", "error")


class Cut(Exception):
    """The server cut the generation (drain deadline)."""


class StreamShapes(Protocol):
    """What `sse` needs of an endpoint's response shapes (formatting.py)."""

    def events(self, choice: ChoiceState, out: RequestOutput) -> list[dict]: ...

    def usage_chunk(self, choices: list[ChoiceState]) -> dict: ...


async def get_within(queue: asyncio.Queue, timeout: float, cut: asyncio.Event | None = None) -> Any:
    """`queue.get()` that raises TimeoutError after `timeout` seconds, and Cut once `cut` is set.
    Not `asyncio.wait_for`: before Python 3.12 it swallows a cancellation that lands in the tick an
    item arrives (cpython#86296), so a client that left mid-stream would not stop its generation."""
    if cut is not None and cut.is_set():
        raise Cut
    getter = asyncio.ensure_future(queue.get())
    waiters = {getter}
    cutter = asyncio.ensure_future(cut.wait()) if cut is not None else None
    if cutter is not None:
        waiters.add(cutter)
    try:
        done, _ = await asyncio.wait(waiters, timeout=max(0.0, timeout), return_when=asyncio.FIRST_COMPLETED)
    finally:
        getter.cancel()  # no-op once it has its item
        if cutter is not None:
            cutter.cancel()
    if getter.done() and not getter.cancelled():  # also an item that came as the wait ended
        return getter.result()
    if cutter is not None and cutter in done:
        raise Cut
    raise TimeoutError


class GenerationRunner:
    def __init__(self, pool: WorkerPool, metrics: Metrics) -> None:
        self.pool = pool
        self.metrics = metrics

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
        """Merge the choices' output streams; leaving early (client gone, timeout, error, the
        drain's cut) aborts every choice still running."""
        requests = call.requests
        self._admit(len(requests))
        queue: asyncio.Queue = asyncio.Queue()
        together = Together()  # the choices share one worker (pool.py)

        async def pump(index: int, request: Any) -> None:
            try:
                async for out in self.pool.generate(request, together):
                    await queue.put((index, out))
            except Exception as e:
                await queue.put((index, e))

        tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
        remaining = len(requests)
        try:
            while remaining:
                try:
                    index, item = await get_within(queue, call.deadline - time.monotonic(), self.pool.cut)
                except Cut:
                    self.metrics.request_failure.labels(reason="shutdown").inc()
                    raise APIError(
                        503,
                        "the server is shutting down and cut this generation at its drain deadline; retry the request",
                        None,
                        "server_shutdown",
                        {"Retry-After": "1"},
                    ) from None
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
        choice.cached_tokens = max(choice.cached_tokens, out.num_cached_tokens)
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
                choice.cached_tokens,
            )

    def _choices(self, call: Call) -> list[ChoiceState]:
        return [ChoiceState(i, len(r.prompt_token_ids)) for i, r in enumerate(call.requests)]

    async def collect(self, call: Call, raw: Request) -> list[ChoiceState]:
        """Run to completion; a client that disconnects cancels the generation."""
        started = time.monotonic()
        choices = self._choices(call)

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
            raise self.as_api_error(exc)
        return choices

    def as_api_error(self, e: BaseException) -> APIError:
        if isinstance(e, APIError):
            return e
        if isinstance(e, EngineError):
            return APIError(400, str(e), e.param)
        if isinstance(e, WorkerDied):
            self.metrics.request_failure.labels(reason="worker_died").inc()
            return APIError(503, str(e), None, "worker_died", {"Retry-After": "5"})
        self.metrics.request_failure.labels(reason="engine").inc()
        return APIError(500, str(e) or "engine error", None, "engine_error")

    async def sse(
        self, call: Call, shapes: StreamShapes, include_usage: bool, continuous_usage: Callable[[list[ChoiceState]], dict] | None = None
    ) -> StreamingResponse | JSONResponse:
        """Stream the shaped chunks as SSE. The first output is awaited first, so that a request
        the engine refuses still gets a proper JSON error status instead of a broken stream.
        `continuous_usage(choices)`, when given, puts the usage so far in every chunk."""
        started = time.monotonic()
        choices = self._choices(call)
        it = self.stream_choices(call).__aiter__()
        try:
            first = await it.__anext__()
        except StopAsyncIteration:
            first = None
        except Exception as e:
            err = self.as_api_error(e)
            headers = {**call.headers, **(err.headers or {})}
            return JSONResponse(error_body(err.status, err.message, err.param, err.code), status_code=err.status, headers=headers)

        async def events() -> AsyncIterator[str]:
            try:
                item = first
                while item is not None:
                    index, out = item
                    self._record(choices[index], out, started)
                    for chunk in shapes.events(choices[index], out):
                        if continuous_usage is not None:
                            chunk["usage"] = continuous_usage(choices)
                        yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
                    try:
                        item = await it.__anext__()
                    except StopAsyncIteration:
                        item = None
                if include_usage:
                    yield f"data: {json.dumps(shapes.usage_chunk(choices), ensure_ascii=False)}\n\n"
                yield "data: [DONE]\n\n"
            except Exception as e:  # mid-stream failure: tell the client in-band, then end
                err = self.as_api_error(e)
                yield f"data: {json.dumps(error_body(err.status, err.message, err.param, err.code))}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                # Starlette cancels this generator when the client disconnects; shielded, the cleanup
                # (abort on the worker, admission released) still runs instead of being cancelled too.
                with anyio.CancelScope(shield=True):
                    await it.aclose()

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", **call.headers})
