"""`freelunch serve --workers N` as real processes over loopback: load, a worker killed mid-stream,
client disconnects, SIGTERM drain."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from live_server import free_port

MAX_LEN = 2048
LONG = {"prompt": "hello", "max_tokens": MAX_LEN - 8, "ignore_eos": True}


def start_server(folder: Path, workers: int, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [
        sys.executable, "-m", "freelunch.cli", "serve", "--model", str(folder), "--port", str(port),
        "--workers", str(workers), "--threads", "1", "--max-model-len", str(MAX_LEN), "--kv-cache-gib", "0.05",
        "--log-level", "warning", *extra,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        assert proc.poll() is None, "the server exited during start-up"
        try:
            if httpx.get(base + "/ready").status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise TimeoutError("the server did not become ready")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def worker_pids(base: str) -> list[int]:
    """The engine worker processes, as /ready names them."""
    return [w["pid"] for w in httpx.get(base + "/ready").json()["workers"]]


def metric(base: str, name: str) -> float:
    total = 0.0
    for line in httpx.get(base + "/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_for(predicate, timeout: float, step: float = 0.05) -> float:
    """Seconds until `predicate()` held; fails after `timeout`."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, "condition not reached in time"
        time.sleep(step)
    return time.monotonic() - start


async def stream(client: httpx.AsyncClient, path: str, body: dict) -> list[dict | str]:
    """All SSE events of one streamed request, parsed (the last is the string "[DONE]")."""
    events: list[dict | str] = []
    async with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                data = line[6:]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


@pytest.fixture(scope="module")
def pool_server(tiny_llama):
    folder, _ = tiny_llama
    proc, base = start_server(folder, 2)
    yield proc, base, folder.name
    stop_server(proc)


def test_two_worker_processes_serve_dozens_of_mixed_streaming_clients(pool_server):
    proc, base, model = pool_server
    pids = worker_pids(base)
    assert len(set(pids)) == 2 and all(Path(f"/proc/{pid}").exists() for pid in pids)
    chat = [{"role": "user", "content": "Tell me about the sea."}]
    kinds = [
        ("/v1/chat/completions", {"messages": chat, "max_tokens": 24, "temperature": 0}),
        ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0, "n": 2}),
        ("/v1/completions", {"prompt": "The cat", "max_tokens": 24, "temperature": 0.8, "seed": 3, "logprobs": 2}),
        ("/v1/chat/completions", {"messages": chat, "max_tokens": 24, "temperature": 0, "speculative": {"method": "token_recycling"}}),
        ("/v1/chat/completions", {"messages": chat, "max_tokens": 24, "temperature": 0, "guidance": {"scale": 1.5}}),
        ("/v1/completions", {"prompt": "One two three", "max_tokens": 24, "stop": ["e"], "stream_options": {"include_usage": True}}),
    ]

    async def run():
        async with httpx.AsyncClient(base_url=base, timeout=120) as client:
            jobs = [stream(client, *kinds[i % len(kinds)]) for i in range(48)]
            streamed = await asyncio.gather(*jobs)
            # greedy results under load must equal the same request run alone
            alone = {}
            for path, body in kinds[:2] + kinds[3:5]:
                r = await client.post(path, json=body)
                alone[json.dumps(body, sort_keys=True)] = r.json()
            return streamed, alone

    streamed, alone = asyncio.run(run())
    for i, events in enumerate(streamed):
        path, body = kinds[i % len(kinds)]
        assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1]), events[-3:]
        chunks = events[:-1]
        n = body.get("n", 1)
        finished = {c["choices"][0]["index"]: c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]}
        assert sorted(finished) == list(range(n)) and set(finished.values()) <= {"stop", "length"}
        assert all(c["model"] == model and c["id"] == chunks[0]["id"] for c in chunks)
        if "include_usage" in json.dumps(body):
            assert chunks[-1]["usage"]["completion_tokens"] >= 1
        key = json.dumps(body, sort_keys=True)
        if key in alone:
            texts = ["" for _ in range(n)]
            for c in chunks:
                for ch in c["choices"]:
                    texts[ch["index"]] += ch["delta"].get("content", "") if "delta" in ch else ch["text"]
            reference = alone[key]["choices"]
            assert texts == [ch["message"]["content"] if "message" in ch else ch["text"] for ch in reference]
    # nothing leaked: no running requests, no KV blocks held, on either worker
    wait_for(lambda: metric(base, "freelunch_requests_running") == 0 and metric(base, "freelunch_kv_cache_usage_ratio") == 0, 10)


def test_a_client_that_disconnects_stops_its_generation(pool_server):
    _, base, _ = pool_server
    started = time.monotonic()
    httpx.post(base + "/v1/completions", json={**LONG, "max_tokens": 200}, timeout=60)
    full_run = (time.monotonic() - started) * LONG["max_tokens"] / 200  # what the long request would take

    with httpx.stream("POST", base + "/v1/completions", json={**LONG, "stream": True}, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i == 6:
                break
    idle_after = wait_for(lambda: metric(base, "freelunch_requests_running") == 0, 10)
    assert idle_after < max(1.0, full_run / 4), (idle_after, full_run)

    # the same for a non-streaming request whose client gives up
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base + "/v1/completions", json=LONG, timeout=0.5)
    idle_after = wait_for(lambda: metric(base, "freelunch_requests_running") == 0, 10)
    assert idle_after < max(1.0, full_run / 4), (idle_after, full_run)


def test_the_choices_of_one_request_share_a_worker(pool_server):
    proc, base, _ = pool_server

    async def run():
        async with httpx.AsyncClient(base_url=base, timeout=120) as client:
            job = asyncio.create_task(stream(client, "/v1/completions", {**LONG, "max_tokens": 300, "n": 4}))
            loads = []
            while not job.done():
                loads = sorted(w["in_flight"] for w in (await client.get("/ready")).json()["workers"])
                if sum(loads) == 4:
                    break
                await asyncio.sleep(0.02)
            await job
            return loads

    assert asyncio.run(run()) == [0, 4]


def test_a_killed_worker_fails_only_its_streams_and_is_replaced(pool_server):
    proc, base, _ = pool_server
    pids = worker_pids(base)
    assert len(pids) == 2

    async def run():
        async with httpx.AsyncClient(base_url=base, timeout=120) as client:
            jobs = [asyncio.create_task(stream(client, "/v1/completions", {**LONG, "max_tokens": 600})) for _ in range(4)]
            while metric(base, "freelunch_requests_running") < 4:
                await asyncio.sleep(0.05)
            os.kill(pids[0], signal.SIGKILL)
            # the loss is visible at once, long before the replacement has loaded
            for _ in range(100):
                status = (await client.get("/ready")).json()["status"]
                if status == "degraded":
                    break
                await asyncio.sleep(0.05)
            return await asyncio.gather(*jobs), status

    results, status_after_kill = asyncio.run(run())
    assert status_after_kill == "degraded"
    died = [ev for ev in results if any(isinstance(e, dict) and "error" in e for e in ev)]
    finished = [ev for ev in results if ev[-2].get("choices") and ev[-2]["choices"][0]["finish_reason"] == "length"]
    assert all(ev[-1] == "[DONE]" for ev in results)
    assert len(died) == 2 and len(finished) == 2, [ev[-2] for ev in results]
    error = next(e for e in died[0] if isinstance(e, dict) and "error" in e)["error"]
    assert error["code"] == "worker_died" and error["type"] == "service_unavailable"

    wait_for(lambda: httpx.get(base + "/ready").json()["status"] == "ready", 120, step=0.5)
    assert [w["restarts"] for w in httpx.get(base + "/ready").json()["workers"]] == [1, 0]
    new_pids = worker_pids(base)
    assert len(new_pids) == 2 and pids[0] not in new_pids
    ok = httpx.post(base + "/v1/completions", json={"prompt": "hello", "max_tokens": 4}, timeout=60)
    assert ok.status_code == 200


def test_sigterm_drains_as_kubernetes_expects(tiny_llama):
    """SIGTERM: /ready turns 503 at once and new requests get 503 with Retry-After while the socket
    stays open; a generation that ends within --drain-timeout finishes; one still running at the
    deadline ends with an OpenAI-style error event and [DONE]; then the process exits 0."""
    folder, _ = tiny_llama
    drain = 3.0
    proc, base = start_server(folder, 1, "--drain-timeout", str(drain))
    try:
        workers = worker_pids(base)

        async def run():
            async with httpx.AsyncClient(base_url=base, timeout=120) as client:
                # a stream far longer than the drain: a tiny model step at a long context is slow enough
                long = asyncio.create_task(stream(client, "/v1/completions", {**LONG, "max_tokens": MAX_LEN - 8}))
                short = asyncio.create_task(stream(client, "/v1/completions", {**LONG, "max_tokens": 120}))
                # both running at once (polled without blocking this loop, which sends the streams)
                while "freelunch_requests_running 2.0" not in (await client.get("/metrics")).text:
                    assert not short.done() and not long.done(), "a stream ended before both ran at once"
                    await asyncio.sleep(0.02)
                proc.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                await asyncio.sleep(0.2)
                ready = await client.get("/ready")  # the socket is still open: an answer, not a refusal
                new = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
                return await short, await long, ready, new, signalled

        short, long, ready, new, signalled = asyncio.run(run())
        assert ready.status_code == 503 and ready.json()["reason"] == "the server is shutting down"
        assert new.status_code == 503 and new.headers["retry-after"] and new.json()["error"]["type"] == "service_unavailable"
        assert short[-1] == "[DONE]" and short[-2]["choices"][0]["finish_reason"] == "length"
        assert long[-1] == "[DONE]" and long[-2]["error"]["code"] == "server_shutdown"
        assert long[-2]["error"]["type"] == "service_unavailable"
        assert proc.wait(30) == 0
        assert time.monotonic() - signalled < drain + 15  # the drain, the cut's flush, the workers' stop
        wait_for(lambda: not any(Path(f"/proc/{p}").exists() for p in workers), 10)
    finally:
        stop_server(proc)


def test_a_stopped_worker_never_freezes_the_api_and_is_replaced(tiny_llama):
    """SIGSTOP one worker of two, then send it large requests: /health keeps answering at once (no
    write to that worker's pipe blocks the event loop), a request's own timeout holds, the worker
    is marked not ready within the heartbeat timeout, its requests fail, and a replacement serves."""
    from freelunch.pool.process_worker import HEARTBEAT_TIMEOUT_S

    folder, _ = tiny_llama
    proc, base = start_server(folder, 2)
    try:
        pids = worker_pids(base)
        os.kill(pids[0], signal.SIGSTOP)
        big = {"prompt": "word " * 700, "max_tokens": 64, "n": 16, "ignore_eos": True, "timeout": 8}

        def down(state: dict) -> bool:  # worker-0 marked not ready, or already replaced
            return not state["workers"][0]["alive"] or state["workers"][0]["restarts"] > 0

        async def run():
            async with httpx.AsyncClient(base_url=base, timeout=120) as client:
                started = time.monotonic()
                jobs = [asyncio.create_task(client.post("/v1/completions", json=big)) for _ in range(4)]
                slowest, states = 0.0, []
                while not all(j.done() for j in jobs) or not any(down(state) for state, _ in states):
                    t = time.monotonic()
                    r = await client.get("/health")
                    slowest = max(slowest, time.monotonic() - t)
                    assert r.status_code == 200
                    states.append(((await client.get("/ready")).json(), time.monotonic() - started))
                    assert time.monotonic() - started < 60
                    await asyncio.sleep(0.1)
                return [j.result() for j in jobs], slowest, states, time.monotonic() - started

        responses, slowest, states, took = asyncio.run(run())
        assert slowest < 1.0, f"/health took {slowest:.2f} s with a worker stopped"
        assert took < 8 + HEARTBEAT_TIMEOUT_S + 5
        assert all(r.status_code in (200, 408, 503) for r in responses), [r.text for r in responses]
        assert any(r.status_code != 200 for r in responses), "requests on the stopped worker cannot have finished"
        not_ready = [at for state, at in states if down(state)]
        assert not_ready and not_ready[0] < HEARTBEAT_TIMEOUT_S + 3, "the stopped worker was not marked down in time"
        wait_for(lambda: httpx.get(base + "/ready").json()["status"] == "ready", 120, step=0.5)
        assert pids[0] not in worker_pids(base)
        ok = httpx.post(base + "/v1/completions", json={"prompt": "hello", "max_tokens": 4}, timeout=60)
        assert ok.status_code == 200
    finally:
        try:
            os.kill(pids[0], signal.SIGCONT)  # if it is still there
        except ProcessLookupError:
            pass
        stop_server(proc)
