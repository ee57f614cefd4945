"""What a structured output costs, and what Token Recycling gives under one.

    python bench/bench_structured.py [--out bench/results/structured.json]

Engine level, the embedded model as the server loads it by default (its GGUF's own blocks), under
the schema as the API hands it over (free strings and numbers bounded, single-spaced), greedy,
every core:
  - decode tokens/s of chats under a JSON schema against the same chats unconstrained, at batch 1
    and 16 (interleaved rounds, medians);
  - grammar compile time for a typical tool schema and a large schema, cold and cached;
  - Token Recycling under the schema (jump-forward on and off) against constrained greedy, on the
    chats the table has not seen after a warm-up on others (outputs checked identical).
Writes JSON and prints tables. Run it on an idle machine; it prints the CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch
from host import machine  # bench/host.py

CHATS = [
    "List three European cities with their countries and populations as JSON.",
    "Describe a book: title, author, year and two themes.",
    "Give the weather for Paris, Rome and Oslo as JSON.",
    "Make a shopping list of five items with quantities.",
    "Describe a person named Sam: age, job and hobbies.",
    "Three facts about the Moon, as JSON.",
    "A recipe for tea: name, steps and time.",
    "Two planets with their moons, as JSON.",
]
WARMUP = ["Describe a car as JSON.", "A list of two animals with their sounds.", "A city and its river, as JSON."]
SCHEMA = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "kind": {"type": "string"}, "value": {"type": "integer"}},
                "required": ["name", "kind", "value"],
                "additionalProperties": False,
            },
            "minItems": 3,
            "maxItems": 3,
        }
    },
    "required": ["items"],
    "additionalProperties": False,
}
TOOL_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}, "days": {"type": "integer", "minimum": 1, "maximum": 14}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
LARGE_SCHEMA = {
    "type": "object",
    "$defs": {
        "address": {"type": "object", "properties": {k: {"type": "string"} for k in ("street", "city", "zip", "country")},
                    "required": ["street", "city", "zip", "country"], "additionalProperties": False},
    },
    "properties": {
        **{f"field_{i}": {"anyOf": [{"type": "integer"}, {"type": "string"}, {"$ref": "#/$defs/address"}]} for i in range(40)},
        "tags": {"type": "array", "items": {"enum": [f"tag{j}" for j in range(200)]}, "maxItems": 10},
    },
    "required": [f"field_{i}" for i in range(40)],
    "additionalProperties": False,
}




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--out", default="bench/results/structured.json")
    args = parser.parse_args()

    from freelunch.pool.local_engine import install_plugins

    install_plugins()  # constraints and the installed methods, as a worker installs them
    from freelunch.config import EngineConfig
    from freelunch.constraints.grammar import GrammarCompiler
    from freelunch.constraints.json_layout import DEFAULT_MAX_NUMBER_DIGITS, DEFAULT_MAX_STRING_LENGTH, bounded_schema
    from freelunch.engine.engine import Engine
    from freelunch.engine.request import ConstraintSpec, GenerationRequest, SamplingParams
    from freelunch.models.loader import load_model, resolve_source

    torch.set_num_threads(os.cpu_count() or 1)
    if os.getloadavg()[0] > 0.5:
        print(f"warning: load average {os.getloadavg()[0]:.2f}; benchmark on an idle machine")
    loaded = load_model(resolve_source(None), "auto", quantization="auto")
    tok = loaded.tokenizer
    # no prefix cache: the runs compared decode the same chats, and the later one would find their prompts cached
    engine = Engine(loaded, EngineConfig(kv_cache_gib=0.5, enable_prefix_caching=False))
    spec = ConstraintSpec("json_schema", json.dumps(bounded_schema(SCHEMA, DEFAULT_MAX_STRING_LENGTH, DEFAULT_MAX_NUMBER_DIGITS)))

    def encode(text: str) -> list[int]:
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        return ids if isinstance(ids, list) else list(ids["input_ids"])

    chats, warm = [encode(c) for c in CHATS], [encode(c) for c in WARMUP]

    def run(prompts: list[list[int]], constraint, methods=None) -> dict:
        """All prompts at once; decode tokens/s after each request's first token, and the outputs."""
        for i, ids in enumerate(prompts):
            engine.add_request(GenerationRequest(f"b{time.monotonic_ns()}-{i}", ids, SamplingParams(max_tokens=args.max_tokens, temperature=0), dict(methods or {}), constraint=constraint))
        out: dict[str, list[int]] = {}
        start, first = time.perf_counter(), None
        stats = []
        while engine.has_work():
            for o in engine.step():
                out.setdefault(o.request_id, []).extend(o.new_token_ids)
                if o.finished and o.method_stats and "speculative" in o.method_stats:
                    stats.append(o.method_stats["speculative"]["mean_accepted_tokens_per_step"])
            first = first or time.perf_counter()
        seconds = time.perf_counter() - first
        tokens = sum(len(v) for v in out.values()) - len(prompts)
        return {"tokens_per_s": tokens / seconds, "seconds": time.perf_counter() - start, "outputs": [out[k] for k in sorted(out)],
                "mean_accepted": statistics.mean(stats) if stats else None}

    result: dict = {"machine": {**machine(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")},
                    "command": "python bench/bench_structured.py", "max_tokens": args.max_tokens}

    # 1. overhead at batch 1 and 16, interleaved rounds
    overhead = {}
    for batch in (1, 16):
        prompts = (chats * 2)[:batch] if batch > 1 else chats[:1]
        runs = {"unconstrained": [], "json_schema": []}
        for _ in range(args.rounds):
            runs["unconstrained"].append(run(prompts, None)["tokens_per_s"])
            runs["json_schema"].append(run(prompts, spec)["tokens_per_s"])
        free, constrained = statistics.median(runs["unconstrained"]), statistics.median(runs["json_schema"])
        overhead[str(batch)] = {"unconstrained_tps": free, "json_schema_tps": constrained, "ratio": constrained / free, "runs": runs}
        print(f"batch {batch}: unconstrained {free:.1f} tok/s, json_schema {constrained:.1f} tok/s ({constrained / free:.2f}x)", flush=True)
    result["overhead"] = overhead

    # 2. compile time, cold and cached
    compiler = GrammarCompiler(tok, loaded.model.config.vocab_size)
    compile_s = {}
    for name, schema in (("tool_schema", TOOL_SCHEMA), ("large_schema", LARGE_SCHEMA)):
        s = ConstraintSpec("json_schema", json.dumps(schema))
        t = time.perf_counter()
        compiler.compile(s)
        cold = time.perf_counter() - t
        t = time.perf_counter()
        compiler.compile(s)
        compile_s[name] = {"cold_ms": cold * 1e3, "cached_ms": (time.perf_counter() - t) * 1e3}
        print(f"compile {name}: cold {cold * 1e3:.1f} ms, cached {compile_s[name]['cached_ms']:.3f} ms", flush=True)
    result["compile"] = compile_s

    # 3. Token Recycling under the schema: warm-up on other chats, then each chat once, one at a time
    run(warm, spec, {"speculative": {"method": "token_recycling"}})
    tr: dict = {}
    plain_s, plain_out = 0.0, []
    for ids in chats:
        r = run([ids], spec)
        plain_s += r["seconds"]
        plain_out += r["outputs"]
    warmed = copy.deepcopy(engine.info.shared_state["token_recycling"])
    for name, jump in (("token_recycling", True), ("token_recycling_no_jump_forward", False)):
        engine.info.shared_state["token_recycling"] = copy.deepcopy(warmed)  # each from the same table
        secs, outs, accepted = 0.0, [], []
        for ids in chats:
            r = run([ids], spec, {"speculative": {"method": "token_recycling", "jump_forward": jump}})
            secs += r["seconds"]
            outs += r["outputs"]
            accepted.append(r["mean_accepted"])
        tr[name] = {"speedup_vs_constrained_greedy": plain_s / secs, "identical_outputs": outs == plain_out,
                    "mean_accepted_tokens_per_step": statistics.mean(a for a in accepted if a)}
        print(f"{name}: {plain_s / secs:.2f}x constrained greedy, accepted {tr[name]['mean_accepted_tokens_per_step']:.2f}/step, "
              f"identical {outs == plain_out}", flush=True)
    result["token_recycling"] = tr
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{result['machine']['cpu']}, {os.cpu_count()} cores; wrote {args.out}")


if __name__ == "__main__":
    main()
