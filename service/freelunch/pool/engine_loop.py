"""Drive one engine from a background thread: an inbox of adds and aborts in, outputs out.

The same loop runs inside a worker process (outputs go down a pipe) and in-process (outputs go to
asyncio queues); `Sink` is the only difference.
"""

from __future__ import annotations

import logging
import threading
import traceback
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

from freelunch.engine.errors import EngineError
from freelunch.engine.messages import GenerationRequest, RequestOutput
from freelunch.memory import release_freed_memory

log = logging.getLogger("freelunch.worker")

# Engines being driven, by id: an engine's step is not thread-safe, and two loops stepping one engine
# corrupt its state (vLLM: "sample_tokens() must be called after execute_model()") instead of failing.
_driven: dict[int, "EngineLoop"] = {}
_driven_lock = threading.Lock()


class EngineBusy(RuntimeError):
    """The engine is already driven by another loop."""


@dataclass(slots=True)
class WorkerStats:
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    prefix_cache_blocks: int = 0  # blocks named in the prefix cache
    prefix_cache_evictions: int = 0  # cached blocks whose memory went to other rows, since start
    steps_by_path: dict[str, int] = field(default_factory=dict)  # forwards by the path they took, since start
    kernels: str = ""  # what runs the linears: "int8-avx512vnni", "float-avx2", "torch", "vllm" ("" unknown)


class Sink(Protocol):
    def outputs(self, outputs: list[RequestOutput], stats: WorkerStats) -> None:
        """One step's outputs (possibly none) and the engine's state after it."""

    def failed(self, request_id: str, error: Exception) -> None:
        """The request ended in an error; nothing more will come for it."""


class EngineBackend(Protocol):
    """What a worker drives: the native `Engine`, or `backends.vllm_engine.VllmEngine`."""

    model_name: str
    tokenizer: object
    max_model_len: int
    vocab_size: int
    capabilities: frozenset[str]  # request options (and "images") it serves
    requests: dict  # live requests by id
    num_running: int
    num_waiting: int
    kv_usage: float
    prefix_cache_blocks: int
    prefix_cache_evictions: int
    steps_by_path: dict[str, int]
    kernels: str

    def add_request(self, request: GenerationRequest) -> None: ...

    def prepare(self, request: GenerationRequest) -> Future | None:
        """Work to finish off the loop before `add_request` (a grammar's compile), or None."""

    def step(self) -> list[RequestOutput]: ...

    def abort(self, request_id: str) -> bool: ...

    def has_work(self) -> bool: ...


class EngineLoop:
    """Runs `engine.step()` in a thread while there is work; sleeps otherwise."""

    def __init__(self, engine: EngineBackend, sink: Sink, name: str = "engine") -> None:
        self.engine = engine
        self.sink = sink
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._inbox: list[tuple[str, GenerationRequest | str]] = []
        # requests waiting for their preparation (`EngineBackend.prepare`), in arrival order
        self._preparing: dict[str, tuple[GenerationRequest, Future]] = {}
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.broken = False  # the engine could not recover from an error

    def start(self) -> None:
        self._claim()
        self._thread.start()

    def run_here(self) -> None:
        """Run in the calling thread until stopped (instead of `start`): a worker process's first
        thread. libgomp keeps its threads spinning between parallel regions only while its threads
        do not outnumber the cores; a second thread's team counts on top of the first thread's, so
        the same decode step ran 2.4x slower from any other thread (2 threads, 2 cores)."""
        self._claim()
        self._run()

    def _claim(self) -> None:
        with _driven_lock:
            owner = _driven.setdefault(id(self.engine), self)
        if owner is not self:
            raise EngineBusy(f"the engine is already driven by loop {owner._thread.name!r}; stop it first (one loop per engine)")

    def _release(self) -> None:
        with _driven_lock:
            if _driven.get(id(self.engine)) is self:
                del _driven[id(self.engine)]

    def stop(self, timeout: float = 10.0) -> None:
        self._stop = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout)

    def add(self, request: GenerationRequest) -> None:
        self._post("add", request)

    def abort(self, request_id: str) -> None:
        self._post("abort", request_id)

    def stats(self) -> WorkerStats:
        e = self.engine
        return WorkerStats(e.num_running, e.num_waiting, e.kv_usage, e.prefix_cache_blocks, e.prefix_cache_evictions, e.steps_by_path, e.kernels)

    def _post(self, kind: str, item: GenerationRequest | str) -> None:
        with self._lock:
            self._inbox.append((kind, item))
        self._wake.set()

    def _drain_inbox(self) -> bool:
        with self._lock:
            inbox, self._inbox = self._inbox, []
        for kind, item in inbox:
            if kind == "add":
                prepare = getattr(self.engine, "prepare", None)
                pending = prepare(item) if prepare is not None else None
                if pending is None:
                    self._add(item)
                else:  # e.g. a grammar compiling: the other requests keep decoding meanwhile
                    self._preparing[item.request_id] = (item, pending)
                    pending.add_done_callback(lambda _: self._wake.set())
            elif item in self._preparing:
                del self._preparing[item]
                self.sink.outputs([RequestOutput(item, [], "", True, "abort")], self.stats())
            elif not self.engine.abort(item):  # unknown or already finished: still answer the waiter
                self.sink.outputs([RequestOutput(item, [], "", True, "abort")], self.stats())
        ready = [rid for rid, (_, pending) in self._preparing.items() if pending.done()]
        for rid in ready:
            request, pending = self._preparing.pop(rid)
            error = pending.exception()
            if error is None:
                self._add(request)
            else:
                self.sink.failed(rid, EngineError(str(error), "response_format"))
        return bool(inbox) or bool(ready)

    def _add(self, request: GenerationRequest) -> None:
        try:
            self.engine.add_request(request)
        except EngineError as e:
            self.sink.failed(request.request_id, e)

    def _run(self) -> None:
        try:
            self._steps()
        finally:
            self._release()

    def _steps(self) -> None:
        busy = False
        while not self._stop:
            changed = self._drain_inbox()
            if not self.engine.has_work():
                if changed:
                    self.sink.outputs([], self.stats())
                if busy:  # just gone idle: what the steps freed (activations, tables) goes back
                    busy = False
                    release_freed_memory()
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            busy = True
            try:
                outputs = self.engine.step()
            except Exception as e:  # a bug must fail the requests in flight, not hang them
                log.error("engine step failed: %s", traceback.format_exc())
                self._fail_all(e)
                continue
            for failed in [o for o in outputs if o.error is not None]:  # an engine gave up on one request
                outputs.remove(failed)
                self.sink.failed(failed.request_id, RuntimeError(failed.error))
            self.sink.outputs(outputs, self.stats())

    def _fail_all(self, error: Exception) -> None:
        ids = list(self.engine.requests)
        for request_id in ids:
            self.engine.abort(request_id)
        try:
            self.engine.step()  # frees the aborted requests' blocks
        except Exception:
            log.error("engine could not recover: %s", traceback.format_exc())
            self.broken = True
            self._stop = True
        for request_id in ids:
            self.sink.failed(request_id, RuntimeError(f"engine error: {error}"))
