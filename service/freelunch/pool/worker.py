"""Engine workers as the pool sees them: submit a request, get its outputs on an asyncio queue.

`ThreadWorker` runs the engine in this process (tests, `--workers 0`); `ProcessWorker`
(process_worker.py) runs it in a child process that can die without taking the server down.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

from freelunch.config import EngineConfig
from freelunch.engine.messages import GenerationRequest, RequestOutput
from freelunch.pool.engine_loop import EngineBackend, EngineLoop, WorkerStats

if TYPE_CHECKING:
    from freelunch.models.loader import LoadedModel

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


class ThreadWorker(Worker):
    """The engine on a thread of this process."""

    def __init__(self, engine: EngineBackend, name: str = "worker-0", backend: str = "native") -> None:
        super().__init__(name)
        self.engine = engine
        self._loop = EngineLoop(engine, self, name)
        self._started = False
        self._served = ServedModel.of(engine, backend)

    @classmethod
    def load(cls, config: EngineConfig, name: str = "worker-0") -> "ThreadWorker":
        return cls(load_engine(config), name, config.engine)

    @property
    def alive(self) -> bool:
        return self._started and not self._loop.broken

    @property
    def served(self) -> ServedModel:
        return self._served

    def start(self) -> None:
        if not self._started:
            self._loop.start()
            self._started = True

    def shutdown(self) -> None:
        self._loop.stop()

    def stats(self) -> WorkerStats:
        return self._loop.stats()

    def _send_add(self, request: GenerationRequest) -> None:
        self._loop.add(request)

    def abort(self, request_id: str) -> None:
        self._loop.abort(request_id)

    # Sink: called from the engine thread
    def outputs(self, outputs: list[RequestOutput], stats: WorkerStats) -> None:
        for out in outputs:
            self.mailboxes.deliver(out.request_id, out, last=out.finished)

    def failed(self, request_id: str, error: Exception) -> None:
        self.mailboxes.deliver(request_id, error, last=True)


def load_engine(config: EngineConfig) -> EngineBackend:
    import torch

    from freelunch.constraints.masks import install_constraints
    from freelunch.methods import load_methods

    install_constraints()  # structured outputs and logit bias
    load_methods()  # the installed decoding methods, into the engine's registry
    from freelunch.engine.engine import Engine
    from freelunch.memory import release_freed_memory
    from freelunch.models.loader import load_model, resolve_source

    if config.engine == "vllm":
        from freelunch.backends.vllm_engine import VllmEngine

        return VllmEngine(config)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    loaded = load_model(
        resolve_source(config.model, config.served_model_name), config.dtype, config.device, config.quantization,
        config.activations,
    )
    log_kernels(loaded)
    engine = Engine(loaded, config)
    release_freed_memory()  # what building the engine freed (the loader trims what loading freed)
    return engine


def log_kernels(loaded: LoadedModel) -> None:
    """One line: the CPU's features and which kernels its layers run on."""
    from collections import Counter

    import torch

    from freelunch.cpu_features import cpu_features, cpu_name, isa_level

    layers = Counter(type(m).__name__ for m in loaded.model.modules() if type(m).__name__.endswith("Linear"))
    stack = getattr(loaded.model, "cpu_decoder_stack", lambda: None)()
    log.info(
        "cpu: %s (%s: %s); torch dispatch %s, %d threads; dtype %s, quantization %s, %s activations; kernels %s; "
        "linears: %s; decode steps: %s",
        cpu_name(), isa_level(), " ".join(cpu_features()) or "-", torch.backends.cpu.get_cpu_capability(),
        torch.get_num_threads(), loaded.dtype, loaded.quantization, loaded.activations, loaded.kernels,
        ", ".join(f"{n} {k}" for k, n in layers.most_common()),
        "all layers in one C call" if stack is not None else "layer by layer",
    )  # fmt: skip
