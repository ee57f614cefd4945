"""vLLM (CPU build) vs our native engine vs transformers `generate`, on the default model.

    python bench/bench_engines.py [--max-tokens 128] [--concurrency 16] [--backends native,vllm,hf,native-tr] [--rounds 1]
                                  [--model FOLDER] [--dtype float32]

Backends: `native` (float32), `native-bf16`, `native-int8`, `native-int4`, `native-gguf`
(--quantization; gguf: the file's own blocks: Q4_1 layers in int4 kernels, the Q8_0 output layer in int8;
quantised backends run `--activations auto`, int8 where our kernels build; a `-float` suffix, e.g.
`native-gguf-float`, keeps float activations), `native-tr` and `native-gguf-tr` (Token Recycling: float32, `gguf`), `hf`,
`hf-bf16`, `vllm`, `vllm-mp`, and `llama.cpp` (llama-cpp-python on the same GGUF, in the
environment whose interpreter --llama-cpp-python names: bench/llama_cpp_child.py). With --rounds R, the backends run R times in turn (interleaved) and
each figure is the median. Also measured: the machine's memory bandwidth (a large copy) and, per
native backend, the weight bytes a decode step reads, hence the fraction of the bandwidth that
single-stream decoding reaches.

Each backend runs in its own subprocess, one after another (vLLM changes process-wide torch
threading, and two heavy processes on 2 cores would slow each other 10-35x): the same chat
prompts, greedy, `ignore_eos` so that every request decodes exactly --max-tokens tokens, float32
(--dtype: the native and vLLM backends' dtype; --model: a model folder instead of the default
model, e.g. a bfloat16 checkpoint with --dtype auto; llama.cpp always runs the default GGUF).
Two numbers per backend: single-stream decode tokens/s (one request at a time) and throughput
with --concurrency requests admitted together. `native-tr` is our engine with Token Recycling,
which the vLLM backend routes to native workers: its single-stream number is the one to compare
with vLLM's plain decoding. `vllm` is our adapter (engine core in-process, all cores for the
model); `vllm-mp` is vLLM as `vllm serve` runs it (engine core in its own process, which by
default keeps a core for itself), driven through vLLM's own API, not ours. Writes JSON (bench/results/engines.json) and prints a table of
ratios against transformers. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from host import machine, run_child, run_llama_cpp  # bench/host.py

CHATS = [
    "Give me three tips for learning a new language.",
    "Translate to French: The weather is nice today, so we will walk to the park.",
    "Why is the sky blue?",
    "Write a short story about a robot who learns to paint.",
    "Explain what a hash table is to a beginner.",
    "A shop sells pens at 3 dollars each. Tom buys 7 pens. How much does he pay?",
    "List five fruits and their colours.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
]


def prompts(tokenizer, count: int) -> list[list[int]]:
    out = []
    for i in range(count):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": CHATS[i % len(CHATS)]}], add_generation_prompt=True, tokenize=False
        )
        out.append(tokenizer.encode(text, add_special_tokens=False))
    return out


def long_prompts(tokenizer, length: int, count: int = 3) -> list[list[int]]:
    """`count` prompts of exactly `length` tokens, from different places of a fixed text (the
    docstrings of standard-library modules, the same on every machine), so no prefix is shared."""
    import importlib

    text = "\n\n".join(importlib.import_module(m).__doc__ or "" for m in ("argparse", "collections", "json", "functools", "pathlib", "typing", "subprocess", "statistics"))
    ids = tokenizer.encode(text, add_special_tokens=False)
    step = max(1, (len(ids) - length) // max(1, count - 1))
    out = [ids[i * step : i * step + length] for i in range(count)]
    if any(len(p) < length for p in out):
        raise ValueError(f"the text holds {len(ids)} tokens: too few for {count} prompts of {length}")
    return out


def run_engine(engine, requests) -> tuple[float, int, float]:
    """(seconds, tokens, seconds to the first token of the first request)."""
    start = time.perf_counter()
    for r in requests:
        engine.add_request(r)
    total, first = 0, None
    while engine.has_work():
        for o in engine.step():
            total += len(o.new_token_ids)
            if first is None and o.new_token_ids:
                first = time.perf_counter() - start
    return time.perf_counter() - start, total, first or 0.0


VARIANTS = {"bf16": ("bfloat16", "none"), "int8": (None, "int8"), "int4": (None, "int4"), "gguf": (None, "gguf")}


def weight_bytes(model) -> int:
    """Bytes one decode step reads in weights: every tensor of every layer but the embedding table
    (one row of it is read; a tied output layer reads all of it and counts as such) and the RoPE
    tables. Packed and quantised layers keep their weights in plain tensor attributes."""
    import torch
    from torch import nn

    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            continue
        tensors = {**module._parameters, **module._buffers, **{k: v for k, v in vars(module).items() if isinstance(v, torch.Tensor)}}
        kernel = module.kernel_matrix() if hasattr(module, "kernel_matrix") else None
        if kernel is not None:  # a layer on our kernels: what they read (the VNNI variants also read wsum)
            tensors = {"packed": kernel.packed, "scales": kernel.scales, "mins": kernel.mins, "bias": kernel.bias}
        for name, t in tensors.items():
            if t is None or t.data_ptr() in seen or name in ("cos", "sin", "inv_freq") or name.startswith("_"):
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def model_folder(args) -> str:
    """--model, else the default model's folder (converted from its GGUF once)."""
    from freelunch.models.loader import default_model_path, gguf_to_folder

    return args.model or str(gguf_to_folder(default_model_path()))


def measure_engine(backend: str, args) -> dict:
    from freelunch.config import EngineConfig
    from freelunch.engine.request import GenerationRequest, SamplingParams

    dtype, quantization = VARIANTS.get(backend.split("-")[1] if "-" in backend else "", (None, "none"))
    speculative = backend.endswith("-tr")
    activations = "float" if "-float" in backend or quantization == "none" else "auto"
    config = EngineConfig(
        model=model_folder(args), dtype=dtype or args.dtype, quantization=quantization, activations=activations,
        max_model_len=2048, max_num_seqs=max(16, args.concurrency),
        kv_cache_gib=1.0, engine="vllm" if backend.startswith("vllm") else "native", enforce_eager=backend == "vllm-eager",
    )  # fmt: skip
    t0 = time.perf_counter()
    if backend.startswith("vllm"):
        from freelunch.backends.vllm_engine import VllmEngine

        engine = VllmEngine(config)
    else:
        from freelunch.pool.local_engine import load_engine

        engine = load_engine(config)
    startup = time.perf_counter() - t0
    methods = {"speculative": {"method": "token_recycling"}} if speculative else {}
    params = lambda: SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)  # noqa: E731
    ids = prompts(engine.tokenizer, max(args.concurrency, args.single, len(CHATS)))
    run_engine(engine, [GenerationRequest("warm", ids[0], SamplingParams(max_tokens=8, temperature=0.0))])
    if speculative:  # the shared table learns from earlier traffic, as a server's does: other prompts
        others = ids[args.single : len(CHATS)]  # `ids` cycles through CHATS
        run_engine(engine, [GenerationRequest(f"learn{i}", p, params(), dict(methods)) for i, p in enumerate(others)])
    single_s, single_tok, ttft = 0.0, 0, []
    for i in range(args.single):
        s, n, first = run_engine(engine, [GenerationRequest(f"s{i}", ids[i], params(), dict(methods))])
        single_s, single_tok = single_s + s, single_tok + n
        ttft.append(first)
    result = {"startup_s": startup, "single_tok_s": single_tok / single_s, "ttft_s": sorted(ttft)[len(ttft) // 2]}
    if args.long_prompt and not speculative:  # a long prompt's prefill alone, to its first token
        firsts = [run_engine(engine, [GenerationRequest(f"long{i}", p, SamplingParams(max_tokens=1, temperature=0.0))])[2]
                  for i, p in enumerate(long_prompts(engine.tokenizer, args.long_prompt))]  # fmt: skip
        result["long_ttft_s"] = sorted(firsts)[len(firsts) // 2]
    if not backend.startswith("vllm"):
        result["weight_bytes_per_step"] = weight_bytes(engine.model)
        result["kernels"] = engine.kernels  # which variant ran (int8-avx512vnni, float-avx2, ...)
    if not speculative:
        s, n, _ = run_engine(engine, [GenerationRequest(f"c{i}", p, params()) for i, p in enumerate(ids[: args.concurrency])])
        result["concurrent_tok_s"] = n / s
    return result


def measure_llama_cpp(args) -> dict | None:
    """llama.cpp on the same GGUF and the same prompt token ids, in its own environment."""
    from freelunch.models.loader import load_tokenizer, resolve_source

    if not args.llama_cpp_python:
        raise SystemExit("the llama.cpp backend needs --llama-cpp-python PATH (an environment with llama-cpp-python)")
    tok = load_tokenizer(resolve_source(None))
    ids = prompts(tok, max(args.single, args.concurrency))
    return run_llama_cpp(
        args.llama_cpp_python, ids, args.max_tokens, single=args.single, concurrency=args.concurrency,
        long_prompts=long_prompts(tok, args.long_prompt) if args.long_prompt else None,
    )


def measure_vllm_mp(args) -> dict:
    """vLLM's own LLMEngine with its default multiprocess engine core, on the same prompts."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import EngineArgs, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.v1.engine.llm_engine import LLMEngine

    from freelunch.models.loader import load_tokenizer, resolve_source

    t0 = time.perf_counter()
    folder = model_folder(args)
    engine = LLMEngine.from_engine_args(
        EngineArgs(model=str(folder), dtype=args.dtype, enforce_eager=True, max_model_len=2048, max_num_seqs=max(16, args.concurrency))
    )
    startup = time.perf_counter() - t0
    ids = prompts(load_tokenizer(resolve_source(str(folder))), max(args.concurrency, args.single))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)

    def run(batch: list[list[int]]) -> tuple[float, int, float]:
        start, total, first = time.perf_counter(), 0, None
        for i, p in enumerate(batch):
            engine.add_request(f"r{time.perf_counter_ns()}-{i}", TokensPrompt(prompt_token_ids=p), params)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    total += len(out.outputs[0].token_ids)
                elif first is None:
                    first = time.perf_counter() - start
        return time.perf_counter() - start, total, first or 0.0

    run([ids[0]])
    single = [run([ids[i]]) for i in range(args.single)]
    s, n, _ = run(ids[: args.concurrency])
    return {
        "startup_s": startup,
        "single_tok_s": sum(x[1] for x in single) / sum(x[0] for x in single),
        "ttft_s": sorted(x[2] for x in single)[len(single) // 2],
        "concurrent_tok_s": n / s,
    }


def measure_hf(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    folder = model_folder(args)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16 if args.child == "hf-bf16" else torch.float32).eval()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    startup = time.perf_counter() - t0
    ids = prompts(tok, max(args.concurrency, args.single))
    gen = dict(max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens, do_sample=False, pad_token_id=tok.pad_token_id or 0)
    with torch.inference_mode():
        model.generate(torch.tensor([ids[0]]), max_new_tokens=8, do_sample=False)
        single_s = 0.0
        for i in range(args.single):
            t = time.perf_counter()
            model.generate(torch.tensor([ids[i]]), **gen)
            single_s += time.perf_counter() - t
        batch = ids[: args.concurrency]
        width = max(len(p) for p in batch)
        inputs = torch.tensor([[gen["pad_token_id"]] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        t = time.perf_counter()
        model.generate(inputs, attention_mask=mask, **gen)
        batch_s = time.perf_counter() - t
    return {
        "startup_s": startup,
        "single_tok_s": args.single * args.max_tokens / single_s,
        "concurrent_tok_s": len(batch) * args.max_tokens / batch_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", default="hf,native,native-tr,vllm,vllm-mp")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--single", type=int, default=3, help="single-stream requests (run one after another)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--model", help="a model folder (default: the default model)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--long-prompt", type=int, default=1500, help="tokens of the prompts whose time to first token is measured (0: none)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "engines.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--llama-cpp-python", help="interpreter of an environment with llama-cpp-python: adds the llama.cpp backend")
    ap.add_argument("--table", metavar="JSON", help="print the table of a results file and exit")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return
    if args.child:  # one backend, in this subprocess: print its JSON
        measure = {"hf": measure_hf, "hf-bf16": measure_hf, "vllm-mp": measure_vllm_mp}.get(args.child)
        result = measure(args) if measure else measure_engine(args.child, args)
        print("RESULT " + json.dumps(result), flush=True)
        return
    runs: dict[str, list[dict]] = {}
    for round_ in range(args.rounds):  # interleaved: every backend once per round
        for backend in args.backends.split(","):
            print(f"... round {round_ + 1}: {backend}", file=sys.stderr, flush=True)
            if backend == "llama.cpp":
                result = measure_llama_cpp(args)
            else:
                cmd = [sys.executable, __file__, "--child", backend, "--max-tokens", str(args.max_tokens), "--single", str(args.single),
                       "--concurrency", str(args.concurrency), "--dtype", args.dtype, "--long-prompt", str(args.long_prompt),
                       *(["--model", args.model] if args.model else [])]  # fmt: skip
                result = run_child(cmd)
            if result is not None:
                runs.setdefault(backend, []).append(result)
    median = lambda rs, k: statistics.median(r[k] for r in rs) if isinstance(rs[0][k], (int, float)) else rs[0][k]  # noqa: E731
    results = {name: {k: median(rs, k) for k in rs[0]} | {"rounds": len(rs)} for name, rs in runs.items()}
    bandwidth = memory_bandwidth()
    for r in results.values():
        if "weight_bytes_per_step" in r:
            r["bandwidth_fraction"] = r["single_tok_s"] * r["weight_bytes_per_step"] / bandwidth
    host = machine()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": host, "memory_bandwidth_bytes_s": bandwidth, "date": time.strftime("%Y-%m-%d"), "args": {k: v for k, v in vars(args).items() if k != "child"}}
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results, "runs": runs}, indent=2) + "\n")
    print(table(json.loads(Path(args.out).read_text())))


NAMES = {
    "hf": "transformers float32", "hf-bf16": "transformers bfloat16", "native": "native float32", "native-bf16": "native bfloat16",
    "native-int8": "native `--quantization int8`", "native-int4": "native `--quantization int4`",
    "native-gguf": "native `--quantization gguf` (default)", "native-gguf-float": "native `--quantization gguf --activations float`",
    "native-tr": "native + Token Recycling",
    "native-gguf-tr": "native `--quantization gguf` + Token Recycling",
    "vllm": "vLLM-CPU (`--engine vllm`)", "vllm-eager": "vLLM-CPU (`--engine vllm --enforce-eager`)", "vllm-mp": "vLLM-CPU (its own engine process)", "llama.cpp": "llama.cpp (llama-cpp-python)",
}  # fmt: skip


def table(data: dict) -> str:
    """A results file as markdown: its machine, then a row per backend with ratios against
    transformers' faster dtype (single stream), llama.cpp (single stream) and vLLM-CPU (concurrent)."""
    meta, results = data["meta"], data["results"]
    host, a = meta["machine"], meta["args"]
    hf = max((results[h] for h in ("hf", "hf-bf16") if h in results), key=lambda r: r["single_tok_s"], default={})
    anchors = {"single_tok_s": [hf, results.get("llama.cpp", {})], "concurrent_tok_s": [results.get("vllm", {}), results.get("llama.cpp", {})]}
    long = a.get("long_prompt", 0)
    model = f"{a['model']} (`--dtype {a['dtype']}` for the native and vLLM rows)" if a.get("model") else "SmolLM2-135M-Instruct"
    lines = [
        f"{model}, {a['max_tokens']} tokens a request, {host['cpu']} ({host['isa']}: {' '.join(host['features'])}), "
        f"{host['cores']} cores, memory bandwidth {meta['memory_bandwidth_bytes_s'] / 1e9:.1f} GB/s, medians of {a['rounds']} "
        f"interleaved round(s), {meta['date']}",
        "",
        f"| backend | kernels | single stream, tok/s | vs transformers | vs llama.cpp | weight bytes a step | of bandwidth | TTFT ms | "
        f"TTFT ms, {long}-token prompt | vs llama.cpp | {a['concurrency']} concurrent, tok/s | vs vLLM-CPU | vs llama.cpp |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]  # fmt: skip
    for name, r in results.items():
        ratio = lambda key, ref: f"{r[key] / ref[key]:.2f}x" if key in r and key in ref else ""  # noqa: E731
        cells = [
            NAMES.get(name, name) if name != "native" or a.get("dtype", "float32") == "float32" else f"native `--dtype {a['dtype']}`",
            r.get("kernels", ""), f"{r['single_tok_s']:.1f}", *(ratio("single_tok_s", ref) for ref in anchors["single_tok_s"]),
            f"{r['weight_bytes_per_step'] / 1e6:.0f} MB" if "weight_bytes_per_step" in r else "",
            f"{r['bandwidth_fraction']:.0%}" if "bandwidth_fraction" in r else "", f"{1000 * r['ttft_s']:.0f}" if "ttft_s" in r else "",
            f"{1000 * r['long_ttft_s']:.0f}" if "long_ttft_s" in r else "", ratio("long_ttft_s", results.get("llama.cpp", {})),
            f"{r['concurrent_tok_s']:.1f}" if "concurrent_tok_s" in r else "", *(ratio("concurrent_tok_s", ref) for ref in anchors["concurrent_tok_s"]),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def memory_bandwidth() -> float:
    """Bytes per second of a large copy (read + write), with all threads, median of 5."""
    import torch

    src = torch.ones(64 << 20)  # 256 MB: far beyond any cache
    dst = torch.empty_like(src)
    times = []
    for _ in range(6):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return 2 * src.numel() * src.element_size() / statistics.median(times[1:])

if __name__ == "__main__":
    main()
