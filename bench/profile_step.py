"""Where a decode step's time goes, engine level, default model.

    python bench/profile_step.py [--modes gguf,none] [--tokens 64] [--rounds 3] [--out bench/results/step_profile.json]
    python bench/profile_step.py --methods [--tokens 96] [--rounds 3] [--out bench/results/step_profile_methods.json]

Decoders (the default): for each `--quantization` mode, three variants, each in its own process:
every layer in one C call (the default, models/cpu_decoder.py); layer by layer with the C
elementwise kernels (RMSNorm with its residual add, RoPE, SwiGLU's gate; FREELUNCH_CPU_DECODER=layers);
layer by layer with PyTorch's elementwise ops (and FREELUNCH_CPU_ELEMENTWISE=torch). For each: the
milliseconds a step spends in the one C call, in the matmul kernels, in the attention kernel, in the
output layer, and in everything else (PyTorch ops, Python, the engine's bookkeeping), timed by
wrapping the calls with perf_counter (no profiler: its per-call cost would swamp the small ops).

Methods (--methods): plain decoding, guidance (scale 1.5), Token Recycling and Token Recycling over
guidance (each with its default tree, which may be none where no tree pays), and Token Recycling
with a fixed 4-node tree (a verify step every step: what drafting and verifying cost), greedy, single stream, on the chats of freelunch.benchmark_prompts that the server has not
seen (each method in a fresh process per round: the adjacency table is warmed on the warm-up chats
only). For each, per step and per token: the model's forward (the runner: layers and output layer),
the method's planning (Token Recycling drafts there), its handling of the logits (guidance's
combination; Token Recycling's verification, acceptance and table update), sampling, and the rest
of the engine's step; and each method's work outside the forward as a share of a plain step.

Medians of --rounds interleaved rounds. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from host import machine, run_child  # bench/host.py


def timed(spent: dict[str, float], owner: object, attr: str, label: str) -> None:
    """Wrap owner.attr so that its calls add their seconds to spent[label]."""
    inner = getattr(owner, attr)

    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[label] = spent.get(label, 0.0) + time.perf_counter() - t

    setattr(owner, attr, wrapper)


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

    timed(spent, loaded.model, "logits", "output layer")  # its matmul is not counted twice: see below
    for name in ("linear", "matrix_apply"):
        timed(spent, cpu_kernels, name, "matmul kernels")
    timed(spent, cpu_kernels, "paged_attention", "attention kernel")
    timed(spent, CpuDecoderStack, "run", "layers in one C call")

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


DEFAULT_OUT = str(Path(__file__).parent / "results" / "step_profile.json")
METHODS = {  # name -> request options
    "plain": {},
    "guidance": {"guidance": {"scale": 1.5}},
    "token recycling": {"speculative": {"method": "token_recycling"}},
    "token recycling + guidance": {"speculative": {"method": "token_recycling"}, "guidance": {"scale": 1.5}},
    # a tree every step, whether it pays or not: what verifying costs beside the forward
    "token recycling, 4-node tree": {"speculative": {"method": "token_recycling", "tree": 4}},
}
PARTS = ("forward", "planning", "logits handling", "sampling", "rest of the step")


def measure_method(name: str, tokens: int) -> dict:
    from freelunch.pool.local_engine import install_plugins

    install_plugins()  # constraints and the installed methods, as a worker installs them
    from freelunch.benchmark_prompts import SPEC_PROMPTS, SPEC_WARMUP
    from freelunch.config import EngineConfig
    from freelunch.engine import engine as engine_module
    from freelunch.engine.engine import Engine
    from freelunch.engine.request import GenerationRequest, SamplingParams
    from freelunch.engine.strategy import DecodingStrategy
    from freelunch.methods.pipeline import Pipeline
    from freelunch.models.loader import load_model, resolve_source

    loaded = load_model(resolve_source(None), quantization="gguf")
    engine = Engine(loaded, EngineConfig(max_model_len=2048, quantization="gguf"))
    tok = loaded.tokenizer
    spent: dict[str, float] = {}

    timed(spent, engine.runner, "run", "forward")
    for cls in (DecodingStrategy, Pipeline):
        timed(spent, cls, "plan", "planning")
        timed(spent, cls, "on_logits", "logits handling")
    timed(spent, engine_module, "sample", "sampling")

    def encode(chat: list[dict]) -> list[int]:
        ids = tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)
        return ids if isinstance(ids, list) else list(ids["input_ids"])  # newer transformers return a BatchEncoding

    def run(prompt: list[int], count: int) -> tuple[int, int, float]:
        request = GenerationRequest(f"r{time.perf_counter_ns()}", prompt, SamplingParams(max_tokens=count, temperature=0.0), METHODS[name])
        engine.add_request(request)
        steps = produced = 0
        start = time.perf_counter()
        while engine.has_work():
            for out in engine.step():
                produced += len(out.new_token_ids)
            steps += 1
        return steps, produced, time.perf_counter() - start

    for chat in SPEC_WARMUP:
        run(encode(chat), tokens)
    spent.clear()
    steps = produced = 0
    total = 0.0
    for chats in SPEC_PROMPTS.values():
        for chat in chats:
            prompt = encode(chat)
            s, n, t = run(prompt, tokens)
            steps, produced, total = steps + s, produced + n, total + t
    ms = {k: 1000 * v / steps for k, v in spent.items()}
    ms["rest of the step"] = 1000 * total / steps - sum(ms.values())
    return {"tok_s": produced / total, "tokens": produced, "steps": steps, "ms_per_step": ms, "ms_per_token": 1000 * total / produced}


def methods_main(args) -> None:
    runs: dict[str, list[dict]] = {}
    for round_ in range(args.rounds):
        for name in METHODS:
            print(f"... round {round_ + 1}: {name}", file=sys.stderr, flush=True)
            result = run_child([sys.executable, __file__, "--method-child", name, "--tokens", str(args.tokens)])
            if result is not None:
                runs.setdefault(name, []).append(result)
    results = {}
    for name, rs in runs.items():
        med = lambda f: statistics.median(f(r) for r in rs)  # noqa: E731
        results[name] = {
            "tok_s": med(lambda r: r["tok_s"]),
            "tokens_per_step": med(lambda r: r["tokens"] / r["steps"]),
            "ms_per_token": med(lambda r: r["ms_per_token"]),
            "ms_per_step": {p: med(lambda r: r["ms_per_step"].get(p, 0.0)) for p in PARTS},
        }
    plain = results["plain"]
    plain_step = sum(plain["ms_per_step"].values())
    for r in results.values():
        outside = sum(v for p, v in r["ms_per_step"].items() if p != "forward")
        r["outside_forward_ms_per_step"] = outside
        r["outside_forward_share_of_plain_step"] = outside / plain_step
        r["time_per_token_vs_plain"] = r["ms_per_token"] / plain["ms_per_token"]
    if "guidance" in results and "token recycling + guidance" in results:
        results["token recycling + guidance"]["speedup_over_guidance"] = (
            results["guidance"]["ms_per_token"] / results["token recycling + guidance"]["ms_per_token"]
        )
    meta = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "args": {k: v for k, v in vars(args).items() if "child" not in k}}
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results, "runs": runs}, indent=2) + "\n")
    print(methods_table(json.loads(Path(args.out).read_text())))


def methods_table(data: dict) -> str:
    meta = data["meta"]
    host, a = meta["machine"], meta["args"]
    lines = [
        f"Default model (GGUF), greedy, single stream, {a['tokens']} tokens a chat, chats not seen before, "
        f"{host['cpu']} ({host['isa']}), {host['cores']} cores, medians of {a['rounds']} interleaved rounds, {meta['date']}",
        "",
        "| method | tok/s | time a token vs plain | tokens a step | " + " | ".join(f"{p} ms" for p in PARTS)
        + " | outside the forward, share of a plain step |",
        "| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in PARTS) + " | ---: |",
    ]
    for name, r in data["results"].items():
        lines.append(
            f"| {name} | {r['tok_s']:.1f} | {r['time_per_token_vs_plain']:.2f}x | {r['tokens_per_step']:.2f} | "
            + " | ".join(f"{r['ms_per_step'][p]:.2f}" for p in PARTS)
            + f" | {100 * r['outside_forward_share_of_plain_step']:.1f}% |"
        )
    both = data["results"].get("token recycling + guidance", {})
    if "speedup_over_guidance" in both:
        lines += ["", f"Token Recycling over guidance: {both['speedup_over_guidance']:.2f}x guidance alone."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default="gguf,none")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--methods", action="store_true", help="profile each method's step beside plain decoding")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--method-child", help=argparse.SUPPRESS)
    ap.add_argument("--table", metavar="JSON", help="print the table of a results file and exit")
    args = ap.parse_args()
    if args.table:
        data = json.loads(Path(args.table).read_text())
        print(methods_table(data) if "plain" in data["results"] else table(data))
        return
    if args.child:
        print("RESULT " + json.dumps(measure(args.child, args.tokens)), flush=True)
        return
    if args.method_child:
        print("RESULT " + json.dumps(measure_method(args.method_child, args.tokens)), flush=True)
        return
    if args.methods:
        if args.out == DEFAULT_OUT:
            args.out = str(Path(__file__).parent / "results" / "step_profile_methods.json")
        methods_main(args)
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
