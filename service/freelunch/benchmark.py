"""`freelunch bench`: how fast is freelunch on this machine, and what does each option cost?

Against a running server (`--url`, `--api-key`) or one it starts itself (`freelunch serve` as a
subprocess on a free port, `--model` and `--server-args` passed through). It streams greedy
completions over HTTP with `ignore_eos`, so every request produces exactly `--max-tokens`
tokens, and measures:

  single stream  decode tokens/s and time to first token (TTFT), median of `--repeats` requests;
  concurrency    aggregate tokens/s, median TTFT and per-stream decode tokens/s with C requests
                 sent at once, for each C in `--concurrency`;
  each option    the same single-stream requests with the option set, interleaved with the
                 plain ones, and their ratios to plain (speed-up = plain latency / option latency);
  footprint      a server it started: the memory of its processes (USS and PSS of the API
                 process and of each worker, Linux), the peak while it ran and idle at its end.

The options and how each is measured come from the installed methods' specs (`bench`: its
request fields; a lossless speed-up is measured on chats the server has not seen: SPEC_PROTOCOL).
An option the served model cannot run (a 400: a MoE method on a dense model, an option the backend
lacks) is reported as unavailable, not as a failure; one a spec does not measure (it needs image
inputs) is reported as skipped, with why. Writes JSON (`--out`) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from freelunch.cpu_features import cpu_features, cpu_name

if TYPE_CHECKING:
    from freelunch.methods.spec import BenchCase

PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a bicycle works to a ten-year-old.",
    "List ten ideas for a weekend trip and say why each is fun.",
    "Describe the water cycle in detail.",
    "Write a letter to a friend about your favourite book.",
    "What are the pros and cons of remote work?",
    "Explain recursion with an example in Python.",
    "Give a recipe for pancakes, step by step.",
]

def cases() -> dict[str, BenchCase]:
    """The installed methods' cases (each spec's `bench`), by option."""
    from freelunch.methods import method_specs

    return {name: spec.bench for name, spec in method_specs().items() if spec.bench is not None}


def plain_fields() -> dict[str, Any]:
    """Request fields of plain decoding, even on a server whose flags turn a method on for every request."""
    from freelunch.methods import method_specs

    return {name: spec.off_options for name, spec in method_specs().items() if spec.off_options is not None}


def option_fields(name: str) -> dict[str, Any]:
    """Request fields that measure option `name` against plain decoding."""
    return {name: cases()[name].options}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    target = parser.add_argument_group("server (default: start `freelunch serve` on a free port)")
    target.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    target.add_argument(
        "--api-key",
        default=env("FREELUNCH_API_KEY", "").split(",")[0] or None,
        help="sent as `Authorization: Bearer KEY` (default: the first of FREELUNCH_API_KEY)",
    )
    target.add_argument(
        "--model", default=None, help="with no --url: the model to serve (default: the embedded one)"
    )
    target.add_argument(
        "--server-args",
        default="",
        help='with no --url: more `freelunch serve` flags, e.g. "--engine vllm --native-workers 1"',
    )
    target.add_argument(
        "--ready-timeout", type=float, default=600.0, help="seconds to wait for a started server's /ready"
    )
    parser.add_argument(
        "--max-tokens", type=int, default=64, help="tokens per request (forced with ignore_eos)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="single-stream requests per mode (medians)")
    parser.add_argument(
        "--spec-max-tokens", type=int, default=128, help="tokens per chat in a lossless speed-up's measurement"
    )
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated concurrency levels")
    parser.add_argument(
        "--options", default=",".join(cases()), help="method options to compare with plain"
    )
    parser.add_argument("--out", default="freelunch-bench.json", help="JSON results file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


@dataclass(slots=True)
class Stream:
    """One streamed request: timings (seconds, perf_counter) and what the server reported."""

    status: int
    tokens: int = 0
    start: float = 0.0
    first: float = 0.0
    end: float = 0.0
    error: str | None = None
    method_stats: dict[str, Any] | None = None
    text: str = ""

    @property
    def ttft(self) -> float:
        return self.first - self.start

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def decode_tps(self) -> float:
        # tokens after the first, over the time after the first
        return (
            (self.tokens - 1) / (self.end - self.first) if self.end > self.first and self.tokens > 1 else 0.0
        )


async def stream_once(
    client: httpx.AsyncClient,
    model: str | None,
    prompt: str | list[dict[str, Any]],
    max_tokens: int,
    extra: dict[str, Any],
    ignore_eos: bool = True,
) -> Stream:
    """One greedy streamed completion (a chat when `prompt` is a list of messages) of up to
    `max_tokens` tokens (exactly, with `ignore_eos`), with the body fields `extra` (method options;
    `plain_fields()` for plain decoding whatever the server's defaults); also used by bench/bench_http.py."""
    chat = isinstance(prompt, list)
    body = {
        "model": model,
        **({"messages": prompt} if chat else {"prompt": prompt}),
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": ignore_eos,
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra,
    }
    s = Stream(status=0, start=time.perf_counter())
    async with client.stream("POST", "/v1/chat/completions" if chat else "/v1/completions", json=body) as r:
        s.status = r.status_code
        if r.status_code != 200:
            raw = (await r.aread()).decode(errors="replace")
            try:
                s.error = json.loads(raw)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                s.error = raw[:500]
            s.end = time.perf_counter()
            return s
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                s.error = chunk["error"].get("message", str(chunk["error"]))
            elif chunk.get("usage"):
                s.tokens = chunk["usage"]["completion_tokens"]
                s.method_stats = chunk["usage"].get("method_stats")
            elif chunk.get("choices"):
                choice = chunk["choices"][0]
                piece = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                if piece and not s.first:
                    s.first = time.perf_counter()
                s.text += piece or ""
    s.end = time.perf_counter()
    s.first = s.first or s.end
    return s


SPEC_PROTOCOL = (
    "Measured as the Token Recycling paper does: the method is warmed on {warmup} chats, then each of {n} other chats "
    "is decoded once with it (first sight), interleaved with plain decoding of the same chat; a second pass decodes "
    "the same chats again (repeated prompt: the table has seen them). Greedy chat completions of up to {tokens} "
    "tokens that end where the model stops; speed-up = plain time / the method's time over all chats "
    "(the outputs are the same tokens). The set: {n} hand-written chats in {categories} categories named after "
    "Spec-Bench's, not Spec-Bench itself. Against a running server (--url), its table may have seen them already."
)


def spec_requests() -> int:
    """Requests of a lossless speed-up's measurement: the warm-up, then two passes of (plain, the method) per chat."""
    from freelunch.benchmark_prompts import SPEC_PROMPTS, SPEC_WARMUP

    return len(SPEC_WARMUP) + 4 * sum(len(convs) for convs in SPEC_PROMPTS.values())


async def measure_lossless(
    client: httpx.AsyncClient, model: str, name: str, max_tokens: int, progress: Any
) -> dict[str, Any]:
    """First-sight and repeated-prompt speed-ups of a lossless method over plain decoding (SPEC_PROTOCOL)."""
    from freelunch.benchmark_prompts import SPEC_PROMPTS, SPEC_WARMUP

    plain_request, per_step = plain_fields(), cases()[name].per_step
    tr = plain_request | option_fields(name)
    chats = [conv for convs in SPEC_PROMPTS.values() for conv in convs]

    async def run(conv: list[dict[str, Any]], extra: dict[str, Any]) -> Stream:
        s = await stream_once(client, model, conv, max_tokens, extra, ignore_eos=False)
        if s.status != 200 or s.error:
            raise RuntimeError(f"{name}: request failed ({s.status}): {s.error}")
        progress.update(1)
        return s

    progress.set_description(f"{name}: warm-up")
    for conv in SPEC_WARMUP:
        await run(conv, tr)
    passes: dict[str, tuple[list[Stream], list[Stream]]] = {}
    for pass_name in ("first_sight", "repeated"):
        progress.set_description(f"{name}: {pass_name}")
        plain, spec = [], []
        for conv in chats:  # interleaved, so that drift hits both alike
            plain.append(await run(conv, plain_request))
            spec.append(await run(conv, tr))
        passes[pass_name] = (plain, spec)
    result: dict[str, Any] = {
        "protocol": SPEC_PROTOCOL.format(
            warmup=len(SPEC_WARMUP), n=len(chats), tokens=max_tokens, categories=len(SPEC_PROMPTS)
        )
    }
    for pass_name, (plain, spec) in passes.items():
        plain_s, spec_s = sum(r.e2e for r in plain), sum(r.e2e for r in spec)
        accepted = [r.method_stats[name][per_step] for r in spec if r.method_stats and name in r.method_stats]
        result[pass_name] = {
            "speedup_vs_plain": plain_s / spec_s if spec_s else 0.0,
            "plain_tps": sum(r.tokens for r in plain) / plain_s if plain_s else 0.0,
            "method_tps": sum(r.tokens for r in spec) / spec_s if spec_s else 0.0,
            "per_step_stat": per_step,
            per_step: statistics.mean(accepted) if accepted else 1.0,
            "identical_outputs": sum(a.text == b.text for a, b in zip(plain, spec)),
            "chats": len(chats),
        }
    return result


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def summarise(runs: list[Stream]) -> dict[str, Any]:
    return {
        "decode_tps": median([r.decode_tps for r in runs]),
        "ttft_s": median([r.ttft for r in runs]),
        "e2e_s": median([r.e2e for r in runs]),
        "tokens": median([float(r.tokens) for r in runs]),
        "runs": len(runs),
    }


async def server_kernels(client: httpx.AsyncClient) -> str | None:
    """What runs the server's linears, as its /metrics says (freelunch_cpu_info's kernels label:
    int8-<instruction set>, float-avx2, torch, vllm), or None where /metrics does not say."""
    r = await client.get("/metrics")
    if r.status_code != 200:
        return None
    line = next((ln for ln in r.text.splitlines() if ln.startswith("freelunch_cpu_info{")), "")
    found = re.search(r'kernels="([^"]*)"', line)
    return found.group(1) if found else None


async def measure(
    base: str, headers: dict[str, str], args: argparse.Namespace, progress: Any
) -> dict[str, Any]:
    levels, wanted = plan(args)
    limits = httpx.Limits(max_connections=max(levels, default=1) + 8)
    async with httpx.AsyncClient(
        base_url=base, headers=headers, timeout=httpx.Timeout(600.0, connect=30.0), limits=limits
    ) as client:
        r = await client.get("/v1/models")
        r.raise_for_status()
        model = r.json()["data"][0]["id"]

        plain_request, known = plain_fields(), cases()
        warm = await stream_once(client, model, PROMPTS[0], 8, plain_request)
        progress.update(1)
        if warm.status != 200 or warm.error:
            raise RuntimeError(f"a plain request failed ({warm.status}): {warm.error}")
        kernels = await server_kernels(client)

        methods: dict[str, dict[str, Any]] = {}
        for name in wanted:  # one short request each: warm-up, and is the option available here?
            progress.set_description(f"probe {name}")
            if known[name].options is None:
                methods[name] = {"status": "skipped", "reason": known[name].skip}
            else:
                fields = plain_request | option_fields(name)
                probe = await stream_once(client, model, PROMPTS[0], 8, fields)
                if probe.status == 400:
                    methods[name] = {"status": "unavailable", "reason": probe.error, "options": option_fields(name)}
                elif probe.status != 200 or probe.error:
                    raise RuntimeError(f"{name}: request failed ({probe.status}): {probe.error}")
                else:
                    methods[name] = {"status": "ok", "options": option_fields(name)}
            progress.update(1)
        measured = [name for name in wanted if methods[name]["status"] == "ok"]
        progress.total -= args.repeats * (len(wanted) - len(measured))
        lossless = [name for name in measured if known[name].lossless]
        progress.total -= sum(spec_requests() - args.repeats for name in wanted if known[name].lossless and name not in lossless)
        progress.refresh()

        # Single stream: plain and each option, interleaved so that drift hits them alike. A lossless
        # speed-up is measured its own way (warm-up, then prompts the server has not seen).
        runs: dict[str, list[Stream]] = {name: [] for name in ["plain", *measured] if name not in lossless}
        for i in range(args.repeats):
            for name, done in runs.items():
                progress.set_description(f"single stream: {name}")
                s = await stream_once(
                    client, model, PROMPTS[i % len(PROMPTS)], args.max_tokens,
                    plain_request | (option_fields(name) if name != "plain" else {}),
                )
                if s.status != 200 or s.error:
                    raise RuntimeError(f"{name}: request failed ({s.status}): {s.error}")
                done.append(s)
                progress.update(1)
        plain = summarise(runs["plain"])
        for name in lossless:
            methods[name].update(await measure_lossless(client, model, name, args.spec_max_tokens, progress))
        for name in [m for m in measured if m in runs]:
            row = summarise(runs[name])
            row["speedup_vs_plain"] = plain["e2e_s"] / row["e2e_s"] if row["e2e_s"] else 0.0
            row["decode_tps_ratio_vs_plain"] = (
                row["decode_tps"] / plain["decode_tps"] if plain["decode_tps"] else 0.0
            )
            row["ttft_ratio_vs_plain"] = row["ttft_s"] / plain["ttft_s"] if plain["ttft_s"] else 0.0
            row["method_stats"] = runs[name][-1].method_stats
            methods[name].update(row)

        concurrency: dict[str, dict[str, Any]] = {}
        for c in levels:
            progress.set_description(f"concurrency {c}")

            async def tracked(i: int) -> Stream:
                s = await stream_once(client, model, PROMPTS[i % len(PROMPTS)], args.max_tokens, plain_request)
                progress.update(1)
                return s

            start = time.perf_counter()
            level = await asyncio.gather(*(tracked(i) for i in range(c)))
            wall = max(s.end for s in level) - start
            ok = [s for s in level if s.status == 200 and not s.error]
            concurrency[str(c)] = {
                "throughput_tps": sum(s.tokens for s in ok) / wall,
                "ttft_median_s": median([s.ttft for s in ok]),
                "decode_tps_median": median([s.decode_tps for s in ok]),
                "wall_s": wall,
                "completed": len(ok),
                "failed": c - len(ok),
            }
        progress.set_description("done")
    return {"model": model, "kernels": kernels, "single_stream": plain, "concurrency": concurrency, "methods": methods}


def plan(args: argparse.Namespace) -> tuple[list[int], list[str]]:
    """(concurrency levels, options to compare) from the arguments; ValueError when malformed."""
    try:
        levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        raise ValueError(f"--concurrency takes comma-separated integers, not {args.concurrency!r}") from None
    wanted = [o.strip() for o in args.options.split(",") if o.strip()]
    unknown = [o for o in wanted if o not in cases()]
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; known: {', '.join(cases())}")
    if any(c < 1 for c in levels) or args.repeats < 1 or args.max_tokens < 2:
        raise ValueError("--concurrency levels and --repeats must be >= 1, --max-tokens >= 2")
    return levels, wanted


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(serve_args: list[str], log: Any, ready_timeout: float = 600.0) -> tuple[subprocess.Popen, str]:
    """`freelunch serve *serve_args` on a free loopback port, its output to the file `log`;
    returns (process, base URL) once /ready answers 200 (also used by bench/bench_http.py)."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "freelunch.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    cmd += serve_args
    proc = subprocess.Popen(cmd, stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(
                f"`{shlex.join(cmd[2:])}` exited with {proc.returncode}:\n{log.read().decode(errors='replace')[-2000:]}"
            )
        try:
            if httpx.get(base + "/ready", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"the server did not become ready within {ready_timeout:.0f} s")


def _memory_kib(pid: int) -> tuple[int, int]:
    """(USS, PSS) of process `pid` in KiB, from /proc (Linux). USS: its private pages (clean + dirty);
    PSS: those plus its share of pages it maps with other processes (libraries the API and the workers
    both load), so that PSS adds up across processes where USS leaves the shared pages out."""
    uss = pss = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                uss += int(line.split()[1])
            elif line.startswith("Pss:"):
                pss += int(line.split()[1])
    return uss, pss


def _children(pid: int) -> list[int]:
    """`pid`'s descendants (workers, and what multiprocessing starts beside them)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    kids = [int(c) for c in f.read().split()]
                found += kids
                todo += kids
        except OSError:
            continue
    return found


def _role(pid: int) -> str:
    """What a server's child is: multiprocessing's resource tracker, the grammar compile process (the
    one spawned child at the lowest priority: constraints/compile_guard.py), an engine worker."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        with open(f"/proc/{pid}/stat", "rb") as f:
            nice = int(f.read().rsplit(b")", 1)[1].split()[16])
    except (OSError, ValueError, IndexError):
        return "gone"
    if "resource_tracker" in cmd:
        return "resource tracker"
    if "spawn_main" in cmd:
        return "grammar compiler" if nice > 0 else "worker"
    return "child"


def footprint(pid: int) -> dict[str, Any] | None:
    """Memory of a server's process tree in MiB: USS and PSS of the API process `pid` and of each
    child (engine workers; a grammar compile's child while one runs), and their totals; None where
    /proc cannot tell (not Linux)."""
    try:
        api_uss, api_pss = _memory_kib(pid)
    except OSError:
        return None
    children = []
    for child in _children(pid):
        try:
            uss, pss = _memory_kib(child)
        except OSError:
            continue  # exited meanwhile
        children.append({"pid": child, "role": _role(child), "uss_mib": round(uss / 1024, 1), "pss_mib": round(pss / 1024, 1)})
    return {
        "api_uss_mib": round(api_uss / 1024, 1),
        "api_pss_mib": round(api_pss / 1024, 1),
        "children": children,
        "total_uss_mib": round(api_uss / 1024 + sum(c["uss_mib"] for c in children), 1),
        "total_pss_mib": round(api_pss / 1024 + sum(c["pss_mib"] for c in children), 1),
    }


class FootprintPeak:
    """Samples `footprint(pid)` on a thread every `interval` seconds; `peak` is the sample with the
    largest total seen between start() and stop()."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        import threading

        self.pid, self.interval, self.peak = pid, interval, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="footprint", daemon=True)

    def _run(self) -> None:
        while True:
            now = footprint(self.pid)
            if now is not None and (self.peak is None or now["total_uss_mib"] > self.peak["total_uss_mib"]):
                self.peak = now
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> FootprintPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def markdown(result: dict[str, Any]) -> str:
    single = result["single_stream"]
    machine = result.get("machine", {})
    lines = [
        f"freelunch bench: {result['model']} at {result['server']['url']}, {result['settings']['max_tokens']} tokens per request",
        f"on {machine.get('cpu')} ({', '.join(machine.get('features') or []) or 'features unknown'}), "
        f"{machine.get('cores')} cores; kernels {result.get('kernels') or 'unknown'}",
        "",
        "| measure | value |",
        "| --- | ---: |",
        f"| single-stream decode | {single['decode_tps']:.1f} tok/s |",
        f"| time to first token (c=1) | {single['ttft_s'] * 1e3:.0f} ms |",
    ]
    for c, row in result["concurrency"].items():
        failed = f" ({row['failed']} failed)" if row["failed"] else ""
        lines.append(
            f"| throughput @ {c} concurrent | {row['throughput_tps']:.1f} tok/s, TTFT {row['ttft_median_s'] * 1e3:.0f} ms{failed} |"
        )
    for when, f in (result.get("footprint") or {}).items():
        if f is not None:
            workers = sum(c["uss_mib"] for c in f["children"] if c["role"] == "worker")
            other = sum(c["uss_mib"] for c in f["children"] if c["role"] != "worker")
            lines.append(
                f"| memory, {when.replace('_', ' ')} | {f['total_uss_mib']:.0f} MiB USS (API {f['api_uss_mib']:.0f}, "
                f"workers {workers:.0f}, other {other:.0f}), {f['total_pss_mib']:.0f} MiB PSS |"
            )
    lines += [
        "",
        "| option | decode tok/s | TTFT ms | latency s | speed vs plain | TTFT vs plain |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines.append(
        f"| plain | {single['decode_tps']:.1f} | {single['ttft_s'] * 1e3:.0f} | {single['e2e_s']:.2f} | 1.00x | 1.00x |"
    )
    lossless = []
    for name, row in result["methods"].items():
        if row["status"] != "ok":
            lines.append(f"| {name} | {row['status']}: {row['reason']} | | | | |")
            continue
        if "first_sight" in row:
            lossless.append((name, row))
            continue
        lines.append(
            f"| {name} | {row['decode_tps']:.1f} | {row['ttft_s'] * 1e3:.0f} | {row['e2e_s']:.2f} "
            f"| {row['speedup_vs_plain']:.2f}x | {row['ttft_ratio_vs_plain']:.2f}x |"
        )
    for name, row in lossless:
        per_step = row["first_sight"]["per_step_stat"]
        lines += ["", f"| {name} | speed vs plain | plain tok/s | {name} tok/s | {per_step.replace('_', ' ')} | same output |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for pass_name in ("first_sight", "repeated"):
            r = row[pass_name]
            lines.append(
                f"| {pass_name.replace('_', ' ')} | {r['speedup_vs_plain']:.2f}x | {r['plain_tps']:.1f} | {r['method_tps']:.1f} "
                f"| {r[per_step]:.2f} | {r['identical_outputs']}/{r['chats']} |"
            )
        lines += ["", row["protocol"]]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if load is not None and load > 0.5 * (os.cpu_count() or 1):
        print(
            f"warning: load average {load:.2f} on {os.cpu_count()} cores: other work will slow the figures",
            file=sys.stderr,
        )
    proc = None
    with tempfile.TemporaryFile() as log:
        try:
            levels, wanted = plan(args)
            if args.url:
                base = args.url.rstrip("/")
            else:
                print(
                    "starting freelunch serve (the first start converts the embedded model, ~30 s)...",
                    file=sys.stderr,
                )
                serve_args = (["--model", args.model] if args.model else []) + shlex.split(args.server_args)
                proc, base = start_server(serve_args, log, args.ready_timeout)
            total = 1 + len(wanted) + args.repeats * (1 + len(wanted)) + sum(levels)
            known = cases()
            total += sum(spec_requests() - args.repeats for name in wanted if known[name].lossless)
            with tqdm(total=total, unit="req", file=sys.stderr, disable=args.no_progress) as progress:
                if proc is None:
                    measured = asyncio.run(measure(base, headers, args, progress))
                else:  # a server of our own: its processes' memory too
                    with FootprintPeak(proc.pid) as peak:
                        measured = asyncio.run(measure(base, headers, args, progress))
                    measured["footprint"] = {"peak": peak.peak, "idle_after_run": footprint(proc.pid)}
        except (RuntimeError, ValueError, httpx.HTTPError) as e:
            print(f"freelunch bench: {e}", file=sys.stderr)
            return 1
        finally:
            if proc is not None:
                stop_server(proc)
    result = {
        "freelunch_bench": 1,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {
            "platform": platform.platform(),
            "cpu": cpu_name(),
            "features": cpu_features(),
            "cores": os.cpu_count(),
            "load_average_at_start": load,
        },
        "server": {
            "url": base,
            "started_by_bench": proc is not None,
            "model_arg": args.model,
            "server_args": shlex.split(args.server_args) if proc is not None else None,
        },
        "settings": {
            "max_tokens": args.max_tokens,
            "repeats": args.repeats,
            "temperature": 0,
            "ignore_eos": True,
            "endpoint": "/v1/completions",
            "concurrency": levels,
        },
        **measured,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(f"\nwrote {args.out}")
    return 0
