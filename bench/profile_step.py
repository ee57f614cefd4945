"""Where a single-stream decode step's time goes, engine level, default model.

    python bench/profile_step.py [--modes gguf,none] [--tokens 64] [--rounds 3] [--out bench/results/step_profile.json]

For each `--quantization` mode, three variants, each in its own process: every layer in one C call
(the default, models/cpu_decoder.py); layer by layer with the C elementwise kernels (RMSNorm with
its residual add, RoPE, SwiGLU's gate; FREELUNCH_CPU_DECODER=layers); layer by layer with PyTorch's
elementwise ops (and FREELUNCH_CPU_ELEMENTWISE=torch). For each: the milliseconds a step spends in
the one C call, in the matmul kernels, in the attention kernel, in the output layer, and in
everything else (PyTorch ops, Python, the engine's bookkeeping), timed by wrapping the calls with
perf_counter (no profiler: its per-call cost would swamp the small ops). Medians of --rounds
interleaved rounds. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from host import machine, run_child  # bench/host.py


def measure(mode: str, tokens: int) -> dict:
    import torch

    from freelunch.config import EngineConfig
    from freelunch.engine.engine import Engine
    from freelunch.engine.request import GenerationRequest, SamplingParams
    from freelunch.kernels import cpu_kernels
    from freelunch.models.cpu_decoder import CpuDecoderStack
    from freelunch.models.loader import load_model, resolve_source

    loaded = load_model(resolve_source(None), quantization=mode)
    engine = Engine(loaded, EngineConfig(max_model_len=2048, quantization=mode))
    spent: dict[str, float] = {}

    def timed(owner, name: str, label: str) -> None:
        inner = getattr(owner, name)

        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                spent[label] = spent.get(label, 0.0) + time.perf_counter() - t

        setattr(owner, name, wrapper)

    timed(loaded.model, "logits", "output layer")  # its matmul is not counted twice: see below
    for name in ("linear", "linear_quantized"):
        timed(cpu_kernels, name, "matmul kernels")
    timed(cpu_kernels, "paged_attention", "attention kernel")
    timed(CpuDecoderStack, "run", "layers in one C call")

    def run(count: int) -> int:
        engine.add_request(GenerationRequest(f"r{time.perf_counter_ns()}", [1, *range(300, 340)], SamplingParams(max_tokens=count, temperature=0.0, ignore_eos=True)))
        steps = 0
        while engine.has_work():
            engine.step()
            steps += 1
        return steps

    run(8)
    spent.clear()
    start = time.perf_counter()
    steps = run(tokens)
    total = time.perf_counter() - start
    ms = {k: 1000 * v / steps for k, v in spent.items()}
    # the output layer's time is its matmul (counted in "matmul kernels") plus a cast
    ms["matmul kernels, layers"] = ms.get("matmul kernels", 0.0) - ms.get("output layer", 0.0)
    ms["step"] = 1000 * total / steps
    ms["other"] = ms["step"] - sum(ms.get(k, 0.0) for k in ("matmul kernels", "attention kernel", "layers in one C call"))
    return {"ms_per_step": ms, "tok_s": tokens / total, "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default="gguf,none")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "step_profile.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--table", metavar="JSON", help="print the table of a results file and exit")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return
    if args.child:
        print("RESULT " + json.dumps(measure(args.child, args.tokens)), flush=True)
        return
    variants = {  # name -> environment
        "layers in one C call": {},
        "layer by layer, elementwise C kernels": {"FREELUNCH_CPU_DECODER": "layers"},
        "layer by layer, elementwise PyTorch ops": {"FREELUNCH_CPU_DECODER": "layers", "FREELUNCH_CPU_ELEMENTWISE": "torch"},
    }
    runs: dict[str, list[dict]] = {}
    for round_ in range(args.rounds):
        for mode in args.modes.split(","):
            for variant, env in variants.items():
                name = f"{mode}, {variant}"
                print(f"... round {round_ + 1}: {name}", file=sys.stderr, flush=True)
                result = run_child([sys.executable, __file__, "--child", mode, "--tokens", str(args.tokens)], env=env)
                if result is not None:
                    runs.setdefault(name, []).append(result)
    results = {
        name: {"tok_s": statistics.median(r["tok_s"] for r in rs), "ms_per_step": {k: statistics.median(r["ms_per_step"][k] for r in rs) for k in rs[0]["ms_per_step"]}}
        for name, rs in runs.items()
    }
    host = machine()
    meta = {"machine": host, "date": time.strftime("%Y-%m-%d"), "args": {k: v for k, v in vars(args).items() if k != "child"}}
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results, "runs": runs}, indent=2) + "\n")
    print(table(json.loads(Path(args.out).read_text())))


def table(data: dict) -> str:
    meta = data["meta"]
    host, a = meta["machine"], meta["args"]
    cols = ["step", "layers in one C call", "matmul kernels, layers", "output layer", "attention kernel", "other"]
    lines = [
        f"Default model, single stream, {a['tokens']} tokens, {host['cpu']} ({host['isa']}), {host['cores']} cores, "
        f"ms a decode step, medians of {a['rounds']} interleaved rounds, {meta['date']}",
        "",
        "| variant | tok/s | " + " | ".join(cols) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in cols) + " |",
    ]
    for name, r in data["results"].items():
        # "matmul kernels, layers" is all matmul time less the output layer's, whose time also holds
        # its cast: with no layer matmuls timed apart (the one C call), a few hundredths below zero
        lines.append(f"| {name} | {r['tok_s']:.1f} | " + " | ".join(f"{max(0.0, r['ms_per_step'].get(c, 0.0)):.2f}" for c in cols) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
