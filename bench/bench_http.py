"""freelunch over HTTP vs transformers `generate` (and llama.cpp if installed), same model, one run.

    python bench/bench_http.py [--dtype float32] [--max-tokens 128] [--levels 1,4,16,64] [--skip-hf]

Measures single-stream decode tokens/s and time to first token through the streaming API, and
aggregate throughput at several concurrency levels; then transformers `generate` on the same
weights (single stream, and batched with left padding), and llama.cpp through
llama-cpp-python on the GGUF, in process, with --llama-cpp-python PATH (its own environment). Writes JSON (default
bench/results/http.json) and prints a table of ratios. Run on an idle machine.
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
import torch
from host import machine, run_llama_cpp  # bench/host.py
from freelunch.benchmark import (  # shared with `freelunch bench`
    PROMPTS,
    start_server,
    stop_server,
    stream_once,
)


async def http_levels(base: str, levels: list[int], max_tokens: int) -> dict:
    out = {}
    async with httpx.AsyncClient(base_url=base, timeout=None, limits=httpx.Limits(max_connections=256)) as client:
        await stream_once(client, None, PROMPTS[0], 8, {})  # warm-up
        for c in levels:
            health: list[float] = []
            probe = asyncio.create_task(probe_health(client, health))  # is the API responsive under this load?
            start = time.perf_counter()
            # {}: the server's own defaults (e.g. --speculative) apply, as for any client
            runs = await asyncio.gather(*(stream_once(client, None, PROMPTS[i % len(PROMPTS)], max_tokens, {}) for i in range(c)))
            wall = max(r.end for r in runs) - start
            probe.cancel()
            out[c] = {
                "throughput_tps": sum(r.tokens for r in runs) / wall,
                "ttft_median_s": statistics.median(r.ttft for r in runs),
                "decode_tps_median": statistics.median(r.decode_tps for r in runs),
                "health_median_s": statistics.median(health) if health else None,
                "health_max_s": max(health, default=None),
            }
            print(f"  freelunch c={c}: {out[c]['throughput_tps']:.1f} tok/s, TTFT {out[c]['ttft_median_s'] * 1e3:.0f} ms, "
                  f"/health median {1e3 * (out[c]['health_median_s'] or 0):.1f} ms", flush=True)  # fmt: skip
    return out


async def probe_health(client: httpx.AsyncClient, latencies: list[float]) -> None:
    """GET /health every 100 ms, recording each answer's latency, until cancelled."""
    while True:
        t = time.perf_counter()
        await client.get("/health")
        latencies.append(time.perf_counter() - t)
        await asyncio.sleep(0.1)


def hf_bench(folder: Path, dtype: torch.dtype, max_tokens: int, batches: list[int]) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).eval()
    out: dict = {}
    with torch.inference_mode():
        ids = tok(PROMPTS[0], return_tensors="pt")
        model.generate(**ids, max_new_tokens=4, do_sample=False)
        t0 = time.perf_counter()
        model.generate(**ids, max_new_tokens=1, do_sample=False)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(**ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
        total = time.perf_counter() - t0
        out["ttft_s"] = ttft
        out["decode_tps"] = (max_tokens - 1) / (total - ttft)
        print(f"  transformers single: {out['decode_tps']:.1f} tok/s", flush=True)
        for b in batches:
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(b)]
            enc = tok(prompts, return_tensors="pt", padding=True)
            t0 = time.perf_counter()
            model.generate(**enc, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id or 0)
            out[f"batch{b}_tps"] = b * max_tokens / (time.perf_counter() - t0)
            print(f"  transformers batch {b}: {out[f'batch{b}_tps']:.1f} tok/s", flush=True)
    return out


def llamacpp_bench(python: str | None, max_tokens: int) -> dict:
    """llama.cpp on the same GGUF, in its own environment (bench/llama_cpp_child.py: in process, no
    HTTP), single stream on this benchmark's prompts; {} without --llama-cpp-python."""
    if not python:
        return {}
    from freelunch.models.loader import load_tokenizer, resolve_source

    tok = load_tokenizer(resolve_source(None))
    result = run_llama_cpp(python, [tok.encode(p) for p in PROMPTS[:3]], max_tokens) or {}  # the completions streamed here
    if result:
        print(f"  llama.cpp single: {result['single_tok_s']:.1f} tok/s", flush=True)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--levels", default="1,4,16,64")
    parser.add_argument("--hf-batches", default="4,16")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--out", default="bench/results/http.json")
    parser.add_argument("--server-args", default="", help="extra flags for freelunch serve")
    parser.add_argument("--llama-cpp-python", help="interpreter of an environment with llama-cpp-python (bench/llama_cpp_child.py)")
    args = parser.parse_args(argv)
    from freelunch.models.loader import default_model_path, gguf_to_folder

    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: load average {load:.2f}: benchmark on an idle machine")
    levels = [int(x) for x in args.levels.split(",")]
    with tempfile.TemporaryFile() as log:
        proc, base = start_server(["--dtype", args.dtype, *args.server_args.split()], log)
        try:
            ours = asyncio.run(http_levels(base, levels, args.max_tokens))
        finally:
            stop_server(proc)
    gguf = default_model_path()
    hf = {} if args.skip_hf else hf_bench(gguf_to_folder(gguf), getattr(torch, args.dtype), args.max_tokens, [int(b) for b in args.hf_batches.split(",")])
    lcpp = llamacpp_bench(args.llama_cpp_python, args.max_tokens)
    result = {
        "machine": machine() | {"torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "load_average_at_start": load},
        "dtype": args.dtype, "max_tokens": args.max_tokens, "freelunch": ours, "transformers": hf, "llama_cpp": lcpp,
    }
    single = ours[levels[0]]["decode_tps_median"]
    print(f"\n{'metric':<34}{'freelunch':>12}{'transformers':>14}{'ratio':>8}")
    if hf:
        print(f"{'single-stream decode tok/s':<34}{single:>12.1f}{hf['decode_tps']:>14.1f}{single / hf['decode_tps']:>7.2f}x")
        print(f"{'time to first token ms (c=1)':<34}{ours[levels[0]]['ttft_median_s'] * 1e3:>12.0f}{hf['ttft_s'] * 1e3:>14.0f}")
    for c in levels:
        ref = hf.get(f"batch{c}_tps")
        cells = f"{ours[c]['throughput_tps']:>12.1f}" + (f"{ref:>14.1f}{ours[c]['throughput_tps'] / ref:>7.2f}x" if ref else f"{'':>14}")
        print(f"{f'throughput @ {c} concurrent tok/s':<34}{cells}")
    if lcpp:
        print(f"{'single stream vs llama.cpp (in process)':<34}{single:>12.1f}{lcpp['single_tok_s']:>14.1f}{single / lcpp['single_tok_s']:>7.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
