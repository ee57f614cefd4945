"""SCMoE (`moe_contrast`) latency cost vs plain greedy decoding, per MoE architecture.

    python bench/bench_moe_contrast.py [--models mixtral,qwen2_moe,qwen3_moe,olmoe,moefied]
        [--batches 1,4] [--tokens 64] [--repeats 5] [--threads 1] [--moe-model DIR]

Issue 6's target: SCMoE at most 1.4x the latency of greedy decoding at batch 1. SCMoE runs a
second (weak-routing) row beside each request's own, in the same forward, and contrasts the two
rows' log-probabilities before sampling.

Models, run by our native engine in-process (float32, CPU), one at a time:
- the tiny seeded MoE models of the tests (tests/tiny_models.py: Mixtral 8 experts, Qwen2-MoE 4
  with a shared expert and a dense layer, Qwen3-MoE 4, OLMoE 4; all top-2, 3 layers, hidden 64,
  the default model's 49152-token vocabulary): the engine's per-step overhead, little model;
- `moefied`: the default SmolLM2-135M-Instruct turned into a Qwen2-MoE by
  `freelunch.models.moefication` with its CLI defaults (8 experts, top-4, 50% shared expert),
  created once under ~/.cache/freelunch (or at --moe-model): a real model's size.

Each run submits B chat prompts at once (batch B) with ignore_eos, so that every run generates
exactly --tokens tokens per request, greedy (temperature 0), plain or with
`moe_contrast: {beta 0.5, alpha 0.1, weak_rank 2}` (the defaults). Per run: end-to-end time,
time to the batch's first tokens (prefill), decode tokens/s after it (B * (tokens - 1) / time),
and the time spent in the model forward (ModelRunner.run) per decode step, the rest being the
engine's scheduling, sampling and the SCMoE contrast. Greedy and SCMoE runs are interleaved
(repeat -> batch -> both modes, their order alternating by repeat) after a warm-up, so that
drift in background load hits both alike; the table shows medians over --repeats and the median
of the per-repeat SCMoE/greedy ratios. Load averages and the cores other processes used while
measuring are recorded: on 2 cores a second busy process distorts absolute timings a lot, and
ratios less. One torch thread by default (as fast at these sizes, and far less hurt by others).

Writes bench/results/moe_contrast_latency.json (every run) and prints a Markdown table (also
written next to the JSON as .txt).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from freelunch.models.moefication import DEFAULT_MOEFIED_NAME, cached_default_moefied

ROOT = Path(__file__).resolve().parent.parent
TARGET = 1.4  # issue 6: SCMoE latency at most 1.4x greedy at batch 1

SCMOE = {"beta": 0.5, "alpha": 0.1, "weak_rank": 2}
PROMPTS = [
    "Tom has 3 apples and buys 5 more. How many apples does he have?",
    "Write a short poem about the sea.",
    "What is the capital of France, and why is it famous?",
    "Explain in two sentences how a bicycle works.",
    "Give me three tips for better sleep.",
    "Describe your ideal holiday.",
    "Why is the sky blue?",
    "List three colors and one thing of each color.",
]


def busy_cpu_s() -> tuple[float, float]:
    """(CPU seconds all processes have used since boot, CPU seconds this process has used)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    total = sum(int(fields[i]) for i in (0, 1, 2, 5, 6)) / os.sysconf("SC_CLK_TCK")
    own = os.times()
    return total, own.user + own.system


class TimedRunner:
    """Wraps the engine's ModelRunner.run to add up the forward time of each step."""

    def __init__(self, engine) -> None:
        self.inner = engine.runner.run
        self.times: list[float] = []
        engine.runner.run = self

    def __call__(self, plans):
        t = time.perf_counter()
        out = self.inner(plans)
        self.times.append(time.perf_counter() - t)
        return out


def run_once(
    engine, timer: TimedRunner, prompts: list[list[int]], tokens: int, scmoe: bool, tag: str
) -> dict:
    from freelunch.engine.request import GenerationRequest, SamplingParams

    methods = {"moe_contrast": dict(SCMOE)} if scmoe else {}
    requests = [
        GenerationRequest(
            f"{tag}/{i}",
            list(ids),
            SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True),
            dict(methods),
        )
        for i, ids in enumerate(prompts)
    ]
    got: dict[str, int] = {}
    stats: dict[str, Any] = {}
    timer.times.clear()
    first_all = None
    steps_before_decode = 0
    start = time.perf_counter()
    for r in requests:
        engine.add_request(r)
    while engine.has_work():
        for o in engine.step():
            got[o.request_id] = o.num_output_tokens
            if o.finished:
                stats[o.request_id] = (o.method_stats or {}).get("moe_contrast")
        if first_all is None and len(got) == len(requests):
            first_all = time.perf_counter()
            steps_before_decode = len(timer.times)
    end = time.perf_counter()
    engine.check_no_leaks()
    assert all(n == tokens for n in got.values()) and len(got) == len(requests), got
    if scmoe:  # the weak row really ran
        assert all(s and s["extra_rows"] == 1 for s in stats.values()), stats
    decode_steps = timer.times[steps_before_decode:]
    return {
        "e2e_s": end - start,
        "ttft_s": first_all - start,
        "decode_tok_s": len(prompts) * (tokens - 1) / (end - first_all),
        "decode_steps": len(decode_steps),
        "forward_ms_per_decode_step": 1000 * statistics.mean(decode_steps),
        "other_ms_per_decode_step": 1000 * ((end - first_all) - sum(decode_steps)) / len(decode_steps),
    }


def hf_generate(hf, prompt: list[int], tokens: int) -> float:
    """Seconds for transformers' greedy generate of exactly `tokens` tokens after `prompt`."""
    start = time.perf_counter()
    with torch.inference_mode():
        hf.generate(torch.tensor([prompt]), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return time.perf_counter() - start


def bench_model(
    name: str, folder: Path, batches: list[int], tokens: int, repeats: int, with_hf: bool = False, quantization: str = "none"
) -> dict:
    from freelunch.config import EngineConfig
    from freelunch.pool.local_engine import install_plugins

    install_plugins()  # constraints and the installed methods, as a worker installs them
    from freelunch.engine.engine import Engine
    from freelunch.models.loader import load_model, resolve_source

    loaded = load_model(resolve_source(str(folder)), "float32", quantization=quantization)
    cfg, moe = loaded.model.config, loaded.model.config.moe
    engine = Engine(loaded, EngineConfig(model=str(folder), max_model_len=1024, kv_cache_gib=0.25, quantization=quantization))
    timer = TimedRunner(engine)
    tok = loaded.tokenizer

    def chat(text: str) -> list[int]:
        rendered = tok.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        return tok.encode(rendered, add_special_tokens=False)

    prompts = [chat(p) for p in PROMPTS]
    hf = None
    if with_hf:  # transformers' generate on the same weights, batch 1, the same greedy tokens
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        hf_generate(hf, prompts[0], 4)
    hf_runs: list[float] = []
    for b in batches:  # warm-up: first-call allocations, oneDNN primitives
        for scmoe in (False, True):
            run_once(engine, timer, prompts[:b], min(tokens, 8), scmoe, f"warm/{b}/{scmoe}")
    runs: dict[tuple[int, bool], list[dict]] = {(b, s): [] for b in batches for s in (False, True)}
    load_start = os.getloadavg()
    wall, (total0, own0) = time.perf_counter(), busy_cpu_s()
    for r in range(repeats):
        for b in batches:
            for scmoe in (False, True) if r % 2 == 0 else (True, False):
                runs[(b, scmoe)].append(
                    run_once(engine, timer, prompts[:b], tokens, scmoe, f"{r}/{b}/{scmoe}")
                )
        if hf is not None:
            hf_runs.append(hf_generate(hf, prompts[0], tokens))
    wall, (total1, own1) = time.perf_counter() - wall, busy_cpu_s()
    load_end = os.getloadavg()

    def med(rs: list[dict], key: str) -> float:
        return statistics.median(x[key] for x in rs)

    cells = []
    for b in batches:
        g, s = runs[(b, False)], runs[(b, True)]
        cell: dict[str, Any] = {"batch": b}
        for mode, rs in (("greedy", g), ("scmoe", s)):
            cell[mode] = {
                k: med(rs, k)
                for k in (
                    "e2e_s",
                    "ttft_s",
                    "decode_tok_s",
                    "forward_ms_per_decode_step",
                    "other_ms_per_decode_step",
                )
            }
            cell[mode]["runs"] = rs
        cell["e2e_ratio"] = cell["scmoe"]["e2e_s"] / cell["greedy"]["e2e_s"]
        cell["e2e_ratio_paired_median"] = statistics.median(y["e2e_s"] / x["e2e_s"] for x, y in zip(g, s))
        cell["decode_slowdown"] = cell["greedy"]["decode_tok_s"] / cell["scmoe"]["decode_tok_s"]
        cell["decode_slowdown_paired_median"] = statistics.median(
            x["decode_tok_s"] / y["decode_tok_s"] for x, y in zip(g, s)
        )
        if b == 1 and hf_runs:
            cell["transformers_e2e_s"] = statistics.median(hf_runs)
            cell["greedy_speedup_vs_transformers_paired_median"] = statistics.median(
                h / x["e2e_s"] for x, h in zip(g, hf_runs)
            )
        cells.append(cell)
    return {
        "model": name,
        "architecture": loaded.hf_config.architectures[0],
        "parameters": sum(p.numel() for p in loaded.model.parameters()),
        "layers": cfg.num_layers,
        "hidden": cfg.hidden_size,
        "experts": moe.num_experts,
        "top_k": moe.top_k,
        "shared_expert": bool(moe.shared_expert_intermediate_size),
        "prompt_tokens": [len(p) for p in prompts[: max(batches)]],
        "loadavg_start": load_start,
        "loadavg_end": load_end,
        "measured_wall_s": wall,
        "other_processes_cores_busy": max(0.0, (total1 - total0) - (own1 - own0)) / wall,
        "cells": cells,
    }


def _vs_hf(cell: dict) -> str:
    ratio = cell.get("greedy_speedup_vs_transformers_paired_median")
    return f"{ratio:.2f}x faster" if ratio else ""


def table(res: dict) -> str:
    lines = [
        (
            f"SCMoE (beta {SCMOE['beta']}, alpha {SCMOE['alpha']}, weak_rank {SCMOE['weak_rank']}) vs "
            f"greedy, "
            f"{res['tokens']} tokens per request (ignore_eos), median of {res['repeats']} interleaved "
            f"repeats, "
            f"{res['machine']['threads']} torch thread(s) on {res['machine']['cores']} cores, our weights: "
            f"{res.get('quantization', 'none')} (transformers: float32). "
            f"Target: <= {TARGET}x at batch 1."
        ),
        "",
        (
            "| model | experts (top-k) | batch | greedy tok/s | SCMoE tok/s | decode slowdown | e2e ratio "
            "| fwd ms/step greedy -> SCMoE | other ms/step greedy -> SCMoE | greedy vs transformers | load avg | others' cores |"
        ),
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: |",
    ]
    for m in res["models"]:
        experts = f"{m['experts']} ({m['top_k']}{' + shared' if m['shared_expert'] else ''})"
        for c in m["cells"]:
            g, s = c["greedy"], c["scmoe"]
            flag = (
                "" if c["batch"] != 1 else (" ok" if c["e2e_ratio_paired_median"] <= TARGET else " **over**")
            )
            lines.append(
                f"| {m['model']} | {experts} | {c['batch']} | {g['decode_tok_s']:.1f} | "
                f"{s['decode_tok_s']:.1f} "
                f"| {c['decode_slowdown_paired_median']:.2f}x | {c['e2e_ratio_paired_median']:.2f}x{flag} "
                f"| {g['forward_ms_per_decode_step']:.1f} -> {s['forward_ms_per_decode_step']:.1f} "
                f"| {g['other_ms_per_decode_step']:.1f} -> {s['other_ms_per_decode_step']:.1f} "
                f"| {_vs_hf(c)} "
                f"| {m['loadavg_start'][0]:.1f}-{m['loadavg_end'][0]:.1f} | "
                f"{m['other_processes_cores_busy']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mixtral,qwen2_moe,qwen3_moe,olmoe,moefied")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--moe-model", type=Path, default=None, help=f"default: ~/.cache/freelunch/{DEFAULT_MOEFIED_NAME}"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/moe_contrast_latency.json")
    parser.add_argument("--quantization", default="none", help="our engine's weights: none (float32), int8 or int4")
    parser.add_argument(
        "--transformers", action="store_true", help="also time transformers' generate at batch 1 (greedy vs transformers)"
    )
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    if max(batches) > len(PROMPTS):
        parser.error(f"batches up to {len(PROMPTS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import MOE_KINDS, build_tiny_model

    names = [m for m in args.models.split(",") if m]
    for m in names:
        if m != "moefied" and m not in MOE_KINDS:
            parser.error(f"unknown model {m!r}: one of {', '.join([*MOE_KINDS, 'moefied'])}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            if name == "moefied":
                folder = cached_default_moefied(args.moe_model)
            else:
                folder = Path(tmp) / name
                build_tiny_model(folder, name, seed=3)  # as tests/test_moe.py
            t = time.perf_counter()
            results.append(bench_model(name, folder, batches, args.tokens, args.repeats, args.transformers, args.quantization))
            c = results[-1]["cells"][0]
            print(
                f"  {name}: batch {c['batch']} e2e ratio {c['e2e_ratio_paired_median']:.2f}x "
                f"({time.perf_counter() - t:.0f} s)",
                flush=True,
            )
    res = {
        "measured_at": time.strftime("%Y-%m-%d %H:%M"),
        "command": (
            "python bench/bench_moe_contrast.py " + " ".join(argv if argv is not None else sys.argv[1:])
        ).strip(),
        "scmoe": SCMOE,
        "tokens": args.tokens,
        "repeats": args.repeats,
        "quantization": args.quantization,
        "target_batch1": TARGET,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "threads": args.threads,
            "torch": torch.__version__,
        },
        "models": results,
    }
    report = table(res)
    print("\n" + report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    args.out.with_suffix(".txt").write_text(report)
    return res


if __name__ == "__main__":
    main()
