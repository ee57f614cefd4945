"""Light requests beside heavy ones: does a heavy request starve the others? And is a refusal
under a burst cheap?

    python bench/bench_fairness.py [--light 24] [--out bench/results/fairness.json]

Against `freelunch serve` (the embedded model, started here) twice: with the defaults (fair
scheduling, --max-step-cost 2) and as before them (`--scheduling-policy fifo --max-step-cost 100`).
In each, light requests (chat, 16 greedy tokens, one every 0.4 s) run alone, then beside a
heavy load started just before them:
  - 4 Token Recycling requests asking for the paper's 80-node tree with k 32, 96 tokens each (a
    server that refuses the tree gets the same requests without `tree`, as a client would resend);
  - 2 requests with a 3,000-token prompt;
  - 1 request with n 16 and 192 tokens per choice.
It reports the light requests' latency (p50, p99) and TTFT, alone and beside the load, and then
a burst of 296 requests at a server with a queue of 8 (raw connections: an HTTP client library
would measure itself): how many got 429 and how long the slowest 429 took. Run it on an idle machine; it prints the CPU it ran on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from freelunch.benchmark import plain_fields, Stream, start_server, stop_server, stream_once
from host import machine  # bench/host.py

LIGHT = [{"role": "user", "content": "Say hello in one short sentence."}]
LONG_PROMPT = " ".join(f"item {i} is on the list;" for i in range(600))  # ~3,000 tokens


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else 0.0


async def heavy_load(client: httpx.AsyncClient, model: str) -> list[asyncio.Task]:
    async def tr() -> Stream:
        spec = {"speculative": {"method": "token_recycling", "tree": 80, "k": 32}}
        s = await stream_once(client, model, "Count from one to one hundred:", 96, spec)
        if s.status == 400:  # the server bounds tree sizes: resend as a client would
            s = await stream_once(client, model, "Count from one to one hundred:", 96, {"speculative": {"method": "token_recycling"}})
        return s

    async def long() -> Stream:
        return await stream_once(client, model, LONG_PROMPT, 32, plain_fields())

    async def many() -> httpx.Response:
        body = {"model": model, "prompt": "Write a poem:", "max_tokens": 192, "n": 16, "ignore_eos": True, "temperature": 0.8}
        return await client.post("/v1/completions", json=body)

    return [asyncio.create_task(c) for c in [tr(), tr(), tr(), tr(), long(), long(), many()]]


async def light_requests(client: httpx.AsyncClient, model: str, count: int) -> list[Stream]:
    async def one(i: int) -> Stream:
        await asyncio.sleep(0.4 * i)
        return await stream_once(client, model, LIGHT, 16, plain_fields(), ignore_eos=True)

    return list(await asyncio.gather(*(one(i) for i in range(count))))


def summary(runs: list[Stream]) -> dict:
    ok = [r for r in runs if r.status == 200 and not r.error]
    return {
        "completed": len(ok),
        "latency_p50_s": pct([r.e2e for r in ok], 0.5),
        "latency_p99_s": pct([r.e2e for r in ok], 0.99),
        "ttft_p50_s": pct([r.ttft for r in ok], 0.5),
        "ttft_p99_s": pct([r.ttft for r in ok], 0.99),
    }


async def measure(base: str, light: int) -> dict:
    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(900.0), limits=httpx.Limits(max_connections=400)) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        await stream_once(client, model, LIGHT, 4, plain_fields())  # warm-up
        alone = summary(await light_requests(client, model, light))
        heavy = await heavy_load(client, model)
        await asyncio.sleep(1.0)  # the heavy requests are admitted and running
        started = time.perf_counter()
        beside = summary(await light_requests(client, model, light))
        results = await asyncio.gather(*heavy)
        heavy_s = time.perf_counter() - started
        tr = [r for r in results[:4] if isinstance(r, Stream)]
        tree = [((r.method_stats or {}).get("speculative") or {}).get("tree_nodes") for r in tr]
    return {"light_alone": alone, "light_beside_heavy": beside, "heavy_wall_s": heavy_s, "heavy_tree_nodes": tree}


BURST_BODY = b'{"messages":[{"role":"user","content":"Say hello."}],"max_tokens":8}'


async def burst(base: str, count: int) -> dict:
    """`count` chat requests at once, on raw connections (an HTTP client library's own overhead
    would be most of what this measures on 2 cores): status codes and how long the 429s took."""
    host, port = base.removeprefix("http://").split(":")
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: " + str(len(BURST_BODY)).encode() + b"\r\n\r\n"
    )

    async def one() -> tuple[int, float]:
        start = time.perf_counter()
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(head + BURST_BODY)
        await writer.drain()
        code = int((await reader.readline()).split()[1])
        seconds = time.perf_counter() - start
        await reader.read()  # the rest of the answer (a served one streams nothing: it is not `stream`)
        writer.close()
        return code, seconds

    answers = await asyncio.gather(*(one() for _ in range(count)))
    refused = [s for code, s in answers if code == 429]
    return {
        "requests": count,
        "ok": sum(code == 200 for code, _ in answers),
        "refused_429": len(refused),
        "other": sum(code not in (200, 429) for code, _ in answers),
        "slowest_429_s": max(refused, default=0.0),
        "median_429_s": statistics.median(refused) if refused else 0.0,
    }




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--light", type=int, default=24)
    parser.add_argument("--out", default="bench/results/fairness.json")
    parser.add_argument("--burst-only", action="store_true", help="measure the burst alone, into an existing --out")
    args = parser.parse_args()
    if os.getloadavg()[0] > 0.5:
        print(f"warning: load average {os.getloadavg()[0]:.2f}; benchmark on an idle machine")
    configs = {"fair (default)": [], "fifo, no tree bound (before)": ["--scheduling-policy", "fifo", "--max-step-cost", "100"]}
    result: dict = {
        "command": "python bench/bench_fairness.py" + (f" --light {args.light}" if args.light != 24 else ""),
        "machine": {**machine(), "date": time.strftime("%Y-%m-%d")},
        "policies": {},
    }
    if args.burst_only:
        result = json.loads(Path(args.out).read_text())
        configs = {}
    for name, serve_args in configs.items():
        with tempfile.TemporaryFile() as log:
            proc, base = start_server(serve_args, log)
            try:
                result["policies"][name] = asyncio.run(measure(base, args.light))
            finally:
                stop_server(proc)
        print(name, json.dumps(result["policies"][name]), flush=True)
    with tempfile.TemporaryFile() as log:
        proc, base = start_server(["--max-queue", "8"], log)
        try:
            result["burst"] = asyncio.run(burst(base, 296))
        finally:
            stop_server(proc)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{result['machine']['cpu']}, {result['machine']['cores']} cores")
    print("| policy | light p50 alone | light p99 alone | light p50 beside heavy | light p99 beside heavy | TTFT p99 beside heavy | heavy load wall |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in result["policies"].items():
        a, b = r["light_alone"], r["light_beside_heavy"]
        print(f"| {name} | {a['latency_p50_s']:.2f} s | {a['latency_p99_s']:.2f} s | {b['latency_p50_s']:.2f} s "
              f"| {b['latency_p99_s']:.2f} s | {b['ttft_p99_s']:.2f} s | {r['heavy_wall_s']:.0f} s |")
    b = result["burst"]
    print(f"\nburst of {b['requests']} (queue 8): {b['ok']} served, {b['refused_429']} refused with 429 "
          f"(median {b['median_429_s'] * 1e3:.0f} ms, slowest {b['slowest_429_s'] * 1e3:.0f} ms), {b['other']} other")


if __name__ == "__main__":
    main()
