"""No schema can stall decoding: the API compiles each new grammar once, in a child process it kills
past the limit, and remembers the verdict; a worker compiles off its engine loop, so the other
requests keep decoding meanwhile; compiled grammars are bounded in bytes; errors carry no build
paths or echoed schemas."""

from __future__ import annotations

import asyncio
import json
import os
import time

import httpx
import pytest
from freelunch.config import EngineConfig
from freelunch.constraints.compile_guard import CompileGuard, GrammarTimeout
from freelunch.constraints.grammar import GrammarCompiler, GrammarError, clean_error, tokenizer_info_json
from freelunch.engine.engine import Engine
from freelunch.engine.request import ConstraintSpec, GenerationRequest, RequestOutput, SamplingParams
from freelunch.pool.engine_loop import EngineLoop, WorkerStats

CHAT = "/v1/chat/completions"


def deep_arrays(depth: int) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


# "any" whitespace between deeply nested arrays: about a second of xgrammar's time on 2 cores
SLOW = ConstraintSpec("json_schema", json.dumps(deep_arrays(300)), "any")
QUICK = ConstraintSpec("json_schema", json.dumps({"type": "object", "properties": {"a": {"type": "boolean"}}}))


@pytest.fixture(scope="module")
def tokenizer_info(loaded):
    return tokenizer_info_json(loaded.tokenizer, loaded.model.config.vocab_size)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_compile_past_the_limit_is_stopped_and_its_refusal_remembered(tokenizer_info):
    async def scenario():
        guard = CompileGuard(tokenizer_info, timeout_s=0.3, processes=1, refused_ttl_s=60)
        try:
            assert await guard.check(QUICK) is False  # compiled now (and the child process started)
            assert await guard.check(QUICK) is True  # remembered
            child = guard._idle[0].proc
            start = time.monotonic()
            with pytest.raises(GrammarTimeout):
                await guard.check(SLOW)
            assert time.monotonic() - start < 3
            child.join(5)
            assert not _alive(child.pid), "the compile past the limit was killed, not left running"
            compiles = guard.compiles
            start = time.monotonic()
            with pytest.raises(GrammarTimeout):
                await guard.check(SLOW)  # sent again: refused from memory, no second compile
            assert time.monotonic() - start < 0.05 and guard.compiles == compiles
            assert await guard.check(QUICK) is True  # a fresh process serves the next grammar
            other = ConstraintSpec("regex", "[a-z]{3}")
            assert await guard.check(other) is False
        finally:
            guard.close()

    asyncio.run(scenario())


def test_one_compile_per_grammar_however_many_requests_ask(tokenizer_info):
    async def scenario():
        guard = CompileGuard(tokenizer_info, timeout_s=10, processes=2)
        try:
            spec = ConstraintSpec("json_schema", json.dumps(deep_arrays(40)))
            results = await asyncio.gather(*(guard.check(spec) for _ in range(8)))
            assert guard.compiles == 1 and results == [False] * 8
            bad = ConstraintSpec("grammar", "root ::= x")
            outcomes = await asyncio.gather(*(guard.check(bad) for _ in range(4)), return_exceptions=True)
            assert all(isinstance(o, GrammarError) for o in outcomes) and guard.compiles == 2
        finally:
            guard.close()

    asyncio.run(scenario())


class _Sink:
    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {}
        self.errors: dict[str, Exception] = {}

    def outputs(self, outputs: list[RequestOutput], stats: WorkerStats) -> None:
        for o in outputs:
            self.times.setdefault(o.request_id, []).append(time.monotonic())

    def failed(self, request_id: str, error: Exception) -> None:
        self.errors[request_id] = error


def test_an_engine_loop_keeps_decoding_while_a_grammar_compiles(loaded):
    """The slow grammar compiles on the worker's compile thread; the plain stream beside it never
    waits for that compile (its gaps stay far below the compile's time)."""
    engine = Engine(loaded, EngineConfig(kv_cache_gib=0.05, max_model_len=512))
    sink = _Sink()
    loop = EngineLoop(engine, sink, "test-loop")
    loop.start()
    try:
        ids = loaded.tokenizer.encode("hello")
        loop.add(GenerationRequest("plain", ids, SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)))
        time.sleep(0.2)
        start = time.monotonic()
        loop.add(GenerationRequest("slow", ids, SamplingParams(max_tokens=3, temperature=0), constraint=SLOW))
        deadline = time.monotonic() + 60
        while "slow" not in sink.times and "slow" not in sink.errors and time.monotonic() < deadline:
            time.sleep(0.05)
        compile_s = time.monotonic() - start
        assert "slow" in sink.times, sink.errors
        during = [t for t in sink.times["plain"] if start <= t <= start + compile_s]
        gaps = [b - a for a, b in zip(during, during[1:])]
        assert compile_s > 0.5 and len(during) > 5, (compile_s, len(during))
        assert max(gaps) < compile_s / 3, (max(gaps), compile_s)
    finally:
        loop.stop()


def test_compiled_grammars_are_bounded_in_bytes(loaded):
    compiler = GrammarCompiler(loaded.tokenizer, loaded.model.config.vocab_size, cache_bytes=1)
    first = compiler.compile(QUICK)
    assert compiler.cached(QUICK) is first
    compiler.compile(ConstraintSpec("regex", "[0-9]+"))
    assert compiler.cached(QUICK) is None, "over the byte bound, the least recently used grammar goes"
    assert len(compiler._cache) == 1


def test_errors_carry_no_build_paths_or_whole_schemas():
    raw = "[07:10:01] /project/cpp/support/recursion_guard.h:36: Maximum recursion depth exceeded " + "x" * 2000
    out = clean_error(raw)
    assert "/project" not in out and ".h:36" not in out and "07:10" not in out and len(out) <= 300


@pytest.mark.parametrize("ref", ["http://example.com/s.json", "file:///etc/passwd", "other.json#/x"])
def test_an_external_ref_is_a_400(server, ref):
    base, *_ = server
    schema = {"type": "object", "properties": {"a": {"$ref": ref}}}
    for field in (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}},
        {"structured_outputs": {"json": schema}},
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": schema}}], "tool_choice": "required"},
    ):
        r = httpx.post(base + CHAT, json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 4} | field)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert "only local references" in error["message"] and error["param"].split(".")[0] in field


def test_a_refused_schema_sent_again_is_refused_at_once_and_never_reaches_a_worker(tiny_llama):
    from freelunch.config import ServerConfig
    from live_server import live_server, tiny_app

    folder, _ = tiny_llama
    app, worker = tiny_app(folder, server_config=ServerConfig(grammar_compile_timeout=0.3))
    # a string bound of the schema's own: xgrammar takes over a second to compile one
    slow = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 600}}, "required": ["s"]}
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 4, "structured_outputs": {"json": slow}}
    with live_server(app) as base:
        r = httpx.post(base + CHAT, json=body, timeout=60)
        assert r.status_code == 400 and "did not compile within 0.3 s" in r.json()["error"]["message"], r.text
        start = time.monotonic()
        again = httpx.post(base + CHAT, json=body, timeout=60)
        assert again.status_code == 400 and time.monotonic() - start < 0.5
        metrics = httpx.get(base + "/metrics").text
        assert 'freelunch_structured_output_refused_total{reason="timeout"} 2.0' in metrics
        assert worker.engine.constraints._compiler is None, "no worker compiled it"
        ok = httpx.post(base + CHAT, json=body | {"structured_outputs": {"json": {"type": "boolean"}}}, timeout=60)
        assert ok.status_code == 200, ok.text
        nested = '{"type": "array", "items": ' * 2000 + "{}" + "}" * 2000  # as a string: no JSON parser limit on the way
        deep = httpx.post(base + CHAT, json=body | {"structured_outputs": {"json": nested}})
        assert deep.status_code == 400 and "deep" in deep.json()["error"]["message"]


def test_a_client_flooding_new_grammars_holds_one_slot(tokenizer_info):
    """One client's slow grammars compile one at a time; another client's grammar starts at once."""
    async def scenario():
        guard = CompileGuard(tokenizer_info, timeout_s=0.5, processes=2)
        try:
            await guard.check(QUICK, "warm")  # the first process is up
            floods = [asyncio.create_task(guard.check(ConstraintSpec("json_schema", json.dumps(deep_arrays(300 + i)), "any"), "attacker"))
                      for i in range(4)]
            await asyncio.sleep(0.2)
            start = time.monotonic()
            assert await guard.check(ConstraintSpec("regex", "[a-z]+@[a-z]+"), "honest") is False
            honest_wait = time.monotonic() - start
            outcomes = await asyncio.gather(*floods, return_exceptions=True)
            assert all(isinstance(o, GrammarTimeout) for o in outcomes)
            assert honest_wait < 3, honest_wait  # a process start, not four compiles of the attacker's
            assert not guard._clients, "idle clients are forgotten"
        finally:
            guard.close()

    asyncio.run(scenario())
