"""What a forward of T tokens costs with each integer-activation variant, against float activations,
engine level, on the default GGUF (`--quantization gguf`).

    python bench/bench_int8_kernels.py [--sizes 1,2,4,8,16,32,64] [--rounds 3] [--out bench/results/int8_kernels.json]

One subprocess per kernel set and round (interleaved rounds, medians): `float` (float activations:
the AVX2 float kernels) and each variant of kernels/cpu/linear_int8.c this CPU runs (avx2, avxvnni,
avx512, avx512vnni; FREELUNCH_INT8_KERNEL picks it). Each times `ModelRunner.forward_cost` after a
64-token context (T = 1: a decode step; T = 2..64: verifying a draft tree of T - 1 nodes, or a
batch), and reports the fraction of the memory bandwidth a one-token step reaches (weight bytes a
step / step time / the bandwidth of a large copy). Prints the variants the CPU cannot run. Writes
JSON and prints a table. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from bench_engines import memory_bandwidth, weight_bytes  # bench/bench_engines.py
from host import machine, run_child  # bench/host.py


def measure(kernels: str, sizes: tuple[int, ...]) -> dict:
    import torch

    from freelunch.config import EngineConfig
    from freelunch.engine.engine import Engine
    from freelunch.models.loader import load_model, resolve_source

    activations = "float" if kernels == "float" else "int8"
    loaded = load_model(resolve_source(None).as_folder(), quantization="gguf", activations=activations)
    engine = Engine(loaded, EngineConfig(kv_cache_gib=0.25, activations=activations))
    cost = engine.runner.forward_cost(64, sizes, repeats=5)
    return {"kernels": loaded.kernels, "threads": torch.get_num_threads(), "forward_ms": {str(t): 1e3 * c for t, c in cost.items()},
            "weight_bytes_per_step": weight_bytes(loaded.model)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1,2,4,8,16,32,64")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "int8_kernels.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sizes = tuple(int(s) for s in args.sizes.split(","))
    if args.child:
        print("RESULT " + json.dumps(measure(args.child, sizes)), flush=True)
        return
    from freelunch.kernels import cpu_kernels

    library = cpu_kernels.load()
    runs_here = cpu_kernels.int8_variants(library) if library is not None else []
    lacking = [v for v in cpu_kernels.INT8_VARIANTS if v not in runs_here]
    if lacking:
        print(f"not run: this CPU lacks what {', '.join(lacking)} need{'s' if len(lacking) == 1 else ''}", file=sys.stderr)
    kinds = ["float", *runs_here]
    runs: dict[str, list[dict]] = {}
    for round_ in range(args.rounds):
        for kind in kinds:
            print(f"... round {round_ + 1}: {kind}", file=sys.stderr, flush=True)
            env = {"FREELUNCH_INT8_KERNEL": kind} if kind != "float" else None
            result = run_child([sys.executable, __file__, "--child", kind, "--sizes", args.sizes], env=env)
            if result is not None:
                runs.setdefault(kind, []).append(result)
    bandwidth = memory_bandwidth()
    results = {}
    for kind, rs in runs.items():
        ms = {t: statistics.median(r["forward_ms"][t] for r in rs) for t in rs[0]["forward_ms"]}
        step_bytes = rs[0]["weight_bytes_per_step"]
        results[kind] = {"kernels": rs[0]["kernels"], "forward_ms": ms, "weight_bytes_per_step": step_bytes,
                         "bandwidth_fraction_1": step_bytes / (ms["1"] / 1e3) / bandwidth, "rounds": len(rs)}  # fmt: skip
    meta = {"machine": machine(), "memory_bandwidth_bytes_s": bandwidth, "not_run": lacking, "date": time.strftime("%Y-%m-%d"),
            "command": "python bench/bench_int8_kernels.py " + " ".join(sys.argv[1:])}  # fmt: skip
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results, "runs": runs}, indent=2) + "\n")
    print(table(json.loads(Path(args.out).read_text())))


def table(data: dict) -> str:
    meta, results = data["meta"], data["results"]
    host = meta["machine"]
    sizes = list(next(iter(results.values()))["forward_ms"])
    lines = [
        f"SmolLM2-135M-Instruct Q4_1 GGUF (`--quantization gguf`), {host['cpu']} ({' '.join(host['features'])}), {host['cores']} cores, "
        f"memory bandwidth {meta['memory_bandwidth_bytes_s'] / 1e9:.1f} GB/s, medians of {next(iter(results.values()))['rounds']} "
        f"interleaved rounds, {meta['date']}" + (f"; not run (CPU lacks them): {', '.join(meta['not_run'])}" if meta["not_run"] else ""),
        "",
        "| kernels | weight MB a step | " + " | ".join(f"T={t} ms" for t in sizes) + " | T=8 / T=1 | of bandwidth at T=1 |",
        "| --- | ---: | " + " | ".join("---:" for _ in sizes) + " | ---: | ---: |",
    ]  # fmt: skip
    for r in results.values():
        ms = r["forward_ms"]
        lines.append(
            f"| {r['kernels']} | {r['weight_bytes_per_step'] / 1e6:.0f} | " + " | ".join(f"{ms[t]:.2f}" for t in sizes)
            + (f" | {ms['8'] / ms['1']:.2f}x" if "8" in ms else " | ") + f" | {r['bandwidth_fraction_1']:.0%} |"
        )  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
