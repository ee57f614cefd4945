"""An engine in this process: loading one (`load_engine`, as a worker process does at start) and
`ThreadWorker`, the engine on a thread of this process (tests, `--workers 0`)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from freelunch.config import EngineConfig
from freelunch.engine.messages import GenerationRequest, RequestOutput
from freelunch.pool.engine_loop import EngineBackend, EngineLoop, WorkerStats
from freelunch.pool.worker import ServedModel, Worker

if TYPE_CHECKING:
    from freelunch.models.loader import LoadedModel

log = logging.getLogger("freelunch.worker")


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


def install_plugins() -> None:
    """What a worker hands the engines it builds (tests, benches and evals too): structured outputs
    and logit bias, and the installed decoding methods, into the engine's registries."""
    from freelunch.constraints.masks import install_constraints
    from freelunch.methods.pipeline import install_methods

    install_constraints()
    install_methods()


def load_engine(config: EngineConfig) -> EngineBackend:
    import torch

    install_plugins()
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
