"""Token Recycling on top of another method: its speed-up over that method alone.

    python bench/bench_composition.py [--max-tokens 128] [--out bench/results/composition.json]

Engine level, greedy, every core. For guidance (scale 1.5, the embedded model) and SCMoE (beta 0.5,
the MoEfied embedded model: `freelunch.models.moefication`'s defaults, built once and cached),
the protocol of bench/bench_token_recycling.py: the adjacency table is warmed on the benchmark
set's warm-up chats with the same method, then each of its chats is decoded once with the method
alone and once with Token Recycling on top (interleaved; the table has not seen the chat), the
outputs checked identical. Speed-up = the method's time / the composition's time over all chats.
Writes JSON, prints a table and the CPU. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from host import machine  # bench/host.py




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--out", default="bench/results/composition.json")
    args = parser.parse_args()

    from freelunch.pool.local_engine import install_plugins

    install_plugins()  # constraints and the installed methods, as a worker installs them
    from freelunch.benchmark_prompts import SPEC_PROMPTS, SPEC_WARMUP
    from freelunch.config import EngineConfig
    from freelunch.engine.engine import Engine
    from freelunch.engine.request import GenerationRequest, SamplingParams
    from freelunch.models.loader import load_model, resolve_source
    from freelunch.models.moefication import cached_default_moefied

    torch.set_num_threads(os.cpu_count() or 1)
    if os.getloadavg()[0] > 0.5:
        print(f"warning: load average {os.getloadavg()[0]:.2f}; benchmark on an idle machine")
    chats = [conv for convs in SPEC_PROMPTS.values() for conv in convs]
    setups = {
        "guidance": (None, {"guidance": {"scale": 1.5}}),
        "moe_contrast": (str(cached_default_moefied()), {"moe_contrast": {"beta": 0.5}}),
    }
    result: dict = {
        "command": "python bench/bench_composition.py" + (f" --max-tokens {args.max_tokens}" if args.max_tokens != 128 else ""),
        "machine": {**machine(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")},
        "methods": {},
    }
    for name, (model, methods) in setups.items():
        loaded = load_model(resolve_source(model), "float32")
        tok = loaded.tokenizer
        # no prefix cache: each chat is decoded twice, and the second run would find its prompt cached
        engine = Engine(loaded, EngineConfig(kv_cache_gib=0.5, enable_prefix_caching=False))

        def encode(conv: list[dict]) -> list[int]:
            ids = tok.apply_chat_template(conv, add_generation_prompt=True)
            return ids if isinstance(ids, list) else list(ids["input_ids"])

        def run(ids: list[int], options: dict) -> tuple[list[int], float, dict]:
            engine.add_request(GenerationRequest(f"b{time.monotonic_ns()}", ids, SamplingParams(max_tokens=args.max_tokens, temperature=0), options))
            tokens, stats = [], {}
            start = time.perf_counter()
            while engine.has_work():
                for o in engine.step():
                    tokens += o.new_token_ids
                    stats = o.method_stats or stats
            return tokens, time.perf_counter() - start, stats

        drafted = methods | {"speculative": {"method": "token_recycling"}}
        for conv in SPEC_WARMUP:  # the traffic before: the table learns the method's distribution
            run(encode(conv), drafted)
        alone_s = composed_s = 0.0
        same, accepted, tokens = 0, [], 0
        for conv in chats:
            ids = encode(conv)
            a, sa, _ = run(ids, methods)
            b, sb, stats = run(ids, drafted)
            alone_s, composed_s, tokens = alone_s + sa, composed_s + sb, tokens + len(a)
            same += a == b
            accepted.append(stats["speculative"]["mean_accepted_tokens_per_step"])
        row = {
            "speedup_vs_method_alone": alone_s / composed_s,
            "method_alone_tps": tokens / alone_s,
            "with_token_recycling_tps": tokens / composed_s,
            "mean_accepted_tokens_per_step": statistics.mean(accepted),
            "identical_outputs": same,
            "chats": len(chats),
            "model": model or "SmolLM2-135M-Instruct",
            "options": methods,
        }
        result["methods"][name] = row
        print(f"{name}: {row['speedup_vs_method_alone']:.2f}x ({row['method_alone_tps']:.1f} -> {row['with_token_recycling_tps']:.1f} tok/s), "
              f"accepted {row['mean_accepted_tokens_per_step']:.2f}/step, identical {same}/{len(chats)}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['machine']['cpu']}, {os.cpu_count()} cores; wrote {args.out}")


if __name__ == "__main__":
    main()
