"""Requests arriving at random: what a server under a steady arrival of mixed prompts holds, against
the same server with every row decoding.

    python bench/bench_arrivals.py [--rounds 3] [--requests 96] [--in-flight 16] [--max-tokens 64] [--think 0.2] [--out bench/results/arrivals.json]

One `freelunch serve` with its defaults. Each round, interleaved:
  steady state  --in-flight greedy completions started together, exactly --max-tokens each: the
                summed decode rate of the streams (each stream's tokens after its first over the
                time after its first): every step all-decode, no prompt beside it;
  arrivals      --requests completions from --in-flight clients, each sending its next request a
                random pause (exponential, mean --think seconds) after its last one ends, so that
                requests arrive at random times with about --in-flight in flight; prompts drawn
                at random (seeded) from short (~15 tokens), medium (~100) and long (~320) ones,
                each behind a first line of its own (no prefix-cache hits): prompt chunks run
                beside decode rows. Throughput is the tokens streamed (counted by their
                logprobs) between the first arrival after every client's first request and the
                last arrival, over that window; time to first token p50 / p99 over all requests.
Reports throughput under arrivals against the steady state, the mean requests in flight in the
window, the prompt tokens processed beside the generated ones, and time-to-first-token percentiles
by prompt size. The prompts cost compute a steady state of decode rows never spends, so the
throughput is also set against what it would be if mixing cost nothing: each request's prompt at
the prefill-alone rate (--in-flight requests of the mix, one token each) and its tokens at the
all-decode rate; `efficiency` = measured / that. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from host import machine  # bench/host.py

from freelunch.benchmark import start_server, stop_server

SHORT = "Write a short poem about the sea."
MEDIUM = " ".join(["The committee reviewed the quarterly report on water quality in the northern district."] * 6)
LONG = " ".join(["In the archive, every letter was sorted by year, then by sender, then by the town it came from."] * 14)
PROMPTS = {"short": SHORT, "medium": MEDIUM + "\nSummary:", "long": LONG + "\nSummary:"}
_SERIAL = itertools.count()


@dataclass
class Done:
    kind: str
    arrival: float
    first: float = 0.0
    end: float = 0.0
    tokens: list[float] = field(default_factory=list)  # a timestamp per streamed token
    prompt_tokens: int = 0
    error: str | None = None


async def complete(client: httpx.AsyncClient, kind: str, max_tokens: int, arrival: float) -> Done:
    body = {
        # a fresh first line: no request finds another's prompt in the prefix cache
        "prompt": f"Note {next(_SERIAL)}.\n{PROMPTS[kind]}", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True, "logprobs": 0,
        "stream_options": {"include_usage": True},
    }  # fmt: skip
    done = Done(kind, arrival)
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            done.error = f"{r.status_code}: {(await r.aread())[:300]!r}"
            return done
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            if chunk.get("usage"):
                done.prompt_tokens = chunk["usage"]["prompt_tokens"]
            for choice in chunk.get("choices", []):
                count = len((choice.get("logprobs") or {}).get("tokens") or [])
                if count and not done.first:
                    done.first = now
                done.tokens += [now] * count
    done.end = time.perf_counter()
    return done


async def steady(client: httpx.AsyncClient, n: int, max_tokens: int) -> dict:
    start = time.perf_counter()
    runs = await asyncio.gather(*(complete(client, "short", max_tokens, start) for _ in range(n)))
    bad = [r.error for r in runs if r.error]
    if bad:
        raise RuntimeError(bad[0])
    rates = [(len(r.tokens) - 1) / (r.end - r.first) for r in runs]
    return {"decode_tps": sum(rates), "request_s": statistics.median(r.end - r.arrival for r in runs)}


async def prefill(client: httpx.AsyncClient, n: int) -> float:
    """Prompt tokens a second with nothing else running: n requests of the mix (in equal parts), one token each."""
    start = time.perf_counter()
    kinds = [list(PROMPTS)[i % len(PROMPTS)] for i in range(n)]
    runs = await asyncio.gather(*(complete(client, kind, 1, start) for kind in kinds))
    bad = [r.error for r in runs if r.error]
    if bad:
        raise RuntimeError(bad[0])
    return sum(r.prompt_tokens for r in runs) / (max(r.end for r in runs) - start)


async def arrivals(client: httpx.AsyncClient, n: int, in_flight: int, max_tokens: int, think_s: float, seed: int) -> dict:
    """n requests from `in_flight` clients, each sending its next request a random (exponential,
    mean think_s) pause after its last one ends: arrivals at random times, about in_flight in flight."""
    rng = random.Random(seed)
    runs: list[Done] = []
    left = iter(range(n))

    async def client_loop() -> None:
        while next(left, None) is not None:
            runs.append(await complete(client, rng.choice(list(PROMPTS)), max_tokens, time.perf_counter()))
            await asyncio.sleep(rng.expovariate(1 / think_s))

    await asyncio.gather(*(client_loop() for _ in range(in_flight)))
    bad = [r.error for r in runs if r.error]
    if bad:
        raise RuntimeError(bad[0])
    runs.sort(key=lambda r: r.arrival)
    lo, hi = runs[in_flight].arrival, runs[-1].arrival  # every client past its first request
    streamed = sum(lo <= t <= hi for r in runs for t in r.tokens)
    busy = sum(max(0.0, min(r.end, hi) - max(r.arrival, lo)) for r in runs)
    prompts = sum(r.prompt_tokens for r in runs if lo <= r.arrival <= hi)
    ttft = {kind: [r.first - r.arrival for r in runs if r.kind == kind] for kind in PROMPTS}
    every = sorted(r.first - r.arrival for r in runs)
    return {
        "throughput_tps": streamed / (hi - lo),
        "prompt_tps": prompts / (hi - lo),  # prompt tokens of the requests that arrived in the window
        "mean_prompt_tokens": statistics.mean(r.prompt_tokens for r in runs),
        "mean_in_flight": busy / (hi - lo),
        "ttft_p50_s": every[len(every) // 2],
        "ttft_p99_s": every[min(len(every) - 1, round(0.99 * (len(every) - 1)))],
        "ttft_p50_s_by_prompt": {k: statistics.median(v) for k, v in ttft.items() if v},
        "requests": n,
        "window_s": hi - lo,
    }


async def measure(args: argparse.Namespace) -> list[dict]:
    rounds = []
    with tempfile.TemporaryFile() as log:
        proc, base = start_server([], log)
        try:
            async with httpx.AsyncClient(base_url=base, timeout=600) as client:
                for kind in PROMPTS:  # warm: first-call costs of each prompt size
                    await complete(client, kind, 4, time.perf_counter())
                for i in range(args.rounds):
                    print(f"... round {i + 1}", file=sys.stderr, flush=True)
                    still = await steady(client, args.in_flight, args.max_tokens)
                    still["prefill_tps"] = await prefill(client, args.in_flight)
                    moving = await arrivals(client, args.requests, args.in_flight, args.max_tokens, args.think, seed=i)
                    rounds.append({"steady": still, "arrivals": moving})
        finally:
            stop_server(proc)
    return rounds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--in-flight", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--think", type=float, default=0.2, help="mean seconds a client waits before its next request")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "arrivals.json"))
    ap.add_argument("--table", metavar="JSON", help="print the table of a results file and exit")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return
    rounds = asyncio.run(measure(args))
    for r in rounds:  # the generated tokens/s if mixing prompts into decode steps cost nothing: each
        # request's prompt at the prefill-alone rate plus its tokens at the all-decode rate
        a, st = r["arrivals"], r["steady"]
        prompt, gen = a["prompt_tps"], a["throughput_tps"]
        a["ideal_tps"] = gen / (prompt / st["prefill_tps"] + gen / st["decode_tps"])
        a["efficiency"] = gen / a["ideal_tps"]
    med = lambda part, key: statistics.median(r[part][key] for r in rounds)  # noqa: E731
    results = {
        "steady_decode_tps": med("steady", "decode_tps"),
        "arrivals_throughput_tps": med("arrivals", "throughput_tps"),
        "arrivals_prompt_tps": med("arrivals", "prompt_tps"),
        "prefill_alone_tps": med("steady", "prefill_tps"),
        "ideal_tps": med("arrivals", "ideal_tps"),
        "efficiency": med("arrivals", "efficiency"),
        "mean_prompt_tokens": med("arrivals", "mean_prompt_tokens"),
        "ratio": statistics.median(r["arrivals"]["throughput_tps"] / r["steady"]["decode_tps"] for r in rounds),
        "mean_in_flight": med("arrivals", "mean_in_flight"),
        "ttft_p50_s": med("arrivals", "ttft_p50_s"),
        "ttft_p99_s": med("arrivals", "ttft_p99_s"),
        "ttft_p50_s_by_prompt": {k: statistics.median(r["arrivals"]["ttft_p50_s_by_prompt"][k] for r in rounds) for k in PROMPTS},
    }
    meta = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "args": {k: v for k, v in vars(args).items() if k != "table"}}
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results, "rounds": rounds}, indent=2) + "\n")
    print(table(json.loads(Path(args.out).read_text())))


def table(data: dict) -> str:
    meta, a, r = data["meta"], data["meta"]["args"], data["results"]
    host = meta["machine"]
    by = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in r["ttft_p50_s_by_prompt"].items())
    return "\n".join([
        f"Default model over HTTP (`freelunch serve` defaults), {a['requests']} completions from {a['in_flight']} clients "
        f"arriving at random (exponential pauses, mean {a['think']} s), {a['max_tokens']} tokens each, {host['cpu']} ({host['isa']}), "
        f"{host['cores']} cores, medians of {a['rounds']} rounds, {meta['date']}",
        "",
        "| all-decode steady state tok/s | under arrivals tok/s | ratio | prompt tok/s beside them (mean prompt) | prefill alone tok/s | "
        "arrivals if mixing cost nothing | efficiency | mean in flight | TTFT p50 | TTFT p99 | TTFT p50 by prompt |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        f"| {r['steady_decode_tps']:.1f} | {r['arrivals_throughput_tps']:.1f} | {r['ratio']:.2f}x | "
        f"{r['arrivals_prompt_tps']:.0f} ({r['mean_prompt_tokens']:.0f}) | {r['prefill_alone_tps']:.0f} | {r['ideal_tps']:.1f} | "
        f"{r['efficiency']:.2f}x | {r['mean_in_flight']:.1f} | "
        f"{r['ttft_p50_s'] * 1000:.0f} ms | {r['ttft_p99_s'] * 1000:.0f} ms | {by} |",
    ])  # fmt: skip


if __name__ == "__main__":
    main()
