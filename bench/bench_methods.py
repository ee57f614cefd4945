"""What each method costs beside plain decoding, through HTTP, on chats the server has not seen.

    python bench/bench_methods.py [--rounds 3] [--max-tokens 96] [--concurrency 16] [--out bench/results/methods.json]

For each round and each method (plain, guidance at scale 1.5, Token Recycling, Token Recycling over
guidance), a fresh `freelunch serve` with its defaults (so Token Recycling's table starts empty):
  1. warm-up: the ten warm-up chats of freelunch.benchmark_prompts, with the method;
  2. single stream: each of the nine measured chats once (first sight), greedy, ending where the
     model stops (at most --max-tokens): tokens/s over all of them, and the texts;
  3. concurrent: --concurrency streams at once (the nine chats, then the warm-up chats), greedy,
     exactly --max-tokens each (ignore_eos): tokens/s over the wall time.
Methods alternate within a round (interleaved), medians over rounds (of each round's ratio for
ratios). Reports each method's time a
token against plain decoding's, concurrent tokens/s against plain's, Token Recycling over guidance
against guidance alone, and whether the speculative outputs equal their baselines' (lossless). Run
it on an idle machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from host import machine  # bench/host.py

from freelunch.benchmark import plain_fields, start_server, stop_server, stream_once
from freelunch.benchmark_prompts import SPEC_PROMPTS, SPEC_WARMUP

TR = {"speculative": {"method": "token_recycling"}}
GUIDED = {"guidance": {"scale": 1.5}}
METHODS = {"plain": plain_fields(), "guidance": GUIDED, "token recycling": TR, "token recycling + guidance": {**TR, **GUIDED}}
BASELINE = {"token recycling": "plain", "token recycling + guidance": "guidance"}  # same outputs expected


async def one_server(options: dict, max_tokens: int, concurrency: int) -> dict:
    chats = [conv for convs in SPEC_PROMPTS.values() for conv in convs]
    with tempfile.TemporaryFile() as log:
        proc, base = start_server([], log)
        try:
            async with httpx.AsyncClient(base_url=base, timeout=600) as client:
                model = (await client.get("/v1/models")).json()["data"][0]["id"]
                for conv in SPEC_WARMUP:
                    await stream_once(client, model, conv, max_tokens, options, ignore_eos=False)
                single = [await stream_once(client, model, conv, max_tokens, options, ignore_eos=False) for conv in chats]
                pool = (chats + SPEC_WARMUP) * (1 + concurrency // (len(chats) + len(SPEC_WARMUP)))
                start = time.perf_counter()
                together = await asyncio.gather(
                    *(stream_once(client, model, conv, max_tokens, options) for conv in pool[:concurrency])
                )
                wall = time.perf_counter() - start
        finally:
            stop_server(proc)
    for s in [*single, *together]:
        if s.status != 200 or s.error:
            raise RuntimeError(f"{options}: a request failed ({s.status}): {s.error}")
    spent = sum(s.e2e for s in single)
    stats = [s.method_stats or {} for s in single]
    accepted = [m["speculative"]["mean_accepted_tokens_per_step"] for m in stats if "speculative" in m]
    return {
        "single_tps": sum(s.tokens for s in single) / spent,
        "single_ms_per_token": 1000 * spent / sum(s.tokens for s in single),
        "single_ttft_s": statistics.median(s.ttft for s in single),
        "texts": [s.text for s in single],
        "accepted_tokens_per_step": statistics.mean(accepted) if accepted else None,
        "concurrent_tps": sum(s.tokens for s in together) / wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "methods.json"))
    ap.add_argument("--table", metavar="JSON", help="print the table of a results file and exit")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return
    runs: dict[str, list[dict]] = {name: [] for name in METHODS}
    for round_ in range(args.rounds):
        for name, options in METHODS.items():
            print(f"... round {round_ + 1}: {name}", file=sys.stderr, flush=True)
            runs[name].append(asyncio.run(one_server(options, args.max_tokens, args.concurrency)))
    results = summarise(runs)
    meta = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "args": {k: v for k, v in vars(args).items() if k != "table"}}
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results, "runs": runs}, indent=2) + "\n")
    print(table(json.loads(Path(args.out).read_text())))


def summarise(runs: dict[str, list[dict]]) -> dict:
    """Medians over rounds; ratios are the medians of each round's ratio (the methods of a round ran
    back to back, so a slow spell of the machine bends both sides of a ratio alike)."""
    med = lambda name, key: statistics.median(r[key] for r in runs[name])  # noqa: E731

    def ratio(name: str, base: str, key: str, inverse: bool = False) -> float:
        pairs = zip(runs[name], runs[base])
        return statistics.median(b[key] / a[key] if inverse else a[key] / b[key] for a, b in pairs)

    results = {}
    for name in runs:
        results[name] = {k: med(name, k) for k in ("single_tps", "single_ms_per_token", "single_ttft_s", "concurrent_tps")}
        accepted = [r["accepted_tokens_per_step"] for r in runs[name] if r["accepted_tokens_per_step"] is not None]
        results[name]["accepted_tokens_per_step"] = statistics.median(accepted) if accepted else None
        results[name]["time_per_token_vs_plain"] = ratio(name, "plain", "single_ms_per_token")
        results[name]["concurrent_tps_vs_plain"] = ratio(name, "plain", "concurrent_tps")
    for name, base in BASELINE.items():
        results[name]["speedup_over_" + base.replace(" ", "_")] = ratio(name, base, "single_ms_per_token", inverse=True)
        pairs = [(a, b) for r, q in zip(runs[name], runs[base]) for a, b in zip(r["texts"], q["texts"])]
        results[name]["identical_outputs"] = f"{sum(a == b for a, b in pairs)}/{len(pairs)}"
    return results


def table(data: dict) -> str:
    meta, a = data["meta"], data["meta"]["args"]
    host = meta["machine"]
    lines = [
        f"Default model over HTTP (`freelunch serve` defaults), greedy, chats not seen before, {host['cpu']} ({host['isa']}), "
        f"{host['cores']} cores, medians of {a['rounds']} interleaved rounds, {meta['date']}",
        "",
        f"| method | single stream tok/s | time a token vs plain | accepted tokens a step | {a['concurrency']} concurrent tok/s | vs plain | over its baseline | identical outputs |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in data["results"].items():
        base = BASELINE.get(name)
        over = f"{r['speedup_over_' + base.replace(' ', '_')]:.2f}x {base}" if base else ""
        accepted = f"{r['accepted_tokens_per_step']:.2f}" if r["accepted_tokens_per_step"] else ""
        lines.append(
            f"| {name} | {r['single_tps']:.1f} | {r['time_per_token_vs_plain']:.2f}x | {accepted} | {r['concurrent_tps']:.1f} | "
            f"{r['concurrent_tps_vs_plain']:.2f}x | {over} | {r.get('identical_outputs', '')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
