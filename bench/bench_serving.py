"""Serving benchmark: freelunch over HTTP vs transformers `generate` vs llama.cpp, same model, one run.

    python bench/bench_serving.py [--dtype float32] [--quick] [--out bench/results/serving.json]
                                  [--skip-hf] [--skip-llamacpp]

1. Starts `freelunch serve` on a free loopback port and, through the streaming `/v1/completions`
   API (temperature 0, ignore_eos, fixed max_tokens), measures single-stream decode tokens/s
   (tokens after the first / time after the first token), median time to first token, and
   aggregate throughput (generated tokens / wall time) with 1, 4, 16 and 64 concurrent requests.
2. Loads the same GGUF with transformers and measures `generate` (greedy, min_new_tokens = max):
   single-stream decode tokens/s and TTFT, and batched throughput with left padding.
3. Runs the same GGUF through llama-cpp-python, when it is installed (single stream).

Writes JSON (machine facts and all measurements) and prints a table. Run it on an idle machine.
`main(argv)` is importable; `run_benchmark(settings)` returns the result dict.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import inspect
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

PROMPTS: tuple[str, ...] = (
    "Write a short story about a robot who learns to paint.",
    "Explain how a bicycle works to a ten-year-old.",
    "List ten ideas for a weekend trip and say why each one is fun.",
    "Describe the water cycle in detail.",
    "Write a letter to a friend about your favourite book.",
    "What are the pros and cons of working from home?",
    "Explain recursion with an example in Python.",
    "Give a recipe for pancakes, step by step.",
    "Summarise the causes of the French Revolution.",
    "How do vaccines train the immune system?",
    "Write a haiku about autumn, then explain its imagery.",
    "Compare cats and dogs as pets for a small apartment.",
    "What is the difference between weather and climate?",
    "Describe a day in the life of a lighthouse keeper.",
    "Explain what a hash table is and when to use one.",
    "Give advice to someone starting to learn the guitar.",
)

READY_TIMEOUT_S = 180.0
LOAD_WARNING = 0.5
NA = "-"


@dataclass(frozen=True)
class Settings:
    dtype: str = "float32"
    max_tokens: int = 128
    levels: tuple[int, ...] = (1, 4, 16, 64)
    hf_batches: tuple[int, ...] = (4, 16)
    single_runs: int = 3
    threads: int = 1
    out: Path = Path("bench/results/serving.json")
    skip_hf: bool = False
    skip_llamacpp: bool = False
    server_args: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class StreamRun:
    """One timed generation: seconds to the first token, tokens generated, seconds in total."""

    ttft_s: float
    tokens: int
    total_s: float

    @property
    def decode_tps(self) -> float:
        decode_s = self.total_s - self.ttft_s
        return (self.tokens - 1) / decode_s if self.tokens > 1 and decode_s > 0 else 0.0


# ---- machine ---------------------------------------------------------------------------------


def core_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def machine_facts(dtype: str, load: float | None) -> dict[str, Any]:
    import transformers

    return {
        "cpu": cpu_model(),
        "cores": core_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": dtype,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_1min_at_start": load,
    }


def prompts_for(count: int) -> list[str]:
    """`count` distinct prompts: the fixed set, then numbered variants of it."""
    n = len(PROMPTS)
    return [PROMPTS[i % n] if i < n else f"Variant {i // n}. {PROMPTS[i % n]}" for i in range(count)]


# ---- freelunch over HTTP ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc: subprocess.Popen, base_url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"freelunch serve exited with status {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base_url}/ready", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"freelunch serve not ready after {timeout_s:.0f} s")


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


def tail(log: Any, chars: int = 3000) -> str:
    log.flush()
    log.seek(0)
    return log.read().decode(errors="replace")[-chars:]


@contextlib.contextmanager
def freelunch_server(dtype: str, threads: int, extra: tuple[str, ...]) -> Iterator[str]:
    """Run `freelunch serve` on a free loopback port; yield its base URL; always stop it."""
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
        "--dtype",
        dtype,
        "--threads",
        str(threads),
        "--log-level",
        "warning",
        *extra,
    ]
    base_url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: a full pipe would stall the server
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            try:
                wait_ready(proc, base_url, READY_TIMEOUT_S)
            except RuntimeError as e:
                raise RuntimeError(f"{e}\n--- server log (tail) ---\n{tail(log)}") from None
            yield base_url
        finally:
            stop_process(proc)


async def stream_completion(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> StreamRun:
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first: float | None = None
    tokens = 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(
                f"/v1/completions: HTTP {response.status_code}: {(await response.aread())[:500]!r}"
            )
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: ") :])
            if "error" in chunk:
                raise RuntimeError(f"/v1/completions stream error: {chunk['error']}")
            if first is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return StreamRun(ttft_s=(first or end) - start, tokens=tokens, total_s=end - start)


def progress(engine: str, single: dict[str, Any]) -> None:
    print(
        f"  {engine} single stream: {single['decode_tps']:.1f} tok/s, TTFT {single['ttft_ms']:.0f} ms",
        flush=True,
    )


def summarise_single(runs: list[StreamRun]) -> dict[str, Any]:
    return {
        "decode_tps": statistics.median(r.decode_tps for r in runs),
        "ttft_ms": statistics.median(r.ttft_s for r in runs) * 1e3,
        "throughput_tps": statistics.median(r.tokens / r.total_s for r in runs),
        "runs": [asdict(r) | {"decode_tps": r.decode_tps} for r in runs],
    }


async def http_single(client: httpx.AsyncClient, prompts: list[str], max_tokens: int) -> dict[str, Any]:
    runs = [await stream_completion(client, p, max_tokens) for p in prompts]
    return summarise_single(runs)


async def http_level(client: httpx.AsyncClient, concurrency: int, max_tokens: int) -> dict[str, Any]:
    start = time.perf_counter()
    runs = await asyncio.gather(*(stream_completion(client, p, max_tokens) for p in prompts_for(concurrency)))
    wall = time.perf_counter() - start
    tokens = sum(r.tokens for r in runs)
    return {
        "concurrency": concurrency,
        "throughput_tps": tokens / wall,
        "tokens": tokens,
        "wall_s": wall,
        "ttft_ms_median": statistics.median(r.ttft_s for r in runs) * 1e3,
        "decode_tps_median": statistics.median(r.decode_tps for r in runs),
    }


async def bench_http(base_url: str, settings: Settings) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=max(settings.levels) + 8)
    async with httpx.AsyncClient(
        base_url=base_url, timeout=httpx.Timeout(None, connect=10), limits=limits
    ) as client:
        await stream_completion(client, PROMPTS[0], 8)  # warm-up
        single = await http_single(client, prompts_for(settings.single_runs), settings.max_tokens)
        progress("freelunch", single)
        levels: dict[str, Any] = {}
        for c in settings.levels:
            levels[str(c)] = await http_level(client, c, settings.max_tokens)
            print(f"  freelunch @ {c}: {levels[str(c)]['throughput_tps']:.1f} tok/s", flush=True)
    return {"single": single, "throughput": levels}


def bench_freelunch(settings: Settings) -> dict[str, Any]:
    print("freelunch: starting the server ...", flush=True)
    with freelunch_server(settings.dtype, settings.threads, settings.server_args) as base_url:
        return asyncio.run(bench_http(base_url, settings))


# ---- transformers ----------------------------------------------------------------------------


def load_hf(gguf: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype).eval()
    return model, tokenizer


def hf_generate(model: Any, tokenizer: Any, prompts: list[str], new_tokens: int) -> tuple[float, int]:
    """Greedy `generate` of exactly `new_tokens` per prompt; returns (seconds, tokens generated)."""
    enc = tokenizer(prompts, return_tensors="pt", padding=len(prompts) > 1)
    start = time.perf_counter()
    out = model.generate(
        **enc,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    elapsed = time.perf_counter() - start
    return elapsed, (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]


def hf_single(model: Any, tokenizer: Any, prompts: list[str], max_tokens: int) -> dict[str, Any]:
    runs = []
    for prompt in prompts:
        ttft, _ = hf_generate(model, tokenizer, [prompt], 1)
        total, tokens = hf_generate(model, tokenizer, [prompt], max_tokens)
        runs.append(StreamRun(ttft_s=ttft, tokens=tokens, total_s=total))
    return summarise_single(runs)


def hf_batch(model: Any, tokenizer: Any, batch: int, max_tokens: int) -> dict[str, Any]:
    prompts = prompts_for(batch)
    hf_generate(model, tokenizer, prompts, 2)  # warm-up at this shape
    wall, tokens = hf_generate(model, tokenizer, prompts, max_tokens)
    return {"batch": batch, "throughput_tps": tokens / wall, "tokens": tokens, "wall_s": wall}


def bench_transformers(gguf: Path, settings: Settings) -> dict[str, Any]:
    print("transformers: loading the GGUF ...", flush=True)
    torch.set_num_threads(settings.threads)
    model, tokenizer = load_hf(gguf, getattr(torch, settings.dtype))
    with torch.inference_mode():
        hf_generate(model, tokenizer, [PROMPTS[0]], 4)  # warm-up
        single = hf_single(model, tokenizer, prompts_for(settings.single_runs), settings.max_tokens)
        progress("transformers", single)
        batches: dict[str, Any] = {"1": {"batch": 1, "throughput_tps": single["throughput_tps"]}}
        for b in settings.hf_batches:
            batches[str(b)] = hf_batch(model, tokenizer, b, settings.max_tokens)
            print(f"  transformers batch {b}: {batches[str(b)]['throughput_tps']:.1f} tok/s", flush=True)
    return {"status": "ok", "single": single, "throughput": batches}


# ---- llama.cpp -------------------------------------------------------------------------------


def llamacpp_stream(llm: Any, prompt: str, max_tokens: int) -> StreamRun:
    start = time.perf_counter()
    first: float | None = None
    tokens = 0
    no_eos = {llm.token_eos(): -1e9}  # like ignore_eos: always generate max_tokens
    for _ in llm.create_completion(
        prompt, max_tokens=max_tokens, temperature=0.0, stream=True, logit_bias=no_eos
    ):
        tokens += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return StreamRun(ttft_s=(first or end) - start, tokens=tokens, total_s=end - start)


def bench_llamacpp(gguf: Path, settings: Settings) -> dict[str, Any]:
    try:
        from llama_cpp import Llama
    except ImportError:
        return {"status": "not installed"}
    print("llama.cpp: loading the GGUF ...", flush=True)
    kwargs: dict[str, Any] = {"n_threads": settings.threads, "n_ctx": 2048, "verbose": False}
    extra_bufts = "use_extra_bufts" in inspect.signature(Llama.__init__).parameters
    if extra_bufts:
        kwargs["use_extra_bufts"] = False
    try:
        llm = Llama(model_path=str(gguf), **kwargs)
        llamacpp_stream(llm, PROMPTS[0], 4)  # warm-up
        runs = [llamacpp_stream(llm, p, settings.max_tokens) for p in prompts_for(settings.single_runs)]
    except Exception as e:  # noqa: BLE001 -- an optional comparison: record the failure, keep the other results
        return {"status": f"failed: {e!r}"}
    single = summarise_single(runs)
    progress("llama.cpp", single)
    return {
        "status": "ok",
        "use_extra_bufts": False if extra_bufts else "not supported",
        "weights": "as stored in the GGUF",
        "single": single,
        "throughput": {"1": {"throughput_tps": single["throughput_tps"]}},
    }


# ---- report ----------------------------------------------------------------------------------


def metric(result: dict[str, Any], *keys: str) -> float | None:
    value: Any = result
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return float(value)


def table_rows(results: dict[str, Any], levels: tuple[int, ...]) -> list[dict[str, Any]]:
    specs = [
        ("single-stream decode tok/s", ("single", "decode_tps")),
        ("TTFT ms (median)", ("single", "ttft_ms")),
    ]
    specs += [(f"throughput @ {c} tok/s", ("throughput", str(c), "throughput_tps")) for c in levels]
    rows = []
    for name, keys in specs:
        ours = metric(results["freelunch"], *keys)
        hf = metric(results["transformers"], *keys)
        rows.append(
            {
                "metric": name,
                "freelunch": ours,
                "transformers": hf,
                "llama.cpp": metric(results["llama_cpp"], *keys),
                "freelunch/transformers": ours / hf if ours is not None and hf else None,
            }
        )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    columns = ["freelunch", "transformers", "llama.cpp", "freelunch/transformers"]
    width = max(len(r["metric"]) for r in rows) + 2

    def cell(value: float | None, ratio: bool) -> str:
        if value is None:
            return NA
        return f"{value:.2f}x" if ratio else f"{value:.1f}"

    lines = [f"{'metric':<{width}}" + "".join(f"{c:>{len(c) + 2}}" for c in columns)]
    for row in rows:
        cells = [f"{cell(row[c], c == columns[-1]):>{len(c) + 2}}" for c in columns]
        lines.append(f"{row['metric']:<{width}}" + "".join(cells))
    return "\n".join(lines)


def run_benchmark(settings: Settings) -> dict[str, Any]:
    from freelunch.models.loader import default_model_path

    load = load_average()
    if load is not None and load > LOAD_WARNING:
        print(
            f"warning: 1-minute load average is {load:.2f} (> {LOAD_WARNING}): benchmark on an idle machine",
            flush=True,
        )
    gguf = default_model_path()
    results: dict[str, Any] = {
        "machine": machine_facts(settings.dtype, load),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
        "model": str(gguf),
        "prompts": list(PROMPTS),
    }
    results["freelunch"] = bench_freelunch(settings)
    results["transformers"] = (
        {"status": "skipped"} if settings.skip_hf else bench_transformers(gguf, settings)
    )
    results["llama_cpp"] = {"status": "skipped"} if settings.skip_llamacpp else bench_llamacpp(gguf, settings)
    results["table"] = table_rows(results, settings.levels)
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--quick", action="store_true", help="32 tokens, concurrency 1 and 4 (a smoke run)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/serving.json"))
    parser.add_argument("--skip-hf", action="store_true", help="skip transformers generate")
    parser.add_argument("--skip-llamacpp", action="store_true", help="skip llama-cpp-python")
    parser.add_argument("--max-tokens", type=int, help="tokens per request (default 128; --quick: 32)")
    parser.add_argument(
        "--levels", help="comma-separated concurrency levels (default 1,4,16,64; --quick: 1,4)"
    )
    parser.add_argument(
        "--threads", type=int, default=core_count(), help="CPU threads for every engine (default: all cores)"
    )
    parser.add_argument(
        "--server-args", default="", help="extra flags for `freelunch serve`, space-separated"
    )
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    levels = (
        tuple(int(x) for x in args.levels.split(","))
        if args.levels
        else ((1, 4) if args.quick else (1, 4, 16, 64))
    )
    if not levels or min(levels) < 1:
        raise ValueError("--levels must be positive integers")
    return Settings(
        dtype=args.dtype,
        max_tokens=args.max_tokens or (32 if args.quick else 128),
        levels=levels,
        hf_batches=tuple(b for b in (4, 16) if b in levels),
        single_runs=2 if args.quick else 3,
        threads=args.threads,
        out=args.out,
        skip_hf=args.skip_hf,
        skip_llamacpp=args.skip_llamacpp,
        server_args=tuple(args.server_args.split()),
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    results = run_benchmark(settings)
    settings.out.parent.mkdir(parents=True, exist_ok=True)
    settings.out.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(format_table(results["table"]))
    print(f"\ntransformers: {results['transformers']['status']}; llama.cpp: {results['llama_cpp']['status']}")
    print(f"wrote {settings.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
