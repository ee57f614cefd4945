"""What an attacker's requests cost a bystander: the stall each attack causes to an ordinary stream.

    python bench/bench_abuse.py [--duration 120] [--out bench/results/abuse.json]

Starts `freelunch serve` with its defaults, `--workers 2` and two API keys (or uses `--url`), keeps
one bystander streaming greedy completions back to back with the user's key, and runs each attack
for `--duration` seconds (baseline and the worker attack a quarter of it, slow bodies half) with the
attacker's key, loopback only:

  baseline         nothing else: the bystander's own inter-token gaps
  hostile schemas  3 clients send JSON schemas whose compile takes xgrammar a minute (40 strings
                   of distinct maxLength): two send distinct ones, one the same schema again and
                   again; a fourth sends schemas nested 2,000 deep (as a string); a fifth sends
                   ordinary `json_object` requests and times them
  slow bodies      100 connections send their headers and a few bytes of body, then trickle
  stopped worker   one worker SIGSTOPped while 4 large requests (n=16, 700-word prompts) are sent;
                   /health is timed (needs a server this script started)

For each: the bystander's worst and p99 gap between streamed tokens, its tokens/s, `/health`'s
slowest answer, and what the attacker got. Run it on an idle machine; it prints the CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from freelunch.benchmark import start_server, stop_server
from host import machine  # bench/host.py

USER_KEY, ATTACKER_KEY = "sk-bench-user", "sk-bench-attacker"
USER = {"Authorization": f"Bearer {USER_KEY}"}
ATTACKER = {"Authorization": f"Bearer {ATTACKER_KEY}"}
BYSTANDER = {"prompt": "Write a long story about a lighthouse keeper.", "max_tokens": 300, "temperature": 0, "ignore_eos": True}


def slow_schema(base: int) -> dict:
    """About a minute of xgrammar's compile on 2 cores: every distinct string bound is its own rule."""
    props = {f"p{i}": {"type": "string", "maxLength": base + i} for i in range(40)}
    return {"type": "object", "properties": props, "required": list(props)}


DEEP = '{"type": "array", "items": ' * 2000 + "{}" + "}" * 2000


class Bystander:
    """Streams the same completion back to back until stopped; records the gaps between tokens."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.gaps: list[float] = []
        self.tokens = 0
        self.failed = 0
        self.stop = asyncio.Event()

    async def run(self) -> None:
        while not self.stop.is_set():
            last = None
            try:
                async with self.client.stream("POST", "/v1/completions", json=BYSTANDER | {"stream": True}) as r:
                    async for line in r.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        now = time.perf_counter()
                        if last is not None:
                            self.gaps.append(now - last)
                        last = now
                        self.tokens += 1
            except httpx.HTTPError:
                self.failed += 1


async def time_health(client: httpx.AsyncClient, stop: asyncio.Event, worst: list[float]) -> None:
    while not stop.is_set():
        start = time.perf_counter()
        try:
            await client.get("/health", timeout=30)
        except httpx.HTTPError:
            pass
        worst.append(time.perf_counter() - start)
        await asyncio.sleep(0.2)


async def hostile_schemas(client: httpx.AsyncClient, stop: asyncio.Event, report: dict) -> None:
    statuses: dict[str, int] = {}
    ordinary: list[float] = []

    async def attacker(i: int, mode: str) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            schema = {"repeat": slow_schema(300), "distinct": slow_schema(400 + 1000 * i + 50 * n), "deep": DEEP}[mode]
            body = {"prompt": "x", "max_tokens": 8, "structured_outputs": {"json": schema}}
            try:
                r = await client.post("/v1/completions", json=body, timeout=120, headers=ATTACKER)
                statuses[str(r.status_code)] = statuses.get(str(r.status_code), 0) + 1
            except httpx.HTTPError as e:
                statuses[type(e).__name__] = statuses.get(type(e).__name__, 0) + 1

    async def honest() -> None:
        while not stop.is_set():
            start = time.perf_counter()
            r = await client.post("/v1/completions", json={"prompt": "A JSON object:", "max_tokens": 16, "temperature": 0,
                                                           "response_format": {"type": "json_object"}}, timeout=120, headers=USER)
            if r.status_code == 200:
                ordinary.append(time.perf_counter() - start)
            await asyncio.sleep(0.5)

    await asyncio.gather(attacker(0, "distinct"), attacker(1, "distinct"), attacker(2, "repeat"), attacker(3, "deep"), honest())
    report["attacker_statuses"] = statuses
    report["json_object_requests"] = {"count": len(ordinary), "median_s": statistics.median(ordinary) if ordinary else None,
                                      "max_s": max(ordinary) if ordinary else None}


async def slow_bodies(base: str, stop: asyncio.Event, report: dict) -> None:
    host, port = base.removeprefix("http://").split(":")
    opened, closed_by_server = 0, []

    async def one() -> None:
        nonlocal opened
        try:
            reader, writer = await asyncio.open_connection(host, int(port))
        except OSError:
            return
        opened += 1
        start = time.monotonic()
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + ATTACKER_KEY.encode() + b"\r\nContent-Length: 100000\r\n\r\n{")
        await writer.drain()
        try:
            while not stop.is_set():
                writer.write(b" ")
                await writer.drain()
                try:
                    data = await asyncio.wait_for(reader.read(1024), timeout=1.0)
                except asyncio.TimeoutError:
                    continue
                if data or reader.at_eof():
                    closed_by_server.append(time.monotonic() - start)
                    return
        except (ConnectionError, OSError):
            closed_by_server.append(time.monotonic() - start)
        finally:
            writer.close()

    await asyncio.gather(*(one() for _ in range(100)))
    report["connections"] = opened
    report["answered_or_closed_by_server"] = len(closed_by_server)
    report["held_open_s_median"] = statistics.median(closed_by_server) if closed_by_server else None


async def stopped_worker(base: str, stop: asyncio.Event, report: dict) -> None:
    pids = [w["pid"] for w in httpx.get(base + "/ready", headers=USER).json()["workers"] if w["pid"]]
    if len(pids) < 2:
        report["skipped"] = "needs a server with 2 workers that this script started"
        return
    os.kill(pids[0], signal.SIGSTOP)
    big = {"prompt": "word " * 700, "max_tokens": 64, "n": 16, "ignore_eos": True, "timeout": 8}
    try:
        async with httpx.AsyncClient(base_url=base, timeout=120, headers=ATTACKER) as client:
            start = time.monotonic()
            responses = await asyncio.gather(*(client.post("/v1/completions", json=big) for _ in range(4)))
            report["large_requests"] = {"statuses": sorted(r.status_code for r in responses), "took_s": time.monotonic() - start}
            while not stop.is_set():
                await asyncio.sleep(0.2)
    finally:
        try:
            os.kill(pids[0], signal.SIGCONT)
        except ProcessLookupError:
            report["stopped_worker_replaced"] = True


async def run_attack(name: str, base: str, duration: float, attack) -> dict:
    report: dict = {"attack": name, "duration_s": duration}
    async with httpx.AsyncClient(base_url=base, timeout=120, headers=USER) as client:
        bystander = Bystander(client)
        stop, health = asyncio.Event(), []
        tasks = [asyncio.create_task(bystander.run()), asyncio.create_task(time_health(client, stop, health))]
        attack_task = asyncio.create_task(attack(stop, report)) if attack is not None else None
        started = time.monotonic()
        await asyncio.sleep(duration)
        stop.set()
        bystander.stop.set()
        if attack_task is not None:
            await attack_task
        await asyncio.gather(*tasks)
        gaps = sorted(bystander.gaps)
        report["bystander"] = {
            "tokens": bystander.tokens,
            "tokens_per_s": bystander.tokens / (time.monotonic() - started),
            "worst_gap_s": gaps[-1] if gaps else None,
            "p99_gap_s": gaps[int(0.99 * (len(gaps) - 1))] if gaps else None,
            "median_gap_s": statistics.median(gaps) if gaps else None,
            "failed_streams": bystander.failed,
        }
        report["health_worst_s"] = max(health) if health else None
    b = report["bystander"]
    if b["worst_gap_s"] is None:
        print(f"{name}: the bystander streamed nothing ({b['failed_streams']} failed streams)")
        return report
    print(f"{name}: bystander worst gap {b['worst_gap_s']:.3f} s, p99 {b['p99_gap_s']:.3f} s, {b['tokens_per_s']:.1f} tok/s; "
          f"/health worst {report['health_worst_s'] * 1e3:.0f} ms", flush=True)
    return report


def table(result: dict) -> str:
    lines = [f"{result['machine']['cpu']} ({result['machine']['isa']}), {result['machine']['cores']} cores, "
             f"{result['duration_s']:g} s an attack", "",
             "| attack | bystander worst gap | p99 gap | bystander tok/s | /health worst | what the attacker got |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for r in result["attacks"]:
        b = r["bystander"]
        if b["worst_gap_s"] is None:
            lines.append(f"| {r['attack']} | no tokens | | | {r['health_worst_s'] * 1e3:.0f} ms | |")
            continue
        got = {k: v for k, v in r.items() if k not in ("attack", "duration_s", "bystander", "health_worst_s")}
        lines.append(f"| {r['attack']} | {b['worst_gap_s'] * 1e3:.0f} ms | {b['p99_gap_s'] * 1e3:.0f} ms | "
                     f"{b['tokens_per_s']:.1f} | {r['health_worst_s'] * 1e3:.0f} ms | {json.dumps(got)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=None, help="a running server with the keys USER_KEY and ATTACKER_KEY, or none "
                        "(the stopped-worker attack is skipped)")
    parser.add_argument("--duration", type=float, default=120.0, help="seconds each attack runs")
    parser.add_argument("--out", default="bench/results/abuse.json")
    parser.add_argument("--table", default=None, help="print the table of a results file and exit")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return
    log = tempfile.TemporaryFile()  # the server's output (shown if it fails to start)
    serve = ["--workers", "2", "--api-key", USER_KEY, "--api-key", ATTACKER_KEY]
    proc, base = (None, args.url) if args.url else start_server(serve, log)
    for _ in range(4):  # warm both workers (first-request costs are no attack's)
        httpx.post(base + "/v1/completions", json=BYSTANDER | {"max_tokens": 16}, timeout=300, headers=USER)
    try:
        d = args.duration
        attacks = [
            ("baseline", d / 4, None),
            ("hostile schemas", d, lambda stop, rep: hostile_schemas_client(base, stop, rep)),
            ("slow bodies", d / 2, lambda stop, rep: slow_bodies(base, stop, rep)),
        ]
        if proc is not None:
            attacks.append(("stopped worker", d / 4, lambda stop, rep: stopped_worker(base, stop, rep)))
        reports = [asyncio.run(run_attack(name, base, seconds, attack)) for name, seconds, attack in attacks]
    finally:
        if proc is not None:
            stop_server(proc)
        log.close()
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "duration_s": args.duration,
              "command": "python bench/bench_abuse.py" + (f" --duration {args.duration:g}" if args.duration != 120 else ""),
              "attacks": reports}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(table(result))
    print(f"\nwrote {args.out}")


async def hostile_schemas_client(base: str, stop: asyncio.Event, report: dict) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=120, headers=USER) as client:
        await hostile_schemas(client, stop, report)


if __name__ == "__main__":
    main()
