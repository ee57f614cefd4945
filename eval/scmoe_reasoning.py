"""Does SCMoE (self-contrast MoE decoding) help the MoEfied default model with arithmetic word problems?

    python eval/scmoe_reasoning.py [--n 100] [--max-tokens 64] [--betas 0.5,1.0] [--moe-model DIR]

Issue 6's reasoning check, on what this machine can run: the dense default model
(SmolLM2-135M-Instruct) turned into a Qwen2-MoE by `freelunch.models.moefication` with the CLI's
defaults (8 experts, 4 active, 50% of the MLP neurons an always-on shared expert; created once
under ~/.cache/freelunch, or at --moe-model), decoded greedily with and without SCMoE.

Problems: --n arithmetic word problems with a non-negative integer answer, generated from
--seed by fixed templates (half one-step: add / subtract / multiply / share equally; half
two-step: two of those chained), small numbers. The set is written to
eval/data/arith_word_problems-n{N}-seed{SEED}.json; a later run with the same --n and --seed
regenerates it and fails if it differs from the stored one (the templates changed).

Each problem is the user message of the chat template (as the API renders chat), followed by
"Answer with just the number." (of three instructions tried on 24 problems of another seed with
the dense model, the one whose answers were cut by max_tokens least often; the models still
often reason in words first). Greedy decoding, at most --max-tokens tokens, stopping
at EOS. The answer is the LAST number in the output (commas dropped); correct if it equals the
expected integer. Configurations: the dense model (reference), the MoEfied model plain, and
the MoEfied model with `moe_contrast` at each --betas (alpha --alpha, weak_rank --weak-rank).
All problems of one configuration are submitted to the engine together (continuous batching).

Reports per configuration: accuracy with a 95% Wilson interval, one-/two-step accuracy, mean
output tokens, how many answers hit max_tokens or had no number, the batch's wall time and
the mean per-request latency within it, and, against the MoEfied model's plain decoding, how
many problems SCMoE fixed and broke (with an exact two-sided sign-test p-value on them).
Writes bench/results/scmoe_reasoning.json (every output) and bench/results/scmoe_reasoning.txt.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from engine_batch import run  # eval/engine_batch.py (the scripts run from eval/)
from freelunch.config import EngineConfig
from freelunch.pool.local_engine import install_plugins
from freelunch.engine.engine import Engine
from freelunch.engine.request import GenerationRequest, SamplingParams
from freelunch.models.loader import default_model_path, load_model, resolve_source
from freelunch.models.moefication import DEFAULT_MOEFIED_NAME, cached_default_moefied

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / "eval" / "data"
INSTRUCTION = "Answer with just the number."

# ---- the problem set -------------------------------------------------------------------------
PEOPLE = [
    ("Tom", "he"),
    ("Anna", "she"),
    ("Ben", "he"),
    ("Lisa", "she"),
    ("Sam", "he"),
    ("Maria", "she"),
    ("Leo", "he"),
    ("Emma", "she"),
]
ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "cards", "oranges"]



install_plugins()  # constraints and the installed methods, as a worker installs them

def one_step(rng: random.Random) -> dict[str, Any]:
    name, he = rng.choice(PEOPLE)
    item = rng.choice(ITEMS)
    kind = rng.choice(["add", "sub", "mul", "div"])
    if kind == "add":
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        q = f"{name} has {a} {item} and buys {b} more. How many {item} does {he} have now?"
        ans = a + b
    elif kind == "sub":
        a = rng.randint(5, 20)
        b = rng.randint(1, a - 1)
        q = f"{name} has {a} {item} and gives {b} of them to a friend. How many {item} does {he} have left?"
        ans = a - b
    elif kind == "mul":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        q = f"{name} has {a} bags with {b} {item} in each bag. How many {item} does {he} have in total?"
        ans = a * b
    else:
        a, b = rng.randint(2, 6), rng.randint(2, 9)
        q = f"{name} shares {a * b} {item} equally among {a} friends. How many {item} does each friend get?"
        ans = b
    return {"steps": 1, "kind": kind, "question": q, "answer": ans}


def two_step(rng: random.Random) -> dict[str, Any]:
    name, he = rng.choice(PEOPLE)
    item = rng.choice(ITEMS)
    kind = rng.choice(["add-sub", "sub-add", "add-add", "mul-add", "mul-sub", "div-add"])
    He = he.capitalize()
    if kind == "add-sub":
        a, b = rng.randint(2, 15), rng.randint(2, 15)
        c = rng.randint(1, a + b - 1)
        q = (
            f"{name} has {a} {item}. {He} buys {b} more and then gives {c} to a friend. How many {item} "
            f"does {he} have now?"
        )
        ans = a + b - c
    elif kind == "sub-add":
        a = rng.randint(5, 20)
        b, c = rng.randint(1, a - 1), rng.randint(2, 15)
        q = (
            f"{name} has {a} {item}. {He} loses {b} of them and then finds {c} more. How many {item} "
            f"does {he} have now?"
        )
        ans = a - b + c
    elif kind == "add-add":
        a, b, c = rng.randint(2, 15), rng.randint(2, 15), rng.randint(2, 15)
        q = (
            f"{name} has {a} {item}. {He} buys {b} more on Monday and {c} more on Tuesday. How many "
            f"{item} does {he} have now?"
        )
        ans = a + b + c
    elif kind == "mul-add":
        a, b, c = rng.randint(2, 6), rng.randint(2, 9), rng.randint(1, 10)
        q = (
            f"{name} buys {a} boxes with {b} {item} in each box. {He} already had {c} {item}. How many "
            f"{item} does {he} have now?"
        )
        ans = a * b + c
    elif kind == "mul-sub":
        a, b = rng.randint(2, 6), rng.randint(2, 9)
        c = rng.randint(1, a * b - 1)
        q = (
            f"{name} has {a} bags with {b} {item} in each bag. {He} gives away {c} {item}. How many "
            f"{item} does {he} have left?"
        )
        ans = a * b - c
    else:
        a, b, c = rng.randint(2, 5), rng.randint(2, 8), rng.randint(1, 10)
        q = (
            f"{name} shares {a * b} {item} equally among {a} friends. One friend already had {c} {item}. "
            f"How many {item} does that friend have now?"
        )
        ans = b + c
    return {"steps": 2, "kind": kind, "question": q, "answer": ans}


def generate(n: int, seed: int) -> list[dict[str, Any]]:
    """n problems: the first half one-step, the rest two-step, each from its own seeded stream."""
    rng = random.Random(seed)
    ones = [one_step(rng) for _ in range(n // 2)]
    twos = [two_step(rng) for _ in range(n - n // 2)]
    return [{"id": f"p{i:03d}"} | p for i, p in enumerate(ones + twos)]


def problem_set(n: int, seed: int, path: Path) -> list[dict[str, Any]]:
    """The generated set; written to `path` the first time, checked against it afterwards."""
    problems = generate(n, seed)
    if path.exists():
        stored = json.loads(path.read_text())
        if (stored["n"], stored["seed"], stored["problems"]) != (n, seed, problems):
            raise SystemExit(
                f"{path} is not what --n {n} --seed {seed} generates now (the templates changed?)"
            )
        return problems
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {
                "n": n,
                "seed": seed,
                "generator": "eval/scmoe_reasoning.py",
                "instruction": INSTRUCTION,
                "problems": problems,
            },
            indent=1,
        )
        + "\n"
    )
    return problems


# ---- answers ---------------------------------------------------------------------------------
NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def last_number(text: str) -> float | None:
    found = NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def sign_test(helped: int, hurt: int) -> float:
    """Exact two-sided binomial p-value for `helped` vs `hurt` discordant pairs (McNemar's exact test)."""
    n = helped + hurt
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(helped, hurt) + 1)) / 2**n
    return min(1.0, 2 * tail)


# ---- running ---------------------------------------------------------------------------------
def encode_chat(engine: Engine, question: str) -> list[int]:
    """As the API renders chat: template text, then encode without special tokens."""
    messages = [{"role": "user", "content": f"{question} {INSTRUCTION}"}]
    text = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return engine.tokenizer.encode(text, add_special_tokens=False)


@dataclass(frozen=True, slots=True)
class Config:
    name: str
    model: str  # "dense" | "moefied"
    options: dict | None  # moe_contrast options, None = plain greedy


def evaluate(engine: Engine, cfg: Config, problems: list[dict], max_tokens: int) -> dict[str, Any]:
    methods = {"moe_contrast": cfg.options} if cfg.options is not None else {}
    requests = [
        GenerationRequest(
            f"{cfg.name}/{p['id']}",
            encode_chat(engine, p["question"]),
            SamplingParams(max_tokens=max_tokens, temperature=0.0),
            dict(methods),
        )
        for p in problems
    ]
    start = time.perf_counter()
    results = run(engine, requests)
    wall = time.perf_counter() - start
    outputs = []
    for p in problems:
        res = results[f"{cfg.name}/{p['id']}"]
        got = last_number(res.text)
        outputs.append(
            {
                "id": p["id"],
                "text": res.text,
                "tokens": res.tokens,
                "finish_reason": res.finish_reason,
                "extracted": got,
                "correct": got is not None and got == p["answer"],
                "latency_s": round(res.finished - res.started, 3),
            }
        )
    correct = sum(o["correct"] for o in outputs)
    by_steps = {}
    for steps in (1, 2):
        sub = [o for o, p in zip(outputs, problems) if p["steps"] == steps]
        by_steps[str(steps)] = {"n": len(sub), "correct": sum(o["correct"] for o in sub)}
    lo, hi = wilson(correct, len(outputs))
    return {
        "name": cfg.name,
        "model": cfg.model,
        "moe_contrast": cfg.options,
        "n": len(outputs),
        "correct": correct,
        "accuracy": correct / len(outputs),
        "ci95": [lo, hi],
        "by_steps": by_steps,
        "mean_tokens": statistics.mean(o["tokens"] for o in outputs),
        "hit_max_tokens": sum(o["finish_reason"] == "length" for o in outputs),
        "no_number": sum(o["extracted"] is None for o in outputs),
        "batch_wall_s": wall,
        "mean_request_latency_s": statistics.mean(o["latency_s"] for o in outputs),
        "outputs": outputs,
    }


def compare(base: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    b = {o["id"]: o["correct"] for o in base["outputs"]}
    helped = [o["id"] for o in other["outputs"] if o["correct"] and not b[o["id"]]]
    hurt = [o["id"] for o in other["outputs"] if not o["correct"] and b[o["id"]]]
    same_text = sum(o["text"] == ob["text"] for o, ob in zip(other["outputs"], base["outputs"]))
    return {
        "helped": helped,
        "hurt": hurt,
        "sign_test_p": sign_test(len(helped), len(hurt)),
        "identical_outputs": same_text,
    }


# ---- report ----------------------------------------------------------------------------------
def tables(res: dict[str, Any]) -> str:
    n, one = res["n"], res["n"] // 2
    moe = res["moefied"]
    lines = [
        (
            f"Arithmetic word problems ({n} = {one} one-step + {n - one} two-step, seed {res['seed']}), "
            f"greedy, max_tokens {res['max_tokens']}, answer = last number in the output. MoEfied = "
            f"{moe['num_experts']} experts, top-{moe['top_k']}, {moe['shared_fraction']:.0%} shared."
        ),
        "",
        (
            "| configuration | correct | accuracy (95% CI) | 1-step | 2-step | mean tokens | hit max "
            "| no number | batch s | mean latency s |"
        ),
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in res["configs"]:
        s1, s2 = c["by_steps"]["1"], c["by_steps"]["2"]
        lo, hi = c["ci95"]
        lines.append(
            f"| {c['name']} | {c['correct']}/{c['n']} | {c['accuracy']:.0%} ({lo:.0%}-{hi:.0%}) "
            f"| {s1['correct']}/{s1['n']} | {s2['correct']}/{s2['n']} | {c['mean_tokens']:.1f} "
            f"| {c['hit_max_tokens']} | {c['no_number']} | {c['batch_wall_s']:.0f} "
            f"| {c['mean_request_latency_s']:.1f} |"
        )
    lines += [
        "",
        (
            f"- no model, answering with the question's last number: "
            f"{res['copy_last_question_number_correct']}/{res['n']} correct"
        ),
    ]
    for name, f in res["vs_moefied_greedy"].items():
        lines.append(
            f"- {name} vs moefied greedy: fixed {len(f['helped'])}, broke {len(f['hurt'])} "
            f"(sign test p = {f['sign_test_p']:.2f}); identical outputs {f['identical_outputs']}/{res['n']}"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="problems (half one-step, half two-step)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--betas", default="0.25,0.5,1.0", help="SCMoE betas (the method default is 0.5)")
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--weak-rank", type=int, default=2)
    parser.add_argument(
        "--moe-model", type=Path, default=None, help=f"default: ~/.cache/freelunch/{DEFAULT_MOEFIED_NAME}"
    )
    parser.add_argument(
        "--problems",
        type=Path,
        default=None,
        help="the set's JSON (default: eval/data/arith_word_problems-n{N}-seed{SEED}.json)",
    )
    parser.add_argument("--no-dense", action="store_true", help="skip the dense reference")
    # one thread: as fast for this model's small matmuls, and far less hurt by other processes on 2 cores
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/scmoe_reasoning.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    data = args.problems or DATA_DIR / f"arith_word_problems-n{args.n}-seed{args.seed}.json"
    problems = problem_set(args.n, args.seed, data)
    moe_path = cached_default_moefied(args.moe_model)
    configs: list[Config] = []
    if not args.no_dense:
        configs.append(Config("dense greedy", "dense", None))
    configs.append(Config("moefied greedy", "moefied", None))
    for beta in (float(b) for b in args.betas.split(",") if b):
        opts = {"beta": beta, "alpha": args.alpha, "weak_rank": args.weak_rank}
        configs.append(
            Config(f"moefied SCMoE b={beta:g} a={args.alpha:g} r={args.weak_rank}", "moefied", opts)
        )

    # room for every problem at once, two rows each under SCMoE
    engine_config = {
        "kv_cache_gib": 1.0,
        "max_num_seqs": 2 * len(problems) + 2,
        "max_num_batched_tokens": 2048,
    }
    rows: list[dict[str, Any]] = []
    for model in ("dense", "moefied"):
        todo = [c for c in configs if c.model == model]
        if not todo:
            continue
        source = resolve_source(None if model == "dense" else str(moe_path))
        loaded = load_model(source, "float32")
        engine = Engine(
            loaded, EngineConfig(model=None if model == "dense" else str(moe_path), **engine_config)
        )
        for cfg in todo:
            row = evaluate(engine, cfg, problems, args.max_tokens)
            print(
                f"  {cfg.name}: {row['correct']}/{row['n']} correct, {row['mean_tokens']:.1f} tokens, "
                f"{row['batch_wall_s']:.0f} s",
                flush=True,
            )
            rows.append(row)
        del engine, loaded

    base = next(r for r in rows if r["name"] == "moefied greedy")
    result = {
        "measured_at": time.strftime("%Y-%m-%d %H:%M"),
        "command": (
            "python eval/scmoe_reasoning.py " + " ".join(argv if argv is not None else sys.argv[1:])
        ).strip(),
        "n": len(problems),
        "seed": args.seed,
        "max_tokens": args.max_tokens,
        "decoding": "greedy",
        "instruction": INSTRUCTION,
        "problems_file": str(data.relative_to(ROOT) if data.is_relative_to(ROOT) else data),
        "dense_model": str(default_model_path().name),
        "moefied": json.loads((moe_path / "moefication.json").read_text()),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "threads": args.threads,
            "torch": torch.__version__,
            "loadavg_end": os.getloadavg(),
        },
        # the floor: answering with the last number of the question (no model)
        "copy_last_question_number_correct": sum(last_number(p["question"]) == p["answer"] for p in problems),
        "configs": rows,
        "vs_moefied_greedy": {
            r["name"]: compare(base, r) for r in rows if r["model"] == "moefied" and r is not base
        },
    }
    report = tables(result)
    print("\n" + report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    args.out.with_suffix(".txt").write_text(report)
    return result


if __name__ == "__main__":
    main()
