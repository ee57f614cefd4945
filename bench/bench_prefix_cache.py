"""Automatic prefix caching: time to first token of a growing conversation, guidance sharing a
system prompt, and a few-shot evaluation load, with the cache on and off, native engine and vLLM.

    python bench/bench_prefix_cache.py [--rounds 3] [--backends native,vllm]

Engine level, on the default model (SmolLM2-135M-Instruct, float32), single stream. Each
(backend, cache on/off) runs in its own subprocess (vLLM changes process-wide threading; two heavy
processes on 2 cores would slow each other 10-35x), one after another, in interleaved rounds;
medians over rounds. Workloads:
- conversation: a ~1,500-token system prompt, then 8 turns; turn k sends the system prompt, the
  k-1 earlier exchanges (fixed assistant answers, so that every backend sees the same prompts) and
  a new question. Time to first token per turn. The cache's target: the repeated prefix costs at
  most 15% of its cold time to first token (turn 2 on / turn 2 off).
- repeat: the same ~1,500-token prompt twice: second time to first token / first.
- guidance (native only; vLLM's adapter has no shared rows): a guided request whose negative prompt
  shares the system prompt; its time to first token minus a plain request's is the negative
  branch's prefill cost.
- few-shot: one 5-shot prefix and 32 questions, sent together, 4 tokens each: requests per second.
Writes bench/results/prefix_cache.json and prints tables.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from host import machine, run_child  # bench/host.py

QUESTIONS = [
    "Which plan should a team of five pick?",
    "Can I move my data to another region later?",
    "How do refunds work for annual plans?",
    "Is single sign-on included in the basic plan?",
    "What happens when a payment fails?",
    "Can I export my invoices as CSV?",
    "How long do you keep deleted projects?",
    "Who do I contact about a security report?",
]
ANSWER = "Thank you for the question. According to our policy, the short answer is yes, with the limits listed above."
FEW_SHOT = [
    ("What is the capital of France?", "Paris"),
    ("What is 7 times 8?", "56"),
    ("Which planet is known as the red planet?", "Mars"),
    ("What is the boiling point of water at sea level in Celsius?", "100"),
    ("Who wrote Hamlet?", "William Shakespeare"),
]
EVAL = [f"What is {a} plus {b}?" for a, b in zip(range(3, 35), range(40, 72))]


def system_prompt(tokenizer, tokens: int) -> str:
    """A support policy of about `tokens` tokens (numbered, varied rules)."""
    topics = ["billing", "security", "data retention", "support hours", "refunds", "accounts", "exports", "regions"]
    rules, i = [], 0
    while len(tokenizer.encode(" ".join(rules))) < tokens:
        topic = topics[i % len(topics)]
        rules.append(f"Rule {i + 1} ({topic}): answer questions about {topic} politely, cite section {i % 13 + 1}, "
                     f"and never promise more than {i % 7 + 2} business days for a reply.")  # fmt: skip
        i += 1
    return "You are the support assistant of a software company. Follow these rules.\n" + "\n".join(rules)


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def ttft(engine, request) -> float:
    """Seconds from adding `request` to its first token (the request then runs to its end)."""
    start, first = time.perf_counter(), None
    engine.add_request(request)
    while engine.has_work():
        for out in engine.step():
            if first is None and out.new_token_ids:
                first = time.perf_counter() - start
    return first or 0.0


def child(backend: str, caching: bool, args) -> dict:
    import torch
    from freelunch.config import EngineConfig
    from freelunch.engine.request import GenerationRequest, SamplingParams

    config = EngineConfig(dtype="float32", max_model_len=4096, kv_cache_gib=1.0, enable_prefix_caching=caching, engine=backend)
    if backend == "vllm":
        from freelunch.backends.vllm_engine import VllmEngine

        engine = VllmEngine(config)
    else:
        from freelunch.pool.local_engine import install_plugins

        install_plugins()  # constraints and the installed methods, as a worker installs them
        from freelunch.pool.local_engine import load_engine

        engine = load_engine(config)
    tok = engine.tokenizer
    params = lambda n=8: SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)  # noqa: E731
    ttft(engine, GenerationRequest("warm", chat_ids(tok, [{"role": "user", "content": "Hello there"}]), params()))
    system = system_prompt(tok, args.system_tokens)
    out: dict = {"threads": torch.get_num_threads()}
    # a conversation growing turn by turn
    history = [{"role": "system", "content": system}]
    turns, lengths = [], []
    for k, question in enumerate(QUESTIONS):
        ids = chat_ids(tok, history + [{"role": "user", "content": question}])
        turns.append(ttft(engine, GenerationRequest(f"turn{k}", ids, params())))
        lengths.append(len(ids))
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": ANSWER}]
    out["conversation"] = {"ttft_s": turns, "prompt_tokens": lengths}
    # the same long prompt twice (a fresh one: nothing of it cached yet)
    again = chat_ids(tok, [{"role": "system", "content": system.replace("Rule", "Policy")}, {"role": "user", "content": QUESTIONS[0]}])
    out["repeat"] = {"ttft_s": [ttft(engine, GenerationRequest(f"rep{i}", again, params())) for i in range(2)], "prompt_tokens": len(again)}
    if backend == "native":  # guidance's negative branch shares the system prompt
        fresh = system.replace("Rule", "Clause")
        cond = chat_ids(tok, [{"role": "system", "content": fresh}, {"role": "user", "content": QUESTIONS[1]}])
        neg = chat_ids(tok, [{"role": "system", "content": fresh}, {"role": "user", "content": "Answer rudely."}])
        guided = ttft(engine, GenerationRequest("guided", cond, params(), {"guidance": {"scale": 1.5, "negative_prompt_ids": neg}}))
        plain = chat_ids(tok, [{"role": "system", "content": system.replace("Rule", "Article")}, {"role": "user", "content": QUESTIONS[1]}])
        out["guidance"] = {"guided_ttft_s": guided, "plain_ttft_s": ttft(engine, GenerationRequest("plain", plain, params())), "prompt_tokens": len(cond)}
    # few-shot evaluation load: one prefix, many questions, all at once
    shots = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in FEW_SHOT) * 3
    requests = [GenerationRequest(f"q{i}", tok.encode(f"{shots}Question: {q}\nAnswer:"), params(4)) for i, q in enumerate(EVAL)]
    start = time.perf_counter()
    for r in requests:
        engine.add_request(r)
    while engine.has_work():
        engine.step()
    seconds = time.perf_counter() - start
    out["few_shot"] = {"requests": len(requests), "prompt_tokens": len(requests[0].prompt_token_ids), "seconds": seconds, "requests_per_s": len(requests) / seconds}
    return out


def median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--backends", default="native,vllm")
    ap.add_argument("--system-tokens", type=int, default=1500)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "prefix_cache.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--caching", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, bool(args.caching), args)), flush=True)
        return
    runs: dict[str, list[dict]] = {}
    for round_ in range(args.rounds):
        for backend in args.backends.split(","):
            for caching in (1, 0):
                name = f"{backend}-{'on' if caching else 'off'}"
                print(f"... round {round_ + 1}: {name}", file=sys.stderr, flush=True)
                cmd = [sys.executable, __file__, "--child", backend, "--caching", str(caching), "--system-tokens", str(args.system_tokens)]
                result = run_child(cmd)
                if result is not None:
                    runs.setdefault(name, []).append(result)
    summary: dict[str, dict] = {}
    for name, rs in runs.items():
        turns = [median([r["conversation"]["ttft_s"][k] for r in rs]) for k in range(len(QUESTIONS))]
        s = {
            "turn_ttft_s": turns,
            "turn_prompt_tokens": rs[0]["conversation"]["prompt_tokens"],
            "repeat_first_s": median([r["repeat"]["ttft_s"][0] for r in rs]),
            "repeat_second_s": median([r["repeat"]["ttft_s"][1] for r in rs]),
            "few_shot_requests_per_s": median([r["few_shot"]["requests_per_s"] for r in rs]),
            "rounds": len(rs),
        }
        if "guidance" in rs[0]:
            s["guided_ttft_s"] = median([r["guidance"]["guided_ttft_s"] for r in rs])
            s["plain_ttft_s"] = median([r["guidance"]["plain_ttft_s"] for r in rs])
        summary[name] = s
    print(f"\nSmolLM2-135M-Instruct, float32, {machine()['cpu']} ({os.cpu_count()} cores), medians of {args.rounds} rounds\n")
    print("Time to first token per turn, ms (prompt tokens in brackets):\n")
    names = list(summary)
    print("| turn | " + " | ".join(names) + " |")
    print("| --- |" + " --- |" * len(names))
    for k in range(len(QUESTIONS)):
        cells = [f"{1000 * summary[n]['turn_ttft_s'][k]:.0f}" for n in names]
        print(f"| {k + 1} ({summary[names[0]]['turn_prompt_tokens'][k]}) | " + " | ".join(cells) + " |")
    print("\n| backend | repeated prefix: 2nd / 1st TTFT | turns 2-8: on / off TTFT | few-shot req/s | on / off |")
    print("| --- | --- | --- | --- | --- |")
    for backend in args.backends.split(","):
        on, off = summary.get(f"{backend}-on"), summary.get(f"{backend}-off")
        if not on or not off:
            continue
        turn_ratio = median([a / b for a, b in zip(on["turn_ttft_s"][1:], off["turn_ttft_s"][1:])])
        on["repeat_ratio"] = on["repeat_second_s"] / on["repeat_first_s"]
        on["turn_ratio_vs_off"] = turn_ratio
        on["few_shot_speedup"] = on["few_shot_requests_per_s"] / off["few_shot_requests_per_s"]
        print(f"| {backend} | {on['repeat_ratio']:.1%} | {turn_ratio:.1%} | {on['few_shot_requests_per_s']:.2f} vs {off['few_shot_requests_per_s']:.2f} | {on['few_shot_speedup']:.2f}x |")
    if "native-on" in summary and "native-off" in summary:
        on, off = summary["native-on"], summary["native-off"]
        for s in (on, off):
            s["negative_branch_s"] = s["guided_ttft_s"] - s["plain_ttft_s"]
        print(f"\nGuidance, negative prompt sharing the system prompt: negative branch's prefill "
              f"{1000 * on['negative_branch_s']:.0f} ms with the cache, {1000 * off['negative_branch_s']:.0f} ms without")  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "args": {k: v for k, v in vars(args).items() if k not in ("child", "caching")}}
    Path(args.out).write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
