"""A Qwen3-shaped model against a Llama-shaped one of the same size: what q/k norms cost a decode step.

    python bench/bench_shapes.py [--shapes tiny,default] [--modes none,int4] [--tokens 64] [--rounds 3] [--out bench/results/shapes.json]

For each shape, two models with random weights (seeded), written once into ~/.cache/freelunch/bench-shapes
(never committed): a LlamaForCausalLM and a Qwen3ForCausalLM (per-head RMSNorm on q and k) of the
same dimensions. `tiny` is the tests' shape (hidden 64, 3 layers); `default` the default model's
(SmolLM2-135M: hidden 576, 30 layers, 9 heads, 3 KV heads, intermediate 1536, vocabulary 49152).
Each is served by the native engine with each --quantization mode and decodes --tokens tokens
greedily after a 32-token prompt, single stream; the two shapes alternate within a round (interleaved),
medians over rounds. Reports tokens/s and Qwen3/Llama, and how each forward ran (one C call or layer
by layer). Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from host import machine  # bench/host.py

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "default": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64),
}


def folder(shape: str, arch: str) -> Path:
    """The model's folder, made on first use."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    from freelunch.config import cache_dir

    path = cache_dir() / "bench-shapes" / f"{arch}-{shape}"
    if (path / "config.json").exists():
        return path
    common = dict(vocab_size=49152, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=True, **SHAPES[shape])
    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen3Config, Qwen3ForCausalLM)
    torch.manual_seed(0)
    model = model_cls(config_cls(**common))
    model.save_pretrained(path, safe_serialization=True)
    _tokenizer(path)
    return path


def _tokenizer(path: Path) -> None:
    """The default model's tokenizer beside the random weights (the engine loads one)."""
    from freelunch.models.loader import load_tokenizer, resolve_source

    load_tokenizer(resolve_source(None)).save_pretrained(path)


def child(shape: str, mode: str, tokens: int, rounds: int) -> dict:
    import torch

    from freelunch.pool.local_engine import install_plugins


    install_plugins()  # constraints and the installed methods, as a worker installs them
    from freelunch.config import EngineConfig
    from freelunch.engine.engine import Engine
    from freelunch.engine.request import GenerationRequest, SamplingParams
    from freelunch.models.loader import load_model, resolve_source

    engines = {}
    for arch in ("llama", "qwen3"):
        path = str(folder(shape, arch))
        loaded = load_model(resolve_source(path), "float32", quantization=mode)
        engines[arch] = Engine(loaded, EngineConfig(model=path, max_model_len=2048, kv_cache_gib=0.25, quantization=mode))
    prompt = torch.randint(100, 40000, (32,), generator=torch.Generator().manual_seed(1)).tolist()

    def decode(engine: Engine, count: int) -> float:
        engine.add_request(GenerationRequest(f"r{time.perf_counter_ns()}", prompt, SamplingParams(max_tokens=count, temperature=0.0, ignore_eos=True)))
        start = time.perf_counter()
        while engine.has_work():
            engine.step()
        return count / (time.perf_counter() - start)

    for engine in engines.values():
        decode(engine, 8)
    runs: dict[str, list[float]] = {arch: [] for arch in engines}
    for _ in range(rounds):
        for arch, engine in engines.items():
            runs[arch].append(decode(engine, tokens))
    return {
        "tok_s": {arch: statistics.median(r) for arch, r in runs.items()},
        "runs": runs,
        "steps_by_path": {arch: engine.steps_by_path for arch, engine in engines.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="tiny,default")
    ap.add_argument("--modes", default="none,int4")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "shapes.json"))
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--table", metavar="JSON", help="print the table of a results file and exit")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return
    if args.child:
        print("RESULT " + json.dumps(child(*args.child, args.tokens, args.rounds)), flush=True)
        return
    from host import run_child

    results = {}
    for shape in args.shapes.split(","):
        for arch in ("llama", "qwen3"):
            folder(shape, arch)
        for mode in args.modes.split(","):
            print(f"... {shape}, {mode}", file=sys.stderr, flush=True)
            got = run_child([sys.executable, __file__, "--child", shape, mode, "--tokens", str(args.tokens), "--rounds", str(args.rounds)])
            if got is not None:
                got["qwen3_vs_llama"] = got["tok_s"]["qwen3"] / got["tok_s"]["llama"]
                results[f"{shape}, {mode}"] = got
    meta = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "args": {k: v for k, v in vars(args).items() if k not in ("child", "table")}}
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(table(json.loads(Path(args.out).read_text())))


def table(data: dict) -> str:
    meta, a = data["meta"], data["meta"]["args"]
    host = meta["machine"]
    lines = [
        f"Random-weight models, single stream, {a['tokens']} tokens greedy after a 32-token prompt, {host['cpu']} ({host['isa']}), "
        f"{host['cores']} cores, medians of {a['rounds']} interleaved rounds, {meta['date']}",
        "",
        "| shape, --quantization | Llama tok/s | Qwen3 tok/s | Qwen3 / Llama | Qwen3 forwards in one C call / per layer |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for name, r in data["results"].items():
        paths = r["steps_by_path"]["qwen3"]
        lines.append(
            f"| {name} | {r['tok_s']['llama']:.1f} | {r['tok_s']['qwen3']:.1f} | {r['qwen3_vs_llama']:.2f}x | "
            f"{paths.get('one_call', 0)} / {paths.get('per_layer', 0)} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
