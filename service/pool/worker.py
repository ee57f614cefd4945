"""An engine worker: one engine driven by a background thread, fed through a thread-safe inbox.

The asyncio side submits requests and receives `RequestOutput`s on a per-request queue.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import traceback
from dataclasses import dataclass

from freelunch.config import EngineConfig
from freelunch.engine.engine import Engine, EngineError
from freelunch.engine.request import GenerationRequest, RequestOutput

log = logging.getLogger("freelunch.worker")


@dataclass(slots=True)
class WorkerStats:
    running: int
    waiting: int
    kv_usage: float


class EngineWorker:
    """Runs `Engine.step()` in a thread while there is work; idle otherwise."""

    def __init__(self, engine: Engine, name: str = "worker-0") -> None:
        self.engine = engine
        self.name = name
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._inbox: list[tuple[str, object]] = []
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.alive = False

    @classmethod
    def load(cls, config: EngineConfig, name: str = "worker-0") -> "EngineWorker":
        import torch

        from freelunch.models.loader import load_model, resolve_source

        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        loaded = load_model(resolve_source(config.model, config.served_model_name), config.dtype, config.device)
        return cls(Engine(loaded, config), name)

    def start(self) -> None:
        self.alive = True
        self._thread.start()

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    @property
    def load_score(self) -> int:
        return len(self._queues)

    def stats(self) -> WorkerStats:
        return WorkerStats(self.engine.num_running, self.engine.num_waiting, self.engine.blocks.usage)

    def submit(self, request: GenerationRequest) -> asyncio.Queue:
        """Queue a request; its outputs (or an exception) arrive on the returned queue."""
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._queues[request.request_id] = (asyncio.get_running_loop(), queue)
            self._inbox.append(("add", request))
        self._wake.set()
        return queue

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._inbox.append(("abort", request_id))
        self._wake.set()

    # ---- the thread ----------------------------------------------------------------------
    def _deliver(self, request_id: str, item: RequestOutput | Exception, last: bool) -> None:
        with self._lock:
            entry = self._queues.pop(request_id, None) if last else self._queues.get(request_id)
        if entry is not None:
            loop, queue = entry
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone (shutdown)
                pass

    def _drain_inbox(self) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
        for kind, item in inbox:
            if kind == "add":
                try:
                    self.engine.add_request(item)
                except EngineError as e:
                    self._deliver(item.request_id, e, last=True)
            elif not self.engine.abort(item):
                self._deliver(item, RequestOutput(item, [], "", True, "abort"), last=True)

    def _loop(self) -> None:
        while not self._stop:
            self._drain_inbox()
            if not self.engine.has_work():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a bug must fail the requests in flight, not hang them
                log.error("engine step failed: %s", traceback.format_exc())
                self._fail_all(e)
                continue
            for out in outputs:
                self._deliver(out.request_id, out, last=out.finished)
        self.alive = False

    def _fail_all(self, error: Exception) -> None:
        for request_id in list(self.engine.requests):
            self.engine.abort(request_id)
        try:
            self.engine.step()  # frees the aborted requests' blocks
        except Exception:
            log.error("engine could not recover: %s", traceback.format_exc())
            self.alive = False
            self._stop = True
        with self._lock:
            ids = list(self._queues)
        for request_id in ids:
            self._deliver(request_id, RuntimeError(f"engine error: {error}"), last=True)
