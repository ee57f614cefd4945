"""Engine workers as the pool sees them: submit a request, get its outputs on an asyncio queue.

`ThreadWorker` (local_engine.py) runs the engine in this process (tests, `--workers 0`);
`ProcessWorker` (process_worker.py) runs it in a child process that can die without taking the
server down. This module is the API process's side and imports no engine.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass

from freelunch.engine.messages import GenerationRequest, RequestOutput
from freelunch.pool.engine_loop import EngineBackend, WorkerStats

log = logging.getLogger("freelunch.worker")


class WorkerDied(RuntimeError):
    """The worker serving a request went away; the request cannot finish (the API answers 503)."""


@dataclass(frozen=True, slots=True)
class ServedModel:
    """What the API process needs to know about the model a worker serves."""

    name: str
    tokenizer: object
    max_model_len: int
    vocab_size: int
    capabilities: frozenset[str] = frozenset()  # request options (and "images") its engine serves
    backend: str = "native"

    @classmethod
    def of(cls, engine: EngineBackend, backend: str) -> "ServedModel":
        return cls(engine.model_name, engine.tokenizer, engine.max_model_len, engine.vocab_size, frozenset(engine.capabilities), backend)


class Mailboxes:
    """Per-request asyncio queues, filled from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}

    def __len__(self) -> int:
        return len(self._queues)

    def open(self, request_id: str) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._queues[request_id] = (asyncio.get_running_loop(), queue)
        return queue

    def deliver(self, request_id: str, item: RequestOutput | Exception, last: bool) -> None:
        with self._lock:
            entry = self._queues.pop(request_id, None) if last else self._queues.get(request_id)
        if entry is not None:
            loop, queue = entry
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone (shutdown)
                pass

    def fail_all(self, error: Exception) -> None:
        with self._lock:
            ids = list(self._queues)
        for request_id in ids:
            self.deliver(request_id, error, last=True)


class Worker(ABC):
    """One engine, in this process or another."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.mailboxes = Mailboxes()
        self.restarts = 0  # replacements started after the worker died

    @property
    @abstractmethod
    def alive(self) -> bool:
        """Accepting requests now."""

    @property
    @abstractmethod
    def served(self) -> ServedModel | None:
        """The model, once loaded."""

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def shutdown(self) -> None: ...

    @abstractmethod
    def stats(self) -> WorkerStats: ...

    @abstractmethod
    def _send_add(self, request: GenerationRequest) -> None: ...

    @abstractmethod
    def abort(self, request_id: str) -> None: ...

    @property
    def pid(self) -> int | None:
        """The worker's own process (None for an engine on a thread of this one)."""
        return None

    @property
    def load_score(self) -> int:
        return len(self.mailboxes)

    def submit(self, request: GenerationRequest) -> asyncio.Queue:
        """Queue a request; its outputs (or an exception, last) arrive on the returned queue."""
        queue = self.mailboxes.open(request.request_id)
        try:
            self._send_add(request)
        except OSError as e:  # the worker's pipe broke between the check and now
            self.mailboxes.deliver(request.request_id, WorkerDied(f"engine worker {self.name} is gone: {e}"), True)
        except Exception as e:  # noqa: BLE001 - any other failure to hand it over: the request ends, its mailbox closes
            self.mailboxes.deliver(request.request_id, RuntimeError(f"could not hand the request to {self.name}: {e}"), True)
        return queue
