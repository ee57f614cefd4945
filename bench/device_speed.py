"""Native decode speed on the GPU check (bench/device_check.sh): random weights in two shapes,
single stream, 16 and 64 concurrent, and Token Recycling and guidance beside plain decoding.

    python bench/device_speed.py --out DIR [--device cuda] [--shapes default,1.5b] [--tokens 128]

Models are made here, from configs (no download): `default` is SmolLM2-135M-Instruct's shape,
`1.5b` Qwen2.5-1.5B's as a Llama (bench/synthetic_gguf.py's), with the default model's tokenizer.
Random weights decode random text: speed is what this measures (Token Recycling's acceptance on
random weights says nothing of real text; the tokens are checked equal to plain decoding).
Writes device_speed.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

SHAPES = {  # hidden, layers, heads, kv heads, intermediate, vocab, tied embeddings
    "default": (576, 30, 9, 3, 1536, 49152, True),
    "1.5b": (1536, 28, 12, 2, 8960, 49152, False),
    "toy": (64, 2, 4, 2, 128, 49152, True),  # --dry-run
}


def make_model(folder: Path, shape: str) -> None:
    from tiny_models import default_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, kv, inter, vocab, tied = SHAPES[shape]
    cfg = LlamaConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
        intermediate_size=inter, vocab_size=vocab, tie_word_embeddings=tied, max_position_embeddings=2048,
        rope_theta=100000.0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    default_tokenizer().save_pretrained(folder)


def measure(folder: Path, device: str, tokens: int, rounds: int) -> dict:
    from bench_engines import prompts, run_engine
    from freelunch.config import EngineConfig
    from freelunch.engine.request import GenerationRequest, SamplingParams
    from freelunch.pool.local_engine import load_engine

    engine = load_engine(EngineConfig(model=str(folder), dtype="bfloat16", device=device, max_model_len=2048, max_num_seqs=64, kv_cache_gib=4))
    ids = prompts(engine.tokenizer, 64)
    params = lambda: SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    run_engine(engine, [GenerationRequest("warm", ids[0], SamplingParams(max_tokens=8, temperature=0.0))])

    def rate(name: str, methods: dict | None = None, n: int = 1) -> float:
        reqs = [GenerationRequest(f"{name}{i}", ids[i], params(), dict(methods or {})) for i in range(n)]
        seconds, total, _ = run_engine(engine, reqs)
        return total / seconds

    cases = {
        "single": lambda: rate("s"),
        "concurrent16": lambda: rate("c", n=16),
        "concurrent64": lambda: rate("d", n=64),
        "token_recycling": lambda: rate("t", {"speculative": {}}),
        "guidance": lambda: rate("g", {"guidance": {"scale": 1.5}}),
    }
    def tokens_of(name: str, methods: dict) -> list[int]:
        engine.add_request(GenerationRequest(name, ids[1], params(), dict(methods)))
        out: list[int] = []
        while engine.has_work():
            for o in engine.step():
                out.extend(o.new_token_ids)
        return out

    lossless = tokens_of("plain", {}) == tokens_of("recycled", {"speculative": {}})
    got: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):  # interleaved rounds, medians
        for name, case in cases.items():
            got[name].append(case())
    result = {k: statistics.median(v) for k, v in got.items()}
    result["token_recycling_vs_single"] = result["token_recycling"] / result["single"]
    result["guidance_vs_single"] = result["guidance"] / result["single"]
    result["kernels"] = engine.kernels
    result["token_recycling_lossless"] = lossless
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shapes", default="default,1.5b")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    results = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__, "shapes": {}}
    for shape in args.shapes.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            make_model(Path(tmp), shape)
            r = measure(Path(tmp), args.device, args.tokens, args.rounds)
            r["seconds"] = time.perf_counter() - start
        results["shapes"][shape] = r
        print(f"{shape:8} {r['kernels']:24} single {r['single']:8.1f} tok/s  16: {r['concurrent16']:8.1f}  64: {r['concurrent64']:8.1f}  "
              f"TR {r['token_recycling_vs_single']:.2f}x (same tokens: {r['token_recycling_lossless']})  guidance {r['guidance_vs_single']:.2f}x  ({r['seconds']:.0f} s)", flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "device_speed.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
