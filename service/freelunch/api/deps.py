"""The API's services, built once per app and handed to the routes as a dependency."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from freelunch.api.building import RequestBuilder
from freelunch.api.formatting import Formatter
from freelunch.api.generation import GenerationRunner
from freelunch.api.metrics import Metrics
from freelunch.pool.pool import WorkerPool


@dataclass(slots=True)
class Services:
    pool: WorkerPool
    metrics: Metrics
    builder: RequestBuilder  # validation, prompts, method options, engine requests
    runner: GenerationRunner  # admission, streams, cancellation, SSE
    formatter: Formatter  # response shapes


def get_services(request: Request) -> Services:
    return request.app.state.services
