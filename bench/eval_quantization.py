"""What a dtype or `--quantization` costs in quality, on the default model: perplexity on fixed
English text, and how often greedy decoding agrees with float32.

    python bench/eval_quantization.py [--modes float32,bfloat16,int8,int4,gguf,int8/int8,int4/int8,gguf/int8]
                                      [--out bench/results/quantization_quality.json]

A mode `Q/int8` is `--quantization Q --activations int8` (each layer's input quantised to int8 in
blocks of 32, integer dot products); a plain `Q` keeps float activations.

Engine level. Text: the docstrings of a fixed list of Python standard-library modules (shipped
with every Python, so the same text everywhere), cut into 256-token pieces, scored with prompt
logprobs. Agreement: 8 chats decoded greedily for 64 tokens; the fraction of tokens equal to
float32's before the first difference (a divergence makes the rest incomparable). Not a task
benchmark: a check that quantisation keeps the model's distribution, measured the same way for
every mode. The KV cache is float32 in every mode (its 16-bit storage: bench/eval_kv_cache.py).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import time
from pathlib import Path

from bench_engines import CHATS, prompts  # the chats every engine benchmark decodes
from host import machine  # bench/host.py

MODULES = ["json", "argparse", "collections", "functools", "itertools", "pathlib", "statistics", "textwrap", "heapq", "bisect"]


def run(engine, requests) -> dict:
    for r in requests:
        engine.add_request(r)
    out: dict = {}
    while engine.has_work():
        for o in engine.step():
            got = out.setdefault(o.request_id, {"tokens": [], "prompt_logprobs": None})
            got["tokens"] += o.new_token_ids
            got["prompt_logprobs"] = o.prompt_logprobs or got["prompt_logprobs"]
    return out


def measure(mode: str) -> dict:
    from freelunch.pool.local_engine import install_plugins

    install_plugins()  # constraints and the installed methods, as a worker installs them
    from freelunch.config import EngineConfig
    from freelunch.pool.local_engine import load_engine

    weights, _, activations = mode.partition("/")
    dtype, quantization = ("bfloat16", "none") if weights == "bfloat16" else ("float32", "none" if weights == "float32" else weights)
    config = EngineConfig(
        dtype=dtype, quantization=quantization, activations=activations or ("auto" if quantization == "none" else "float"),
        kv_cache_gib=0.5, enable_prefix_caching=False, kv_cache_dtype="float32",  # the weights' and activations' effect alone
    )
    result = score(load_engine(config))
    del result["nll"]
    return result


def score(engine) -> dict:
    """The engine's perplexity on the docstrings of MODULES (its per-token negative log-likelihoods,
    in text order, as `nll`) and its greedy tokens on bench_engines.py's chats."""
    from freelunch.engine.request import GenerationRequest, SamplingParams

    tok = engine.tokenizer
    text = "\n\n".join(importlib.import_module(m).__doc__ or "" for m in MODULES)
    ids = tok.encode(text)
    pieces = [ids[i : i + 256] for i in range(0, len(ids) - 256, 256)]
    scored = run(engine, [GenerationRequest(f"p{i}", p, SamplingParams(max_tokens=0, prompt_logprobs=0)) for i, p in enumerate(pieces)])
    nll = [-lp.logprob for i in range(len(pieces)) for lp in scored[f"p{i}"]["prompt_logprobs"][1:]]
    chats = prompts(tok, len(CHATS))
    greedy = run(engine, [GenerationRequest(f"c{i}", p, SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)) for i, p in enumerate(chats)])
    return {"perplexity": math.exp(sum(nll) / len(nll)), "scored_tokens": len(nll), "nll": nll,
            "greedy": [greedy[f"c{i}"]["tokens"] for i in range(len(chats))]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default="float32,bfloat16,int8,int4,gguf,int8/int8,int4/int8,gguf/int8")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "quantization_quality.json"))
    args = ap.parse_args()
    results = {mode: measure(mode) for mode in args.modes.split(",")}
    ref = results.get("float32")
    print(f"\nSmolLM2-135M-Instruct, {machine()['cpu']}\n\n| mode | perplexity | vs float32 | greedy tokens agreeing with float32 (before the first difference) |")
    print("| --- | ---: | ---: | ---: |")
    for mode, r in results.items():
        if ref is not None:
            agree = []
            for a, b in zip(r["greedy"], ref["greedy"]):
                n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                agree.append(n)
            r["greedy_prefix_agreement"] = sum(agree) / sum(len(b) for b in ref["greedy"])
            r["perplexity_ratio"] = r["perplexity"] / ref["perplexity"]
        print(f"| {mode} | {r['perplexity']:.3f} | {r.get('perplexity_ratio', 1):.4f}x | {r.get('greedy_prefix_agreement', 1):.0%} |")
    meta = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "modules": MODULES, "command": "python bench/eval_quantization.py"}
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
