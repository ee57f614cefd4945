"""Token Recycling vs plain decoding vs transformers' prompt-lookup decoding, by prompt category.

    python bench/bench_token_recycling.py [--max-tokens 128] [--trees default,4,8,2.2.2] [--skip-hf]

`default` is what a request without `tree` gets: the tree chosen from the measured verify cost
and the acceptance observed so far (it starts from a prior and learns as the run goes on).

Protocol (as the paper's Spec-Bench runs): the adjacency table is first warmed on WARMUP, other
prompts of the same categories (the traffic a server saw before), then every prompt is measured
the first time the table sees it, the table carrying on from category to category. Every tree
starts a category from the same table. `--repeat` also measures a second pass over the same
prompts (a client that sends the same request again), reported apart as `<tree>-repeat`: that
is the table's best case, not what a new prompt gets.
Also measures what verifying T tokens in one forward costs relative to one token (the number
that decides the tree size on this hardware). Single stream, greedy, float32, same model for
all. Writes JSON (default bench/results/token_recycling.json) and prints tables. Run it on an
idle machine: two heavy processes on 2 cores slow each other 10-35x.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from freelunch.benchmark_prompts import SPEC_PROMPTS as PROMPTS, SPEC_WARMUP as WARMUP


def run_engine(engine, prompts: list[list[int]], max_tokens: int, spec: dict | None) -> dict:
    from freelunch.engine.request import GenerationRequest, SamplingParams

    tokens, seconds, accepted, nodes = 0, 0.0, [], []
    for i, ids in enumerate(prompts):
        methods = {"speculative": dict(spec)} if spec is not None else {}
        engine.add_request(GenerationRequest(f"b{time.monotonic_ns()}-{i}", ids, SamplingParams(max_tokens=max_tokens, temperature=0), methods))
        start = time.perf_counter()
        while engine.has_work():
            for out in engine.step():
                tokens += len(out.new_token_ids)
                if out.finished and out.method_stats:
                    accepted.append(out.method_stats["speculative"]["mean_accepted_tokens_per_step"])
                    nodes.append(out.method_stats["speculative"].get("tree_nodes", 0))
        seconds += time.perf_counter() - start
    result = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "mean_accepted": statistics.mean(accepted) if accepted else 1.0}
    if nodes:
        result["tree_nodes"] = nodes  # per request (the default tree may change as it learns)
    return result


def _mean_runs(a: dict, b: dict) -> dict:
    seconds = (a["seconds"] + b["seconds"]) / 2
    return {"tokens": a["tokens"], "seconds": seconds, "tokens_per_s": a["tokens"] / seconds, "mean_accepted": 1.0, "runs_tokens_per_s": [a["tokens_per_s"], b["tokens_per_s"]]}


def run_prompt_lookup(hf_model, prompts: list[list[int]], max_tokens: int) -> dict:
    tokens, seconds = 0, 0.0
    for ids in prompts:
        x = torch.tensor([ids])
        start = time.perf_counter()
        out = hf_model.generate(x, max_new_tokens=max_tokens, do_sample=False, prompt_lookup_num_tokens=10)
        seconds += time.perf_counter() - start
        tokens += out.shape[1] - len(ids)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--trees", default="default,4,8,2.2.2", help="comma-separated: default, node counts, 2.2.2")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--repeat", action="store_true", help="also measure a second pass over the same prompts")
    parser.add_argument("--no-prompt-seed", action="store_true", help="ablation: the paper's table, unseeded by prompts")
    parser.add_argument("--out", default="bench/results/token_recycling.json")
    args = parser.parse_args(argv)
    if args.no_prompt_seed:
        from freelunch.methods.token_recycling import AdjacencyTable

        AdjacencyTable.seed = lambda self, tokens: None  # this process only

    from freelunch.config import EngineConfig
    from freelunch.pool.local_engine import install_plugins

    install_plugins()  # constraints and the installed methods, as a worker installs them
    from freelunch.engine.engine import Engine
    from freelunch.models.loader import load_model, resolve_source

    torch.set_num_threads(os.cpu_count() or 1)
    if os.getloadavg()[0] > 0.5:
        print(f"warning: load average {os.getloadavg()[0]:.2f}; benchmark on an idle machine")
    source = resolve_source(args.model)
    loaded = load_model(source, "float32")
    tok = loaded.tokenizer

    def encode(conversation: list[dict]) -> list[int]:
        ids = tok.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True)
        return ids if isinstance(ids, list) else list(ids["input_ids"])  # newer transformers return a BatchEncoding

    encoded = {cat: [encode(m) for m in convs] for cat, convs in PROMPTS.items()}
    warmup = [encode(m) for m in WARMUP]
    trees: list = [t if t in ("2.2.2", "default") else int(t) for t in args.trees.split(",")]

    # no prefix cache: the runs compared decode the same chats, and the later one would find their prompts cached
    engine = Engine(loaded, EngineConfig(kv_cache_gib=0.5, enable_prefix_caching=False))
    cost = engine.runner.forward_cost(len(encoded["code"][0]), (1, 2, 4, 8, 12, 16, 20, 32, 48, 81), repeats=5)
    results: dict = {"verify_cost_s": cost, "categories": {}}
    hf_model = None
    if not args.skip_hf:
        from transformers import AutoModelForCausalLM

        folder = source.path if not source.is_gguf else None
        from freelunch.models.loader import gguf_to_folder

        folder = gguf_to_folder(source.path) if source.is_gguf else source.path
        hf_model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    run_engine(engine, warmup, args.max_tokens, {"method": "token_recycling"})  # the traffic before
    for cat, prompts in encoded.items():
        row: dict = {}
        # Plain decoding runs before and after the speculative runs (their mean is the baseline):
        # this VM's speed drifts by 10-20% over minutes, and a ratio should not ride on that.
        before = run_engine(engine, prompts, args.max_tokens, None)
        tables = engine.info.shared_state.setdefault("token_recycling", {})
        start_state, kept_state = copy.deepcopy(tables), None
        for tree in trees:
            # Every tree starts from the same tables (warmed on WARMUP and the earlier categories:
            # the paper's "inherit") and meets this category's prompts for the first time.
            tables.clear()
            tables.update(copy.deepcopy(start_state))
            spec = {"method": "token_recycling"} | ({} if tree == "default" else {"tree": tree})
            row[f"tr-{tree}"] = run_engine(engine, prompts, args.max_tokens, spec)
            kept_state = kept_state or copy.deepcopy(tables)  # the first tree's (default's) tables go on
            if args.repeat:
                row[f"tr-{tree}-repeat"] = run_engine(engine, prompts, args.max_tokens, spec)
        tables.clear()
        tables.update(kept_state or start_state)
        after = run_engine(engine, prompts, args.max_tokens, None)
        row = {"plain": _mean_runs(before, after)} | row
        if hf_model is not None:
            with torch.inference_mode():
                row["hf-prompt-lookup"] = run_prompt_lookup(hf_model, prompts, args.max_tokens)
        results["categories"][cat] = row
        print(cat, {k: round(v["tokens_per_s"], 1) for k, v in row.items()}, flush=True)

    methods = list(next(iter(results["categories"].values())))
    speedups = {m: statistics.mean(r[m]["tokens_per_s"] / r["plain"]["tokens_per_s"] for r in results["categories"].values()) for m in methods}
    results["mean_speedup_vs_plain"] = speedups
    results["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}

    print("\nverify cost (forward of T tokens / forward of 1):")
    print("  " + "  ".join(f"T={t}: {c / cost[1]:.2f}" for t, c in cost.items()))
    print(f"\n{'category':<14}" + "".join(f"{m:>22}" for m in methods))
    for cat, row in results["categories"].items():
        cells = []
        for m in methods:
            r = row[m]
            extra = f" ({r['mean_accepted']:.2f})" if m.startswith("tr-") else ""
            cells.append(f"{r['tokens_per_s']:.1f} tok/s{extra}")
        print(f"{cat:<14}" + "".join(f"{c:>22}" for c in cells))
    print(f"{'speed-up':<14}" + "".join(f"{speedups[m]:>21.2f}x" for m in methods))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
