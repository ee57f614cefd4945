"""An engine in a child process, so that a crash, an OOM kill or a stuck kernel costs only the
requests on that worker. The parent notices the pipe closing, fails those requests with
`WorkerDied`, and starts a replacement.

Nothing here blocks the API's event loop: messages to the child are queued and written by a
writer thread (a child that stops reading fills its pipe, not the event loop's time). The child
sends a heartbeat every HEARTBEAT_S from a thread of its own; a child silent for HEARTBEAT_TIMEOUT_S
(stopped, swapped out, wedged with the GIL held) is marked not ready at once, killed, its requests
failed, and replaced.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

from freelunch.config import EngineConfig
from freelunch.engine.errors import EngineError
from freelunch.engine.messages import GenerationRequest, RequestOutput
from freelunch.pool import wire
from freelunch.pool.engine_loop import EngineLoop, WorkerStats
from freelunch.pool.local_engine import load_engine
from freelunch.pool.worker import ServedModel, Worker, WorkerDied

log = logging.getLogger("freelunch.pool")

_RESTART_BACKOFF = (1.0, 2.0, 5.0, 10.0, 30.0)  # seconds before the n-th consecutive restart
HEARTBEAT_S = 0.5
HEARTBEAT_TIMEOUT_S = 5.0  # a loaded worker silent this long is stuck


class ProcessWorker(Worker):
    def __init__(
        self, config: EngineConfig, tokenizer: object | None, name: str = "worker-0", log_level: str = "INFO"
    ) -> None:
        """`config.model` should already be a folder (GGUFs converted by the parent, once). The
        tokenizer may follow (`set_tokenizer`): the parent loads its own while the worker starts."""
        super().__init__(name)
        self.config = config
        self.tokenizer = tokenizer
        self._tokenizer_set = threading.Event()
        if tokenizer is not None:
            self._tokenizer_set.set()
        self.log_level = log_level
        self._ctx = mp.get_context("spawn")  # fork would copy the parent's threads and torch state
        self._send_lock = threading.Lock()
        self._outbox: queue.SimpleQueue[bytes | None] | None = None  # the writer thread's, per child
        self._conn: Connection | None = None
        self._proc = None
        self._ready = threading.Event()
        self._served: ServedModel | None = None
        self._stats = WorkerStats()
        self._fatal: str | None = None
        self._stopping = False
        self._failures_in_a_row = 0

    # ---- lifetime ------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._ready.is_set() and not self._stopping

    @property
    def served(self) -> ServedModel | None:
        return self._served

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None else None

    def start(self) -> None:
        if self._proc is None:
            self._spawn()

    def wait_ready(self, timeout: float) -> ServedModel:
        """Block until the first load finishes; raise if the worker cannot load."""
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.2):
            if self._fatal is not None:
                raise RuntimeError(f"{self.name} failed to load the model: {self._fatal}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not load the model within {timeout:.0f} s")
        return self._served

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping = True
        proc = self._proc
        if proc is None:
            return
        try:
            self._send(wire.encode(wire.SHUTDOWN))
        except (OSError, ValueError):
            pass
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join(5)

    def _spawn(self) -> None:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=run_worker_process, args=(self.config, child_conn, self.name, self.log_level), name=self.name, daemon=True
        )
        proc.start()
        child_conn.close()  # the child holds its end; ours closing would hide its death
        outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        with self._send_lock:
            self._conn, self._proc, self._outbox = parent_conn, proc, outbox
        threading.Thread(target=self._read, args=(parent_conn, proc), name=f"{self.name}-reader", daemon=True).start()
        threading.Thread(target=_write, args=(parent_conn, outbox), name=f"{self.name}-writer", daemon=True).start()

    def set_tokenizer(self, tokenizer: object) -> None:
        self.tokenizer = tokenizer
        self._tokenizer_set.set()

    # ---- requests ------------------------------------------------------------------------
    def stats(self) -> WorkerStats:
        return self._stats if self.alive else WorkerStats()

    def _send(self, data: bytes) -> None:
        """Queue `data` for the child (never blocks: the writer thread writes it)."""
        with self._send_lock:
            if self._conn is None or self._outbox is None:
                raise OSError("no worker process")
            self._outbox.put(data)

    def _send_add(self, request: GenerationRequest) -> None:
        if not self.alive:
            raise OSError("not running")
        self._send(wire.encode(wire.ADD, request))

    def abort(self, request_id: str) -> None:
        try:
            self._send(wire.encode(wire.ABORT, request_id))
        except (OSError, ValueError):  # the worker is gone: its requests were failed already
            pass

    # ---- the reader thread ---------------------------------------------------------------
    def _read(self, conn: Connection, proc) -> None:
        heard = time.monotonic()
        while True:
            try:
                if not conn.poll(HEARTBEAT_S):
                    if self._ready.is_set() and time.monotonic() - heard > HEARTBEAT_TIMEOUT_S:
                        self._stuck(proc, time.monotonic() - heard)
                        break
                    continue
                message = wire.decode(conn.recv_bytes())
            except (EOFError, OSError):
                break
            heard = time.monotonic()
            kind = message[0]
            if kind == wire.HEARTBEAT:
                continue
            if kind == wire.STEP:
                for out in wire.as_outputs(message[1]):
                    self.mailboxes.deliver(out.request_id, out, last=out.finished)
                self._stats = wire.as_stats(message[2])
            elif kind == wire.FAILED:
                _, request_id, text, param, invalid = message
                error = EngineError(text, param) if invalid else RuntimeError(text)
                self.mailboxes.deliver(request_id, error, last=True)
            elif kind == wire.READY:
                _, name, max_len, vocab, capabilities = message
                self._tokenizer_set.wait()
                self._served = ServedModel(name, self.tokenizer, max_len, vocab, frozenset(capabilities), self.config.engine)
                self._failures_in_a_row = 0
                self._ready.set()
                log.info("%s ready (pid %d)", self.name, proc.pid)
            elif kind == wire.FATAL:
                self._fatal = message[1]
        self._on_exit(conn, proc)

    def _stuck(self, proc, silent: float) -> None:
        """The child stopped answering: kill it (SIGKILL ends a stopped process too); the reader
        goes on to `_on_exit`, which marks it not ready, fails its requests and replaces it."""
        log.error("%s (pid %s) sent nothing for %.1f s; killing it", self.name, proc.pid, silent)
        proc.kill()

    def _on_exit(self, conn: Connection, proc) -> None:
        was_ready = self._ready.is_set()
        self._ready.clear()
        with self._send_lock:
            self._conn = None
            if self._outbox is not None:
                self._outbox.put(None)  # ends the writer thread
            self._outbox = None
        conn.close()
        proc.join(5)
        code = proc.exitcode
        self._stats = WorkerStats()
        self.mailboxes.fail_all(
            WorkerDied(f"the engine worker serving this request died (exit code {code}); retry the request")
        )
        if self._stopping:
            return
        if not was_ready:
            self._failures_in_a_row += 1
            if self._fatal is not None:  # a load error would repeat forever: leave it dead and say why
                log.error("%s cannot load the model: %s", self.name, self._fatal)
                return
        log.error("%s (pid %s) exited with code %s; starting a replacement", self.name, proc.pid, code)
        delay = _RESTART_BACKOFF[min(self._failures_in_a_row, len(_RESTART_BACKOFF) - 1)] if self._failures_in_a_row else 0
        time.sleep(delay)
        if not self._stopping:
            self.restarts += 1
            self._spawn()


def _write(conn: Connection, outbox: queue.SimpleQueue) -> None:
    """The parent's writer thread: queued messages down the pipe, in order, until told to stop
    or the pipe breaks. A child that stops reading blocks this thread only."""
    while True:
        data = outbox.get()
        if data is None:
            return
        try:
            conn.send_bytes(data)
        except (OSError, ValueError):
            return


# ---- the child process --------------------------------------------------------------------
class _PipeSink:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()

    def send(self, data: bytes) -> None:
        with self.lock:
            self.conn.send_bytes(data)

    def outputs(self, outputs: list[RequestOutput], stats: WorkerStats) -> None:
        self.send(wire.encode(wire.STEP, outputs, stats))

    def failed(self, request_id: str, error: Exception) -> None:
        param = getattr(error, "param", None)
        self.send(wire.encode(wire.FAILED, request_id, str(error), param, isinstance(error, EngineError)))


def run_worker_process(config: EngineConfig, conn: Connection, name: str, log_level: str) -> None:
    """Entry point of a worker process: load, announce, then serve adds and aborts until told to stop
    or until the parent goes away (its end of the pipe closes)."""
    # The parent owns shutdown: Ctrl-C or SIGTERM to the process group must not kill in-flight work.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level.upper(), format=f"%(asctime)s %(levelname)s {name}[%(process)d] %(name)s: %(message)s")
    sink = _PipeSink(conn)
    try:
        engine = load_engine(config)
    except Exception as e:  # noqa: BLE001 - whatever stops the load is reported to the parent
        sink.send(wire.encode(wire.FATAL, f"{type(e).__name__}: {e}"))
        return
    loop = EngineLoop(engine, sink, name)
    sink.send(wire.encode(wire.READY, engine.model_name, engine.max_model_len, engine.vocab_size, sorted(engine.capabilities)))
    threading.Thread(target=_read_parent, args=(conn, loop), name=f"{name}-pipe", daemon=True).start()
    threading.Thread(target=_heartbeat, args=(sink, loop), name=f"{name}-heartbeat", daemon=True).start()
    loop.run_here()  # the engine steps in this, the process's first thread (EngineLoop.run_here says why)
    if loop.broken:
        os._exit(1)  # the parent sees the exit and starts a clean replacement


def _heartbeat(sink: _PipeSink, loop: EngineLoop) -> None:
    """Tell the parent this process is alive, every HEARTBEAT_S, while the loop runs."""
    beat = wire.encode(wire.HEARTBEAT)
    while not loop.broken:
        try:
            sink.send(beat)
        except (OSError, ValueError):
            return
        time.sleep(HEARTBEAT_S)


def _read_parent(conn: Connection, loop: EngineLoop) -> None:
    """Hand the parent's adds and aborts to the engine loop; stop it when told to or when the
    parent goes away (its end of the pipe closes)."""
    while not loop.broken:
        try:
            if not conn.poll(1.0):
                continue
            message = wire.decode(conn.recv_bytes())
        except (EOFError, OSError):
            break
        if message[0] == wire.ADD:
            loop.add(wire.as_request(message[1]))
        elif message[0] == wire.ABORT:
            loop.abort(message[1])
        elif message[0] == wire.SHUTDOWN:
            break
    loop.stop()


def start_process_workers(
    config: EngineConfig, count: int, log_level: str = "INFO", name_prefix: str = ""
) -> tuple[list[ProcessWorker], Callable[[float], None]]:
    """Resolve the model once here (a GGUF is converted to a folder before any worker starts, so
    they do not race to convert it) and start `count` workers. Returns them and `wait(timeout)`,
    which loads the API process's tokenizer while the workers load (start-up takes the longer of
    the two, not their sum), then blocks until every worker has loaded. CPU threads are split
    between the workers."""
    from dataclasses import replace

    from freelunch.models.loader import load_tokenizer, resolve_source

    # with a read-only cache, each worker reads the GGUF itself
    source = resolve_source(config.model, config.served_model_name).as_folder()
    # Every core for the model: the API process needs ~3% of a core for one stream (0.16-0.22 CPU s
    # over a 5-8 s, 256-token stream, AVX2 EPYC, 2 cores), and a worker's engine steps run in its
    # first thread (EngineLoop.run_here), where OpenMP's threads keep spinning between regions.
    # Through HTTP, 2 cores: 52 tok/s with 2 threads against 33-44 with 1 (default model, gguf).
    threads = config.num_threads or max(1, (os.cpu_count() or 1) // count)
    config = replace(config, model=str(source.path), served_model_name=source.served_name, num_threads=threads)
    workers = [ProcessWorker(config, None, f"{name_prefix}worker-{i}", log_level) for i in range(count)]
    for w in workers:
        w.start()

    def wait(timeout: float) -> None:
        try:
            tokenizer = load_tokenizer(source)
            for w in workers:
                w.set_tokenizer(tokenizer)
            for w in workers:
                w.wait_ready(timeout)
        except BaseException:
            for w in workers:
                w.shutdown(timeout=2)
            raise

    return workers, wait
