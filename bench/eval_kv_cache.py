"""What storing the KV cache in fewer bits costs in quality, on the default model: perplexity on
fixed English text and greedy agreement with a float32 cache (eval_quantization.py's text and chats).

    python bench/eval_kv_cache.py [--modes float32,float16,bfloat16,int8] [--activations float|int8]
                                  [--out bench/results/kv_cache_quality.json]

float32, float16, bfloat16: `--kv-cache-dtype`. int8 is simulated, not a feature: each key and value
vector (one token, one KV head: head_dim values) is quantised symmetrically to int8 with its own
scale (max |x| / 127) and stored dequantised in a float32 cache, as an int8 cache with one scale per
vector would give it back. Every attention of the step then reads the cache: prompts are prefilled
in chunks of 16 tokens (a chunk reads its own keys back from the cache too), so perplexity measures
the stored keys and values, not the fresh float32 ones a long prefill attends over. The per-layer
path runs (FREELUNCH_CPU_DECODER=layers: the quantisation is simulated in Python), on the server's
default weights (GGUF blocks). Besides perplexity: the mean and largest change of each scored
token's logprob against the float32 cache, a finer measure than perplexity, whose changes here are
a fraction of a percent. Activations default to float: int8 activations (`--activations int8`)
amplify any change of their input (a value crossing a rounding step of its block moves the whole
row), so a cache's rounding there shows as noise of about the same size whatever its width.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from eval_quantization import MODULES, score  # bench/eval_quantization.py: the same text and chats
from host import machine  # bench/host.py


def int8_per_vector(x):
    """[T, Hkv, D] -> the same values after int8 with one scale per (token, head) vector."""
    import torch

    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / 127
    return (torch.round(x / scale).clamp(-127, 127) * scale).to(x.dtype)


def measure(mode: str, activations: str) -> dict:
    from freelunch.pool.local_engine import install_plugins

    install_plugins()  # constraints and the installed methods, as a worker installs them
    from freelunch.config import EngineConfig
    from freelunch.models.attention import AttentionBatch
    from freelunch.pool.local_engine import load_engine

    attend = AttentionBatch.attend
    if mode == "int8":
        AttentionBatch.attend = lambda self, layer, q, k, v: attend(self, layer, q, int8_per_vector(k), int8_per_vector(v))
    try:
        config = EngineConfig(
            kv_cache_dtype="float32" if mode == "int8" else mode, kv_cache_gib=0.5, enable_prefix_caching=False,
            max_num_batched_tokens=16, activations=activations,
        )  # fmt: skip
        return score(load_engine(config))
    finally:
        AttentionBatch.attend = attend


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default="float32,float16,bfloat16,int8")
    ap.add_argument("--activations", default="float", choices=["float", "int8"])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "kv_cache_quality.json"))
    args = ap.parse_args()
    os.environ["FREELUNCH_CPU_DECODER"] = "layers"  # every write goes through AttentionBatch.attend
    results = {mode: measure(mode, args.activations) for mode in args.modes.split(",")}
    ref = results.get("float32")
    print(f"\nSmolLM2-135M-Instruct (GGUF blocks, {args.activations} activations), {machine()['cpu']}\n")
    print("| KV cache | perplexity | vs float32 | mean / max logprob change | greedy tokens agreeing with float32 (before the first difference) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for mode, r in results.items():
        if ref is not None:
            agree = []
            for a, b in zip(r["greedy"], ref["greedy"]):
                agree.append(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))))
            r["greedy_prefix_agreement"] = sum(agree) / sum(len(b) for b in ref["greedy"])
            r["perplexity_ratio"] = r["perplexity"] / ref["perplexity"]
            change = [abs(a - b) for a, b in zip(r["nll"], ref["nll"])]
            r["logprob_change_mean"], r["logprob_change_max"] = sum(change) / len(change), max(change)
        print(
            f"| {mode} | {r['perplexity']:.4f} | {r.get('perplexity_ratio', 1):.5f}x "
            f"| {r.get('logprob_change_mean', 0):.1e} / {r.get('logprob_change_max', 0):.1e} | {r.get('greedy_prefix_agreement', 1):.0%} |"
        )
    for r in results.values():
        del r["nll"]
    meta = {
        "machine": machine(), "date": time.strftime("%Y-%m-%d"), "modules": MODULES, "activations": args.activations,
        "command": f"python bench/eval_kv_cache.py --activations {args.activations}",
    }  # fmt: skip
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
