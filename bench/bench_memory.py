"""What `freelunch serve` holds in memory: USS of the API process and of every worker.

    python bench/bench_memory.py [--server-args "..."] [--out bench/results/memory.json]

Starts `freelunch serve` with its defaults (plus `--server-args`), and measures the unique set size
(USS: pages no other process shares, from /proc/<pid>/smaps_rollup) of the API process and of each
child (engine workers, multiprocessing's resource tracker):

  idle      after one short chat has been answered (the model loaded, the kernels built, one
            request's KV written), then a second's rest;
  16 chats  the peak, sampled every 0.25 s, while `--concurrency` chats of about `--tokens` tokens
            each (prompt + forced generation, `ignore_eos`) run at once; each prompt differs from
            its first words, so that no prefix is shared beyond the chat template's;
  after     idle again once they are answered.

The target (issue 28) is at most 1 GB in total for the default model at default settings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path

import httpx
from freelunch.benchmark import FootprintPeak, footprint, start_server, stop_server
from host import machine  # bench/host.py

WORDS = (
    "river mountain engine garden letter window market silver winter morning planet signal harbor "
    "forest castle pencil doctor village museum ladder rocket basket candle bridge dragon farmer "
    "island jacket kitchen lemon mirror needle orange pepper quartz rabbit saddle tunnel violin "
    "wagon yellow zebra anchor blanket copper desert feather glacier hammer insect jungle kettle"
)


def prompt(i: int, words: int) -> str:
    """A chat's user message: its own notes (seeded by i), then the question."""
    rng = random.Random(i)
    vocabulary = WORDS.split()
    notes = " ".join(rng.choice(vocabulary) for _ in range(words))
    return f"Notes {i}: {notes}\n\nWrite a long story that uses these notes, in order."


async def chat(client: httpx.AsyncClient, model: str, i: int, words: int, max_tokens: int) -> dict:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt(i, words)}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    r = await client.post("/v1/chat/completions", json=body)
    if r.status_code != 200:
        raise RuntimeError(f"chat {i}: {r.status_code} {r.text[:300]}")
    return r.json()["usage"]


async def measure(base: str, pid: int, args: argparse.Namespace) -> dict:
    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(1800.0, connect=30.0)) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        await chat(client, model, -1, 20, 16)
        await asyncio.sleep(1.0)
        idle = footprint(pid)
        start = time.perf_counter()
        with FootprintPeak(pid, 0.25) as peak:
            usage = await asyncio.gather(*(chat(client, model, i, args.prompt_words, args.max_tokens) for i in range(args.concurrency)))
        wall = time.perf_counter() - start
        await asyncio.sleep(1.0)
        after = footprint(pid)
    tokens = [u["prompt_tokens"] + u["completion_tokens"] for u in usage]
    return {
        "idle_after_one_request": idle,
        "peak_during_chats": peak.peak,
        "idle_after_chats": after,
        "chats": {
            "concurrent": args.concurrency,
            "tokens_per_chat_median": sorted(tokens)[len(tokens) // 2],
            "prompt_tokens_median": sorted(u["prompt_tokens"] for u in usage)[len(usage) // 2],
            "completion_tokens_each": args.max_tokens,
            "wall_s": round(wall, 1),
        },
    }


def table(result: dict) -> str:
    rows = [
        ("idle after one request", result["idle_after_one_request"]),
        (f"peak at {result['chats']['concurrent']} chats", result["peak_during_chats"]),
        ("idle after the chats", result["idle_after_chats"]),
    ]
    lines = [
        "| when | API | workers | grammar compiler | other | total USS | total PSS |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, f in rows:
        by = {"worker": 0.0, "grammar compiler": 0.0}
        other = 0.0
        for c in f["children"]:
            if c["role"] in by:
                by[c["role"]] += c["uss_mib"]
            else:
                other += c["uss_mib"]
        lines.append(
            f"| {name} | {f['api_uss_mib']:.0f} | {by['worker']:.0f} | {by['grammar compiler']:.0f} | {other:.0f} "
            f"| {f['total_uss_mib']:.0f} | {f['total_pss_mib']:.0f} |"
        )
    return "\n".join(lines) + "\n(MiB; USS per process, PSS summed: shared library pages counted once)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server-args", default="", help="more `freelunch serve` flags")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--prompt-words", type=int, default=700, help="words of notes per prompt (about 1.07 tokens each)")
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens generated per chat (forced)")
    parser.add_argument("--out", default=str(Path(__file__).with_name("results") / "memory.json"))
    args = parser.parse_args()
    with tempfile.TemporaryFile() as log:
        proc, base = start_server(shlex.split(args.server_args), log)
        try:
            measured = asyncio.run(measure(base, proc.pid, args))
        finally:
            stop_server(proc)
    result = {
        "bench": "memory",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine(),
        "server_args": shlex.split(args.server_args),
        "uss": "MiB of pages private to each process (/proc/<pid>/smaps_rollup Private_Clean + Private_Dirty)",
        "pss": "MiB of private pages plus each process's share of pages it maps with others (Pss): adds up across processes",
        **measured,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"chats: {result['chats']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
