"""Load the server with many concurrent streaming clients (mixed options) and report what it held.

    python bench/bench_load.py [--workers 1,2] [--levels 32,128,320,480] [--max-tokens 32]

For each worker count, starts `freelunch serve --workers N` on the default model, then at each
concurrency level sends that many streaming requests at once (plain, guided, speculative and
n=2 mixed) and counts outcomes: completed, refused with 429 (admission control: beyond
`--max-num-seqs` x workers + `--max-queue` in flight), other errors. Reports requests/s and
tokens/s over the level's wall time, and latency percentiles of the completed requests. Writes
JSON (default bench/results/load.json) and prints a table. Run on an idle machine.
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
from freelunch.benchmark import PROMPTS, start_server, stop_server

OPTIONS = [
    {},
    {"guidance": {"scale": 1.5}},
    {"speculative": {"method": "token_recycling"}},
    {"n": 2},
]


async def one(client: httpx.AsyncClient, i: int, max_tokens: int) -> dict:
    body = {
        "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        **OPTIONS[i % len(OPTIONS)],
    }
    start = time.perf_counter()
    tokens, outcome = 0, "error"
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return {"outcome": str(r.status_code), "latency": time.perf_counter() - start, "tokens": 0}
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    outcome = "ok" if outcome != "stream_error" else outcome
                elif line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        outcome = "stream_error"
                    elif chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as e:
        outcome = type(e).__name__
    return {"outcome": outcome, "latency": time.perf_counter() - start, "tokens": tokens}


async def level(base: str, concurrency: int, max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=concurrency + 8)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        runs = await asyncio.gather(*(one(client, i, max_tokens) for i in range(concurrency)))
        wall = time.perf_counter() - start
        leftover = httpx.get(base + "/metrics").text
    outcomes: dict[str, int] = {}
    for r in runs:
        outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
    done = [r for r in runs if r["outcome"] == "ok"]
    lat = sorted(r["latency"] for r in done) or [0.0]
    running_after = [ln for ln in leftover.splitlines() if ln.startswith("freelunch_requests_running ")]
    return {
        "concurrency": concurrency,
        "outcomes": outcomes,
        "wall_s": wall,
        "requests_per_s": len(done) / wall,
        "tokens_per_s": sum(r["tokens"] for r in done) / wall,
        "latency_p50_s": statistics.median(lat),
        "latency_p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        "requests_running_after": float(running_after[0].split()[1]) if running_after else None,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--levels", default="32,128,320,480")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", default="bench/results/load.json")
    parser.add_argument("--server-args", default="", help="extra flags for freelunch serve")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: load average {load:.2f}: benchmark on an idle machine")
    result: dict = {"load_average_at_start": load, "cores": os.cpu_count(), "max_tokens": args.max_tokens, "runs": {}}
    for workers in [int(w) for w in args.workers.split(",")]:
        with tempfile.TemporaryFile() as log:
            proc, base = start_server(["--dtype", "float32", "--workers", str(workers), *args.server_args.split()], log)
            rows = []
            try:
                for c in [int(x) for x in args.levels.split(",")]:
                    row = asyncio.run(level(base, c, args.max_tokens))
                    rows.append(row)
                    print(f"workers={workers} c={c}: {row['outcomes']} {row['requests_per_s']:.2f} req/s "
                          f"{row['tokens_per_s']:.1f} tok/s p50 {row['latency_p50_s']:.1f} s", flush=True)
            finally:
                stop_server(proc)
        result["runs"][workers] = rows
    print(f"\n{'workers':>7}{'clients':>9}{'completed':>11}{'429':>6}{'other err':>10}{'req/s':>8}{'tok/s':>8}{'p50 s':>7}{'p99 s':>7}")
    for workers, rows in result["runs"].items():
        for r in rows:
            o = r["outcomes"]
            other = sum(v for k, v in o.items() if k not in ("ok", "429"))
            print(f"{workers:>7}{r['concurrency']:>9}{o.get('ok', 0):>11}{o.get('429', 0):>6}{other:>10}"
                  f"{r['requests_per_s']:>8.2f}{r['tokens_per_s']:>8.1f}{r['latency_p50_s']:>7.1f}{r['latency_p99_s']:>7.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
