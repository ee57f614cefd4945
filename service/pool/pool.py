"""The pool the API talks to: dispatch to the least-loaded worker, stream outputs, abort on exit."""

from __future__ import annotations

from collections.abc import AsyncIterator

from freelunch.engine.request import GenerationRequest, RequestOutput
from freelunch.pool.worker import EngineWorker, WorkerStats


class WorkerPool:
    def __init__(self, workers: list[EngineWorker]) -> None:
        if not workers:
            raise ValueError("a pool needs at least one worker")
        self.workers = workers
        first = workers[0].engine
        self.model_name = first.info.name
        self.tokenizer = first.tokenizer
        self.max_model_len = first.max_model_len
        self.model_info = first.info

    def start(self) -> None:
        for w in self.workers:
            w.start()

    def shutdown(self) -> None:
        for w in self.workers:
            w.shutdown()

    @property
    def ready(self) -> bool:
        return any(w.alive for w in self.workers)

    def models(self) -> list[str]:
        return [self.model_name]

    def stats(self) -> WorkerStats:
        parts = [w.stats() for w in self.workers]
        return WorkerStats(
            sum(p.running for p in parts),
            sum(p.waiting for p in parts),
            sum(p.kv_usage for p in parts) / len(parts),
        )

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs. Leaving early (client gone, error) aborts it on its worker."""
        worker = min((w for w in self.workers if w.alive), key=lambda w: w.load_score, default=None)
        if worker is None:
            raise RuntimeError("no engine worker is available")
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
