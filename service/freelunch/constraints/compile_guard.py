"""The API's check that a request's grammar compiles, in child processes under a hard limit.

Compiling is where a hostile schema costs: xgrammar spends seconds (or minutes) on arrays nested a
thousand deep, and a compile on a thread cannot be stopped. So the API compiles each new grammar
once, in a child process at a lower CPU priority, and keeps only the verdict:

- a compile past `timeout_s` of CPU time kills its process: the work stops, the request gets its 400, and a
  fresh process takes the next grammar;
- one compile per grammar at a time, however many requests ask (the others await its verdict),
  and one per client at a time (its API key, else its address): a client sending many new
  grammars waits behind its own compiles and holds at most one of the `processes` slots, so
  another client's new grammar waits only while `processes` other clients compile at once;
- verdicts are remembered by the grammar's digest: compiled ones (so a repeated schema is admitted
  at once), refused ones for `refused_ttl_s` (so a refused schema sent again is refused at once,
  never handed to a worker). The API holds no compiled grammar: workers compile their own, off
  their engine loop (constraints/masks.py), knowing that it finishes in time.

Messages to the children are msgpack (msgspec), never pickle.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import multiprocessing as mp
import os
import signal
import time
from collections import OrderedDict
from multiprocessing.connection import Connection
from typing import Any

import anyio
import msgspec

from freelunch.constraints.grammar import GrammarCompiler, GrammarError, clean_error, compile_spec, lower_priority
from freelunch.engine.messages import ConstraintSpec

log = logging.getLogger("freelunch.grammar")

CHILD_NICENESS = 19  # compiles yield the CPU to decoding
WALL_LIMIT_FACTOR = 4  # a compile starved of CPU still ends at this many times its limit
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
VERDICTS_KEPT = 4096  # digests of compiled and of refused grammars, each
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode


class GrammarTimeout(GrammarError):
    """The grammar did not compile within the limit (its compile was stopped)."""


def digest(spec: ConstraintSpec) -> bytes:
    return hashlib.blake2b(_encode(GrammarCompiler.key(spec)), digest_size=16).digest()


def _cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) a process has used, from /proc (None where there is none)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICKS


class _Child:
    """One compile process and its pipe."""

    def __init__(self, ctx: Any, tokenizer_info: str) -> None:
        self.conn, child_end = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_serve, args=(child_end, tokenizer_info), name="grammar-compiler", daemon=True)
        self.proc.start()
        # at once, from here: its start-up (importing torch and xgrammar) yields the CPU too
        lower_priority(self.proc.pid, CHILD_NICENESS)
        child_end.close()

    def ask(self, spec: ConstraintSpec, timeout_s: float) -> tuple[str, str]:
        """("ok" | "error" | "timeout", detail). Blocking: runs on a thread. The limit is the
        compile's own CPU time, so that a busy server (the child runs at a lower priority) does
        not refuse a grammar it would compile in time when idle; the wall clock stops it at
        WALL_LIMIT_FACTOR times the limit whatever the load."""
        start, cpu_start = time.monotonic(), _cpu_seconds(self.proc.pid)
        self.conn.send_bytes(_encode(GrammarCompiler.key(spec)))
        while not self.conn.poll(0.05):
            cpu = _cpu_seconds(self.proc.pid)
            used = cpu - cpu_start if cpu is not None and cpu_start is not None else time.monotonic() - start
            if used > timeout_s or time.monotonic() - start > WALL_LIMIT_FACTOR * timeout_s:
                return "timeout", ""
        kind, detail = _decode(self.conn.recv_bytes())
        return kind, detail

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(5)
        self.conn.close()


class CompileGuard:
    def __init__(self, tokenizer_info: str, timeout_s: float, processes: int = 2, refused_ttl_s: float = 600.0) -> None:
        """`tokenizer_info`: xgrammar's TokenizerInfo as JSON (`serialize_json`)."""
        self.tokenizer_info = tokenizer_info
        self.timeout_s = timeout_s
        self.refused_ttl_s = refused_ttl_s
        self._ctx = mp.get_context("spawn")
        self._idle: list[_Child] = []
        self._slots = asyncio.Semaphore(processes)
        self._compiled: OrderedDict[bytes, None] = OrderedDict()
        self._refused: OrderedDict[bytes, tuple[float, str, bool]] = OrderedDict()  # expiry, message, timed out
        self._pending: dict[bytes, asyncio.Future[None]] = {}
        self._clients: dict[str, tuple[asyncio.Lock, int]] = {}  # one compile at a time per client; its users
        self._tasks: set[asyncio.Task] = set()
        self.compiles = self.timeouts = 0

    async def check(self, spec: ConstraintSpec, client: str = "") -> bool:
        """Return whether the verdict was remembered (a cache hit); raise GrammarError (or
        GrammarTimeout) for a grammar that does not compile, or not in time."""
        key = digest(spec)
        if key in self._compiled:
            self._compiled.move_to_end(key)
            return True
        refused = self._refused.get(key)
        if refused is not None and refused[0] > time.monotonic():
            raise (GrammarTimeout if refused[2] else GrammarError)(refused[1])
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = asyncio.get_running_loop().create_future()
            task = asyncio.ensure_future(self._compile(key, spec, pending, client))
            self._tasks.add(task)  # a reference, so that the loop does not drop it mid-compile
            task.add_done_callback(self._tasks.discard)
        await asyncio.shield(pending)  # a caller that leaves does not stop the verdict the others await
        return False

    async def _compile(self, key: bytes, spec: ConstraintSpec, verdict: asyncio.Future[None], client: str) -> None:
        lock, users = self._clients.get(client, (asyncio.Lock(), 0))
        self._clients[client] = (lock, users + 1)
        try:
            async with lock, self._slots:
                child = self._idle.pop() if self._idle else await self._spawn()
                try:
                    kind, detail = await anyio.to_thread.run_sync(child.ask, spec, self.timeout_s)
                except (OSError, EOFError, ValueError) as e:  # the child died (killed from outside, out of memory)
                    kind, detail = "error", f"the grammar compiler failed ({type(e).__name__}); simplify the grammar"
                    await anyio.to_thread.run_sync(child.kill)
                else:
                    if kind == "timeout":
                        await anyio.to_thread.run_sync(child.kill)  # stops the compile
                    else:
                        self._idle.append(child)
            self.compiles += 1
            if kind == "ok":
                self._remember(self._compiled, key, None)
                verdict.set_result(None)
                return
            timed_out = kind == "timeout"
            self.timeouts += timed_out
            message = f"did not compile within {self.timeout_s:g} s: simplify it" if timed_out else detail
            self._remember(self._refused, key, (time.monotonic() + self.refused_ttl_s, message, timed_out))
            verdict.set_exception((GrammarTimeout if timed_out else GrammarError)(message))
        except BaseException as e:  # never leave the awaiting requests hanging
            if not verdict.done():
                verdict.set_exception(GrammarError(f"the grammar could not be checked: {type(e).__name__}"))
            raise
        finally:
            self._pending.pop(key, None)
            lock, users = self._clients[client]
            if users > 1:
                self._clients[client] = (lock, users - 1)
            else:
                del self._clients[client]
            if verdict.done() and not verdict.cancelled():
                verdict.exception()  # retrieved: a verdict nobody awaits any more logs nothing

    async def _spawn(self) -> _Child:
        return await anyio.to_thread.run_sync(_Child, self._ctx, self.tokenizer_info)

    async def start(self) -> None:
        """Start one compile process ahead of the first grammar (it imports torch and xgrammar:
        seconds, at the lowest priority), so that the first structured request does not wait."""
        if not self._idle:
            self._idle.append(await self._spawn())

    @staticmethod
    def _remember(table: OrderedDict, key: bytes, value: Any) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > VERDICTS_KEPT:
            table.popitem(last=False)

    def close(self) -> None:
        for child in self._idle:
            child.kill()
        self._idle.clear()


def _serve(conn: Connection, tokenizer_info: str) -> None:
    """A compile process: grammars in, verdicts out, until the parent closes the pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    import xgrammar as xgr

    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.deserialize_json(tokenizer_info), max_threads=1, cache_enabled=False)
    while True:
        try:
            kind, value, whitespace = _decode(conn.recv_bytes())
        except (EOFError, OSError):
            return
        try:
            compile_spec(compiler, ConstraintSpec(kind, value, whitespace))
            conn.send_bytes(_encode(["ok", ""]))
        except GrammarError as e:
            conn.send_bytes(_encode(["error", str(e)]))
        except Exception as e:  # noqa: BLE001 - xgrammar's own failures are verdicts too
            conn.send_bytes(_encode(["error", clean_error(f"the grammar cannot be compiled: {e}")]))
