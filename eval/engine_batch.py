"""Run a batch of requests through one engine, as the evaluation scripts do (shared by them)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from freelunch.engine.engine import Engine
from freelunch.engine.request import GenerationRequest


@dataclass(slots=True)
class Result:
    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None
    started: float = 0.0
    first_token: float | None = None
    finished: float = 0.0


def run(engine: Engine, requests: list[GenerationRequest]) -> dict[str, Result]:
    """Add every request at once (continuous batching) and step until all are done."""
    results: dict[str, Result] = {}
    for r in requests:
        results[r.request_id] = Result(started=time.perf_counter())
        engine.add_request(r)
    while engine.has_work():
        for out in engine.step():
            res = results[out.request_id]
            if out.error:
                raise RuntimeError(f"{out.request_id}: {out.error}")
            if out.new_token_ids and res.first_token is None:
                res.first_token = time.perf_counter()
            res.text += out.new_text
            res.tokens = out.num_output_tokens
            if out.finished:
                res.finish_reason = out.finish_reason
                res.finished = time.perf_counter()
    engine.check_no_leaks()
    return results
