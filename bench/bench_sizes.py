"""freelunch against llama.cpp on synthetic GGUFs in the shapes of 360M, 1.5B and 3B Llama-family
models (issue 28's "Scale"): single-stream and concurrent decode tok/s, and each process's peak
memory, on the same file.

    python bench/synthetic_gguf.py --shapes 360m,1.5b,3b          # once: the files, into the cache
    python bench/bench_sizes.py --llama-cpp-python /opt/llamaenv/bin/python \\
        [--shapes 360m,1.5b,3b] [--types q4_0,q8_0,q4_k_m] [--rounds 3] [--max-tokens 64] [--concurrency 16]
    python bench/bench_sizes.py --table bench/results/sizes.json

The files (bench/synthetic_gguf.py: random weights, the default model's tokenizer, quantised as
llama-quantize would) are generated when missing. For each file, in turn:
1. freelunch converts it once to its cached float32 folder (loader.gguf_to_folder, in its own
   process: its time and peak memory are recorded, `conversion`; nothing when already converted);
2. --rounds interleaved rounds of the two backends, each in its own process, one after another:
   `freelunch`: bench_engines.py's `native-gguf` child (the native engine, `--quantization gguf`,
   `--activations auto`: int8 where our kernels run) on the file; `llama.cpp`: bench_engines.py's
   llama.cpp child (bench/llama_cpp_child.py, llama-cpp-python from the environment that
   --llama-cpp-python names) on the file, with its concurrent part (one context, a sequence per
   request). Both get the same prompt token ids (bench_engines.py's chats through the default
   model's tokenizer, which every synthetic file carries), greedy, exactly --max-tokens tokens a
   request, all cores. Per backend: `single_tok_s` (--single requests one after another),
   `concurrent_tok_s` (--concurrency requests together), TTFT, start-up, and the process's peak
   RSS (the kernel's high-water mark) and peak USS (private memory, sampled every 0.5 s) over its
   whole run: loading, single stream and concurrent decoding. Figures are medians of the rounds.
   llama.cpp maps the file (its weights count in RSS, shared with the page cache, and in USS);
   freelunch reads its converted folder and preallocates its KV cache (1 GiB, bench_engines.py's
   setting).
With --drop-converted, each file's converted folder is deleted after its rounds (a 3B folder holds
~12 GB of float32 weights: all nine do not fit on a small disk).

Writes JSON (bench/results/sizes.json: machine and CPU features, memory bandwidth, per file its
types, both backends' medians and every round) and prints a table of ratios freelunch / llama.cpp.
Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import synthetic_gguf  # bench/synthetic_gguf.py
from bench_engines import memory_bandwidth, prompts  # bench/bench_engines.py
from host import machine, run_child, run_llama_cpp  # bench/host.py

HERE = Path(__file__).parent

CONVERT = """
import json, sys, time
from pathlib import Path
from freelunch.models.loader import gguf_to_folder
t = time.perf_counter()
folder = gguf_to_folder(Path(sys.argv[1]))
size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
print("RESULT " + json.dumps({"seconds": time.perf_counter() - t, "folder": str(folder), "folder_bytes": size}))
"""


def converted_folder(path: Path) -> Path | None:
    """The folder gguf_to_folder keeps `path` in, if it is there."""
    from freelunch.models.loader import converted_folder as folder_of

    folder = folder_of(path)
    return folder if (folder / "model.safetensors").exists() else None


def convert(path: Path) -> dict:
    """freelunch's conversion of a file, in its own process: seconds, folder size, peak memory
    (`cached`: it was there already, and nothing was measured)."""
    folder = converted_folder(path)
    if folder is not None:
        return {
            "cached": True,
            "folder": str(folder),
            "folder_bytes": sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()),
        }
    print(f"... converting {path.name} for freelunch", file=sys.stderr, flush=True)
    result = run_child([sys.executable, "-c", CONVERT, str(path)], memory=True)
    if result is None:
        raise SystemExit(f"converting {path} failed")
    return result | {"cached": False}


def measure_freelunch(path: Path, args) -> dict | None:
    cmd = [sys.executable, str(HERE / "bench_engines.py"), "--child", "native-gguf", "--max-tokens", str(args.max_tokens),
           "--single", str(args.single), "--concurrency", str(args.concurrency), "--dtype", "float32", "--model", str(path), "--long-prompt", "0"]  # fmt: skip
    return run_child(cmd, memory=True)


def measure_llama_cpp(path: Path, ids: list[list[int]], args) -> dict | None:
    return run_llama_cpp(
        args.llama_cpp_python,
        ids,
        args.max_tokens,
        model=str(path),
        single=args.single,
        concurrency=args.concurrency,
        memory=True,
    )


def median(rounds: list[dict]) -> dict:
    out = {}
    for key in rounds[0]:
        values = [r[key] for r in rounds if key in r]
        out[key] = (
            statistics.median(values)
            if isinstance(values[0], (int, float)) and not isinstance(values[0], bool)
            else values[0]
        )
    return out | {"rounds": len(rounds)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--shapes", default="360m,1.5b,3b", help=f"comma-separated: {', '.join(synthetic_gguf.SHAPES)}"
    )
    ap.add_argument(
        "--types",
        default=",".join(synthetic_gguf.TYPES),
        help=f"comma-separated: {', '.join(synthetic_gguf.TYPES)}",
    )
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--single", type=int, default=3, help="single-stream requests (one after another)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--llama-cpp-python",
        help="interpreter of an environment with llama-cpp-python (without it: freelunch alone)",
    )
    ap.add_argument(
        "--drop-converted", action="store_true", help="delete each file's converted folder after its rounds"
    )
    ap.add_argument("--out", default=str(HERE / "results" / "sizes.json"))
    ap.add_argument("--table", metavar="JSON", help="print the table of a results file and exit")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return
    if os.getloadavg()[0] > 0.5:
        print(
            f"warning: load average {os.getloadavg()[0]:.2f}; benchmark on an idle machine", file=sys.stderr
        )
    from freelunch.models.loader import load_tokenizer, resolve_source

    ids = prompts(load_tokenizer(resolve_source(None)), max(args.single, args.concurrency))
    host = machine()
    print(
        f"{host['cpu']} ({host['isa']}: {' '.join(host['features'])}), {host['cores']} cores", file=sys.stderr
    )
    results, runs, load = {}, {}, []
    for shape in args.shapes.split(","):
        for qtype in args.types.split(","):
            name = f"{shape}/{qtype}"
            t0 = time.perf_counter()
            path = synthetic_gguf.ensure(shape, qtype)
            generated = time.perf_counter() - t0
            spec = synthetic_gguf.SHAPES[shape]
            types: dict[str, int] = {}
            for tensor, s in spec.tensors():
                t = synthetic_gguf.tensor_type(qtype, tensor, s, spec.layers)
                types[t] = types.get(t, 0) + 1
            entry = {"file": path.name, "file_bytes": path.stat().st_size, "parameters": spec.parameters(), "tensor_types": types,
                     "generation_s": generated, "conversion": convert(path)}  # fmt: skip
            runs[name] = {"freelunch": [], "llama.cpp": []}
            for round_ in range(args.rounds):  # interleaved: both backends once a round
                load.append(os.getloadavg()[0])
                print(f"... {name} round {round_ + 1}: freelunch", file=sys.stderr, flush=True)
                if (r := measure_freelunch(path, args)) is not None:
                    runs[name]["freelunch"].append(r)
                if args.llama_cpp_python:
                    print(f"... {name} round {round_ + 1}: llama.cpp", file=sys.stderr, flush=True)
                    if (r := measure_llama_cpp(path, ids, args)) is not None:
                        runs[name]["llama.cpp"].append(r)
            entry |= {backend: median(rs) for backend, rs in runs[name].items() if rs}
            results[name] = entry
            if args.drop_converted and (folder := converted_folder(path)) is not None:
                shutil.rmtree(folder)
    bandwidth = memory_bandwidth()
    for entry in results.values():
        for backend in ("freelunch", "llama.cpp"):
            r = entry.get(backend, {})
            if "weight_bytes_per_step" in r:
                r["bandwidth_fraction"] = r["single_tok_s"] * r["weight_bytes_per_step"] / bandwidth
    meta = {"machine": host, "memory_bandwidth_bytes_s": bandwidth, "date": time.strftime("%Y-%m-%d"), "load_average_max": max(load, default=0.0),
            "args": {k: v for k, v in vars(args).items() if k != "table"}}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results, "runs": runs}, indent=2) + "\n")
    print(table(json.loads(Path(args.out).read_text())))


def table(data: dict) -> str:
    """A results file as markdown: its machine, then a row per file with freelunch's figures, llama.cpp's
    and their ratio (freelunch / llama.cpp: above 1 is faster, or more memory)."""
    meta, a, host = data["meta"], data["meta"]["args"], data["meta"]["machine"]
    kernels = sorted(
        {
            str(e["freelunch"]["kernels"])
            for e in data["results"].values()
            if "kernels" in e.get("freelunch", {})
        }
    )
    lines = [
        f"Synthetic Llama-shaped GGUFs (bench/synthetic_gguf.py), {a['max_tokens']} tokens a request, {host['cpu']} ({host['isa']}: "
        f"{' '.join(host['features'])}), {host['cores']} cores, memory bandwidth {meta['memory_bandwidth_bytes_s'] / 1e9:.1f} GB/s, "
        f"medians of {a['rounds']} interleaved round(s), highest load average {meta['load_average_max']:.2f}, {meta['date']}"
        + (f"; freelunch's kernels: {', '.join(kernels)}" if kernels else ""),
        "",
        f"| size | type | file | single stream tok/s: freelunch / llama.cpp | ratio | {a['concurrency']} concurrent tok/s: freelunch / llama.cpp "
        "| ratio | peak RSS: freelunch / llama.cpp | peak USS: freelunch / llama.cpp | USS ratio |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]  # fmt: skip

    def pair(ours: dict, theirs: dict, key: str, unit: str) -> str:
        show = (lambda v: f"{v / 1e9:.2f} GB") if unit == "GB" else (lambda v: f"{v:.1f}")
        return f"{show(ours[key]) if key in ours else '-'} / {show(theirs[key]) if key in theirs else '-'}"

    def ratio(ours: dict, theirs: dict, key: str) -> str:
        return f"{ours[key] / theirs[key]:.2f}x" if ours.get(key) and theirs.get(key) else ""

    for name, e in data["results"].items():
        shape, qtype = name.split("/")
        f, ll = e.get("freelunch", {}), e.get("llama.cpp", {})
        cells = [
            f"{shape} ({e['parameters'] / 1e9:.2f}B)", qtype, f"{e['file_bytes'] / 1e6:,.0f} MB",
            pair(f, ll, "single_tok_s", ""), ratio(f, ll, "single_tok_s"), pair(f, ll, "concurrent_tok_s", ""),
            ratio(f, ll, "concurrent_tok_s"), pair(f, ll, "peak_rss_bytes", "GB"), pair(f, ll, "peak_uss_bytes", "GB"),
            ratio(f, ll, "peak_uss_bytes"),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    conversions = [
        (n, e["conversion"]) for n, e in data["results"].items() if not e["conversion"].get("cached")
    ]
    if conversions:
        lines += ["", "freelunch's one-time conversion to a float32 folder: " + "; ".join(
            f"{n} {c['seconds']:.0f} s, peak RSS {c['peak_rss_bytes'] / 1e9:.1f} GB, folder {c['folder_bytes'] / 1e9:.1f} GB" for n, c in conversions)]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
