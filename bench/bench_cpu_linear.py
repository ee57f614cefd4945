"""What one forward of T tokens costs with each CPU linear path: our AVX2 kernel, oneDNN, plain PyTorch.

    python bench/bench_cpu_linear.py [--sizes 1,2,4,8,12,16,32,128] [--repeats 7] [--decode-tokens 64]

Decoding runs T = 1 (or a few rows per request in a batch); Token Recycling verifies T = tree
nodes + 1; a prefill chunk is hundreds. Each path loads the same model (float32, default: the
embedded SmolLM2-135M-Instruct) and times `ModelRunner.forward_cost` after a 100-token context
(best of --repeats), then single-stream greedy decoding. Writes JSON (default
bench/results/cpu_linear.json) and prints a table with ratios against oneDNN (the previous
default) and plain PyTorch. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

KINDS = ("panel", "onednn", "torch")


def measure(kind: str, model: str | None, sizes: tuple[int, ...], repeats: int, decode_tokens: int) -> dict:
    from freelunch.config import EngineConfig
    from freelunch.pool.local_engine import install_plugins

    install_plugins()  # constraints and the installed methods, as a worker installs them
    from freelunch.engine.engine import Engine
    from freelunch.engine.request import GenerationRequest, SamplingParams
    from freelunch.models.cpu_linear import PanelLinear, PackedLinear
    from freelunch.models.loader import load_model, resolve_source

    os.environ["FREELUNCH_CPU_LINEAR"] = kind
    loaded = load_model(resolve_source(model), "float32")
    used = {type(m).__name__ for m in loaded.model.modules() if isinstance(m, (PanelLinear, PackedLinear, torch.nn.Linear))}
    engine = Engine(loaded, EngineConfig(kv_cache_gib=0.5))
    cost = engine.runner.forward_cost(100, sizes, repeats=repeats)
    prompt = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a short story about a lighthouse keeper."}], tokenize=True, add_generation_prompt=True
    )
    prompt = prompt if isinstance(prompt, list) else list(prompt["input_ids"])
    best = float("inf")
    for i in range(2):  # the first run warms up
        engine.add_request(GenerationRequest(f"d{kind}{i}", prompt, SamplingParams(max_tokens=decode_tokens, temperature=0, ignore_eos=True)))
        start, tokens = time.perf_counter(), 0
        while engine.has_work():
            tokens += sum(len(o.new_token_ids) for o in engine.step())
        best = min(best, (time.perf_counter() - start) / tokens)
    return {"modules": sorted(used), "forward_ms": {t: c * 1000 for t, c in cost.items()}, "decode_tok_s": 1 / best}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--sizes", default="1,2,4,6,8,10,12,16,32,128")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--out", default="bench/results/cpu_linear.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    if os.getloadavg()[0] > 0.5:
        print(f"warning: load average {os.getloadavg()[0]:.2f}; benchmark on an idle machine")
    sizes = tuple(int(s) for s in args.sizes.split(","))
    results = {kind: measure(kind, args.model, sizes, args.repeats, args.decode_tokens) for kind in KINDS}
    out = {
        "paths": results,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))

    panel, onednn, plain = (results[k] for k in KINDS)
    print(f"\n{'T':>5} {'panel ms':>9} {'oneDNN ms':>10} {'torch ms':>9} {'vs oneDNN':>10} {'vs torch':>9} {'panel T/1':>10} {'oneDNN T/1':>11}")
    for t in sizes:
        p, o, m = panel["forward_ms"][t], onednn["forward_ms"][t], plain["forward_ms"][t]
        print(
            f"{t:>5} {p:>9.1f} {o:>10.1f} {m:>9.1f} {o / p:>9.2f}x {m / p:>8.2f}x"
            f" {p / panel['forward_ms'][1]:>9.2f}x {o / onednn['forward_ms'][1]:>10.2f}x"
        )
    print(
        f"\nsingle-stream decode: panel {panel['decode_tok_s']:.1f} tok/s, oneDNN {onednn['decode_tok_s']:.1f} "
        f"({panel['decode_tok_s'] / onednn['decode_tok_s']:.2f}x), torch {plain['decode_tok_s']:.1f} "
        f"({panel['decode_tok_s'] / plain['decode_tok_s']:.2f}x)"
    )
    return out


if __name__ == "__main__":
    main()
