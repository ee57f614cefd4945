"""The pool the API talks to: admission (a bounded queue), dispatch to the least-loaded live
worker that serves the request's options, output streaming, abort when the caller leaves.

A mixed pool (`--engine vllm --native-workers N`) holds workers of two backends: requests go to
the primary backend (the first worker's) when it serves all their options, else to a worker of
the other backend that does."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

from freelunch.engine.messages import GenerationRequest, RequestOutput
from freelunch.pool.engine_loop import WorkerStats
from freelunch.pool.worker import ServedModel, Worker, WorkerDied


def request_needs(request: GenerationRequest) -> frozenset[str]:
    """What a worker must serve to run `request`: its method options, images if it has any, a
    constraint (structured output, logit_bias) if it has one, and each option with it."""
    needs = set(request.methods) | ({"images"} if request.images else set())
    if request.constraint is not None or request.logit_bias:
        needs |= {"constraint"} | {f"{name}+constraint" for name in request.methods}
    return frozenset(needs)


class Together:
    """The worker the choices of one API request share (the first choice's pick): they share
    their prompt's KV blocks there, and losing it fails the request once."""

    __slots__ = ("worker",)

    def __init__(self) -> None:
        self.worker: Worker | None = None


class PoolOverloaded(RuntimeError):
    """More requests in flight than the workers run plus the queue holds (the API answers 429)."""


class PoolUnavailable(RuntimeError):
    """No live worker, or the server is shutting down (the API answers 503)."""


@dataclass(slots=True)
class WorkerState:
    name: str
    alive: bool
    in_flight: int
    restarts: int
    pid: int | None  # its process (None: a thread of the API process)


class WorkerPool:
    def __init__(self, workers: list[Worker], max_in_flight: int | None = None) -> None:
        """`max_in_flight`: engine requests (choices) admitted at once, running or queued;
        None = unbounded."""
        if not workers:
            raise ValueError("a pool needs at least one worker")
        served = workers[0].served
        if served is None:
            raise ValueError("start the workers and wait until they have loaded before building the pool")
        self.workers = workers
        self.served: ServedModel = served  # the primary backend's; every worker serves the same model
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.draining = False
        self.cut: asyncio.Event | None = None  # set at the drain deadline: generations still running end

    def start(self) -> None:
        """Start the workers; call from the event loop that serves."""
        self.cut = asyncio.Event()
        for w in self.workers:
            w.start()

    def cut_all(self) -> None:
        """End every generation in flight (the drain deadline passed); they report why."""
        if self.cut is not None:
            self.cut.set()

    def shutdown(self) -> None:
        for w in self.workers:
            w.shutdown()

    @property
    def ready(self) -> bool:
        return not self.draining and any(w.alive for w in self.workers)

    @property
    def degraded(self) -> bool:
        return not all(w.alive for w in self.workers)

    def models(self) -> list[str]:
        return [self.served.name]

    def stats(self) -> WorkerStats:
        parts = [w.stats() for w in self.workers]
        running, waiting = sum(p.running for p in parts), sum(p.waiting for p in parts)
        # admitted choices no engine knows of yet (in the pipe, or between steps) wait too
        queued = max(0, self.in_flight - running - waiting)
        return WorkerStats(
            running,
            waiting + queued,
            sum(p.kv_usage for p in parts) / len(parts),
            sum(p.prefix_cache_blocks for p in parts),
            sum(p.prefix_cache_evictions for p in parts),
            _summed(p.steps_by_path for p in parts),
            ",".join(sorted({p.kernels for p in parts if p.kernels})),
        )

    def worker_states(self) -> list[WorkerState]:
        return [WorkerState(w.name, w.alive, w.load_score, w.restarts, w.pid) for w in self.workers]

    @property
    def capabilities(self) -> frozenset[str]:
        """What some worker of this pool serves (options, images) or its model has (moe, vision)."""
        return frozenset().union(*(w.served.capabilities for w in self.workers if w.served is not None))

    def unsupported(self, request: GenerationRequest) -> str | None:
        """The first option (or "images") of `request` that no worker of this pool serves."""
        served = self.capabilities
        return next((need for need in sorted(request_needs(request)) if need not in served), None)

    def pick(self, request: GenerationRequest) -> Worker | None:
        """The least-loaded live worker that serves the request, primary backend first."""
        needs = request_needs(request)
        able = [w for w in self.workers if w.alive and w.served is not None and needs <= w.served.capabilities]
        primary = [w for w in able if w.served.backend == self.served.backend]
        return min(primary or able, key=lambda w: w.load_score, default=None)

    def would_refuse(self, count: int) -> bool:
        """Whether `admit(count)` would refuse right now for lack of room: checked before any
        tokenising, so that a refusal under a burst stays cheap (admit still decides)."""
        return self.max_in_flight is not None and self.in_flight + count > self.max_in_flight >= count

    def admit(self, count: int) -> None:
        """Reserve room for `count` choices, or refuse. Pair with `release(count)`."""
        if self.draining:
            raise PoolUnavailable("the server is shutting down; retry on another replica")
        if not any(w.alive for w in self.workers):
            raise PoolUnavailable("no engine worker is available (restarting); retry shortly")
        if self.max_in_flight is not None:
            if count > self.max_in_flight:
                raise ValueError(f"the request asks for {count} generations; this server runs at most {self.max_in_flight} at once")
            if self.in_flight + count > self.max_in_flight:
                raise PoolOverloaded(f"the server is at capacity ({self.in_flight} generations in flight); retry shortly")
        self.in_flight += count

    def release(self, count: int) -> None:
        self.in_flight -= count

    async def generate(self, request: GenerationRequest, together: Together | None = None) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs, on the least-loaded worker that serves it, or on the one
        the other choices of its API request went to (`together`). Leaving early (client gone,
        error) aborts it on its worker."""
        worker = together.worker if together is not None and together.worker is not None and together.worker.alive else None
        if worker is None:
            worker = self.pick(request)  # and submitted below before any await: the next pick sees its load
            if together is not None:
                together.worker = worker
        if worker is None:
            raise WorkerDied("no engine worker is available (restarting); retry shortly")
        queue = worker.submit(request)
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, Exception):
                    finished = True
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                worker.abort(request.request_id)


def _summed(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    """Counts added by key (zeros kept: a Counter's sum drops them)."""
    total: dict[str, int] = {}
    for part in counts:
        for key, n in part.items():
            total[key] = total.get(key, 0) + n
    return total
