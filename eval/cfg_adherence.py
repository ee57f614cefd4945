"""Does classifier-free guidance make the default model follow instructions better, and what does it cost?

    python eval/cfg_adherence.py [--max-tokens 128] [--scales 1,1.5,2,3] [--uncond-scales 1.5]
                                 [--latency-only | --adherence-only]

Adherence: 41 chat prompts, each with one constraint a small deterministic checker can verify
(language, JSON, bullet count, word limit, a word to include / avoid, letter case, opening
phrase, a system-prompt persona). Greedy decoding; every prompt is run plain (scale 1) and
guided at each scale, all prompts of one setting batched through the engine together. A pass
only means the constraint holds; a second, "clean" rate also drops answers under 3 words,
answers that echo the instruction and repetition loops (see `degenerate`), because guidance
often satisfies a checker that way. JSON answers may be wrapped in one ``` fence, nothing else.

The negative (unconditional) branch follows the paper's assistant setup (Sanchez et al. 2023,
"Stay on topic with Classifier-Free Guidance"): it is the same conversation WITHOUT the
constraint, rendered with the chat template and a generation prompt (like the API's
`guidance.negative_messages`):
  user constraint    the user message without its constraint sentence;
  system constraint  the conversation without the system message (SmolLM2's template then puts
                     in its default system prompt).
`--uncond-scales` also runs the engine's default unconditional branch (no negative prompt: the
last prompt token alone), which is what a request with only `guidance.scale` gets.

Latency: batch 1, a few prompts, plain vs guided (scale 1.5, both negative-branch kinds), with
ignore_eos so every run generates exactly --latency-tokens tokens. Waits (up to --wait-idle s)
for the 1-minute load average to fall below 0.5 first, because on 2 cores a second heavy process
distorts timings 10-35x; records the load average before and after, and the cores other
processes used while measuring (the load average after includes this process).

Writes bench/results/cfg_adherence.json (every output, pass/fail per setting, rates, latency)
and bench/results/cfg_adherence.txt (the Markdown tables it prints); a --latency-only or
--adherence-only run keeps the other part of the JSON from an earlier run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from engine_batch import Result, run  # eval/engine_batch.py (the scripts run from eval/)
from freelunch.config import EngineConfig
from freelunch.pool.local_engine import install_plugins
from freelunch.engine.engine import Engine
from freelunch.engine.request import GenerationRequest, SamplingParams
from freelunch.models.loader import load_model, resolve_source

Messages = list[dict[str, str]]
Checker = Callable[[str], bool]


# ---- checkers ------------------------------------------------------------------------------

install_plugins()  # constraints and the installed methods, as a worker installs them

def wordset(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Function words only: they dominate any running text and barely overlap across the three
# languages (the shared ones, e.g. "de", "la", "que", count for both French and Spanish).
STOPWORDS: dict[str, frozenset[str]] = {
    "en": wordset(
        "the a an and or but is are was were be been of to in on at for with from by it this that "
        "these those you your i we they he she my our their not can will would should do does have "
        "has as if so"
    ),
    "fr": wordset(
        "le la les un une des du de et ou mais est sont était être je tu il elle nous vous ils elles "
        "ce cette ces que qui ne pas pour dans sur avec au aux en mon ma mes ton ta votre vos son sa "
        "ses leur plus très aussi comme c"
    ),
    "es": wordset(
        "el la los las un una unos unas y o pero es son era ser de del al en que por para con no se "
        "su sus lo yo tú él ella nosotros usted ustedes mi mis tu muy más como también este esta "
        "estos estas está están hay"
    ),
}


def words(text: str) -> list[str]:
    return re.findall(r"[^\W\d_]+", text.lower())


def stopword_share(text: str, lang: str) -> float:
    ws = words(text)
    return sum(w in STOPWORDS[lang] for w in ws) / len(ws) if ws else 0.0


def in_language(lang: str) -> Checker:
    """At least 15% of the words are `lang` function words, more than for any other language."""

    def check(text: str) -> bool:
        shares = {other: stopword_share(text, other) for other in STOPWORDS}
        return shares[lang] >= 0.15 and all(shares[lang] > s for other, s in shares.items() if other != lang)

    return check


def parse_json(text: str) -> Any:
    """The whole answer as JSON; a single surrounding ``` / ```json fence is allowed (small chat
    models add one by habit, and a client would strip it), any other text is not."""
    s = text.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*\n?(.*?)\n?```", s, re.DOTALL)
    return json.loads(fenced.group(1) if fenced else s)


def json_object(*keys: str) -> Checker:
    def check(text: str) -> bool:
        try:
            value = parse_json(text)
        except ValueError:
            return False
        return isinstance(value, dict) and all(k in value for k in keys)

    return check


def json_string_list(n: int) -> Checker:
    def check(text: str) -> bool:
        try:
            value = parse_json(text)
        except ValueError:
            return False
        return isinstance(value, list) and len(value) == n and all(isinstance(v, str) for v in value)

    return check


BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+\S", re.MULTILINE)


def bullets(n: int) -> Checker:
    """Exactly n list items ("-", "*", "•" or "1." / "1)" lines); other lines are allowed."""
    return lambda text: len(BULLET.findall(text)) == n


def at_most_words(n: int) -> Checker:
    return lambda text: 0 < len(text.split()) <= n


def word_pattern(word: str) -> re.Pattern[str]:
    """The word or its plural, as a whole word, any case."""
    return re.compile(rf"\b{re.escape(word)}(?:s|es)?\b", re.IGNORECASE)


def matches(pattern: re.Pattern[str]) -> Checker:
    return lambda text: pattern.search(text) is not None


def includes(word: str) -> Checker:
    return matches(word_pattern(word))


def avoids(word: str) -> Checker:
    """No occurrence of the word or its plural; an empty answer fails."""
    pattern = word_pattern(word)
    return lambda text: bool(text.strip()) and pattern.search(text) is None


def lowercase(text: str) -> bool:
    return any(c.isalpha() for c in text) and text == text.lower()


def uppercase(text: str) -> bool:
    return any(c.isalpha() for c in text) and text == text.upper()


def starts_with(phrase: str) -> Checker:
    """Case-insensitive, after leading whitespace, quotes and markdown asterisks."""
    return lambda text: text.lstrip(" \n\t\"'*").lower().startswith(phrase.lower())


# ---- the prompt set ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Item:
    id: str
    category: str
    task: str  # the user message without the constraint
    constraint: str  # appended to the user message, or the whole system prompt
    where: str  # "user" | "system"
    check: Checker

    def messages(self) -> Messages:
        if self.where == "system":
            return [{"role": "system", "content": self.constraint}, {"role": "user", "content": self.task}]
        return [{"role": "user", "content": f"{self.task} {self.constraint}"}]

    def negative_messages(self) -> Messages:
        """The same conversation without the constraint (the paper's negative prompt)."""
        return [{"role": "user", "content": self.task}]


def in_user(id: str, category: str, task: str, constraint: str, check: Checker) -> Item:
    return Item(id, category, task, constraint, "user", check)


def in_system(id: str, category: str, system: str, task: str, check: Checker) -> Item:
    return Item(id, category, task, system, "system", check)


ITEMS: list[Item] = [
    # language
    in_user("lang-fr-1", "language", "Describe your ideal holiday.", "Answer in French.", in_language("fr")),
    in_user(
        "lang-es-1",
        "language",
        "Explain why exercise is good for health.",
        "Respond in Spanish.",
        in_language("es"),
    ),
    in_user(
        "lang-fr-2",
        "language",
        "What do plants need to grow?",
        "Please write your answer in French.",
        in_language("fr"),
    ),
    in_user(
        "lang-es-2", "language", "Tell me about the moon.", "Write your answer in Spanish.", in_language("es")
    ),
    in_system(
        "lang-fr-sys",
        "language",
        "You are a helpful assistant. Always reply in French, whatever language the user writes in.",
        "What is a good breakfast?",
        in_language("fr"),
    ),
    in_system(
        "lang-es-sys",
        "language",
        "You are a helpful assistant. Always reply in Spanish, whatever language the user writes in.",
        "How do I learn to swim?",
        in_language("es"),
    ),
    # JSON
    in_user(
        "json-1",
        "json",
        "Name a European country and its capital.",
        'Respond only with a JSON object with the keys "country" and "capital".',
        json_object("country", "capital"),
    ),
    in_user(
        "json-2",
        "json",
        "List three colors.",
        "Respond only with a JSON array of three strings.",
        json_string_list(3),
    ),
    in_user(
        "json-3",
        "json",
        "Describe a dog by its name, age and breed.",
        'Reply only with JSON: an object with the keys "name", "age" and "breed".',
        json_object("name", "age", "breed"),
    ),
    in_system(
        "json-sys",
        "json",
        'You are an API. Reply only with a JSON object of the form {"answer": "..."} and no other text.',
        "What is the largest planet in the solar system?",
        json_object("answer"),
    ),
    # bullet lists
    in_user(
        "bullets-3",
        "bullets",
        "Give me tips for better sleep.",
        "Answer with a bullet list of exactly 3 items.",
        bullets(3),
    ),
    in_user(
        "bullets-4",
        "bullets",
        "What are the benefits of reading?",
        "Use a bullet list with exactly 4 items.",
        bullets(4),
    ),
    in_user(
        "bullets-5",
        "bullets",
        "Name some fruits.",
        "Reply with exactly 5 bullet points and nothing else.",
        bullets(5),
    ),
    in_user(
        "bullets-2",
        "bullets",
        "How can I save money?",
        "Format your answer as exactly 2 bullet points.",
        bullets(2),
    ),
    # length
    in_user(
        "length-20", "length", "Explain what gravity is.", "Answer in fewer than 20 words.", at_most_words(19)
    ),
    in_user("length-15", "length", "What is photosynthesis?", "Use under 15 words.", at_most_words(14)),
    in_user(
        "length-25", "length", "Why do we need sleep?", "Keep your answer under 25 words.", at_most_words(24)
    ),
    in_user(
        "length-12",
        "length",
        "Describe the city of Paris.",
        "Answer in one sentence of at most 12 words.",
        at_most_words(12),
    ),
    in_system(
        "length-sys",
        "length",
        "You answer every question in at most ten words.",
        "What is the internet?",
        at_most_words(10),
    ),
    # include a word
    in_user(
        "include-turquoise",
        "include",
        "Write a short sentence about the sea.",
        'Use the word "turquoise".',
        includes("turquoise"),
    ),
    in_user(
        "include-coffee",
        "include",
        "Describe a morning routine.",
        'Include the word "coffee".',
        includes("coffee"),
    ),
    in_user(
        "include-lantern",
        "include",
        "Write two sentences about a city at night.",
        'Mention the word "lantern".',
        includes("lantern"),
    ),
    in_user(
        "include-penguin",
        "include",
        "Tell me about winter.",
        'Your answer must contain the word "penguin".',
        includes("penguin"),
    ),
    # avoid a word
    in_user("avoid-water", "avoid", "Describe the ocean.", 'Do not use the word "water".', avoids("water")),
    in_user(
        "avoid-engine", "avoid", "Explain how a car works.", 'Do not use the word "engine".', avoids("engine")
    ),
    in_user("avoid-fur", "avoid", "Describe a cat.", 'Do not use the word "fur".', avoids("fur")),
    in_user("avoid-star", "avoid", "What is the sun?", 'Do not use the word "star".', avoids("star")),
    # letter case
    in_user(
        "lower-1",
        "case",
        "Describe a sunny day.",
        "Write your whole answer in lowercase letters only.",
        lowercase,
    ),
    in_user(
        "lower-2",
        "case",
        "What is your favourite animal and why?",
        "Use only lowercase letters, no capitals.",
        lowercase,
    ),
    in_user(
        "upper-1",
        "case",
        "Give a short motivational message.",
        "Write it entirely in CAPITAL LETTERS.",
        uppercase,
    ),
    in_user("upper-2", "case", "Say hello to the team.", "Answer in all caps.", uppercase),
    in_system(
        "lower-sys",
        "case",
        "You always write in lowercase and never use capital letters.",
        "Tell me about dogs.",
        lowercase,
    ),
    # opening phrase
    in_user(
        "start-great",
        "start",
        "What is the best way to learn to code?",
        'Start your answer with "Great question!"',
        starts_with("Great question!"),
    ),
    in_user(
        "start-once",
        "start",
        "Describe a forest.",
        'Begin your reply with "Once upon a time".',
        starts_with("Once upon a time"),
    ),
    in_user(
        "start-because",
        "start",
        "Why is the sky blue?",
        'Start your response with the word "Because".',
        starts_with("Because"),
    ),
    in_user(
        "start-step",
        "start",
        "How do I boil an egg?",
        'Begin your answer with "Step one:"',
        starts_with("Step one:"),
    ),
    # system-prompt persona with a marker word
    in_system(
        "persona-pirate",
        "persona",
        "You are a pirate. Always include the word 'Arr' in every reply.",
        "What is your favourite food?",
        matches(re.compile(r"\barr+\b", re.IGNORECASE)),
    ),
    in_system(
        "persona-cat",
        "persona",
        "You are a cat. End every reply with 'Meow.'",
        "How do I make a cup of tea?",
        includes("meow"),
    ),
    in_system(
        "persona-robot",
        "persona",
        "You are a robot. Always say 'beep boop' in your reply.",
        "What is the weather like on Mars?",
        includes("beep boop"),
    ),
    in_system(
        "persona-cowboy",
        "persona",
        "You are a cowboy. Always call the user 'partner'.",
        "Can you recommend a good book?",
        includes("partner"),
    ),
    in_system(
        "persona-santa",
        "persona",
        "You are Santa Claus. Always say 'Ho ho ho' in your reply.",
        "How should I spend my weekend?",
        includes("ho ho ho"),
    ),
]


# ---- driving the engine --------------------------------------------------------------------
def encode_chat(engine: Engine, messages: Messages) -> list[int]:
    """As the API renders chat (Serving.chat_ids): template text, then encode without specials."""
    text = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return engine.tokenizer.encode(text, add_special_tokens=False)


def guidance_methods(engine: Engine, item: Item, scale: float, negative: bool) -> dict[str, dict]:
    """Scale 1 is plain decoding (no method); otherwise the dict the API hands the engine."""
    if scale == 1:
        return {}
    opts: dict[str, Any] = {"scale": scale}
    if negative:
        opts["negative_prompt_ids"] = encode_chat(engine, item.negative_messages())
    return {"guidance": opts}


# ---- adherence -----------------------------------------------------------------------------
def four_grams(ws: list[str]) -> list[tuple[str, ...]]:
    return [tuple(ws[i : i + 4]) for i in range(len(ws) - 3)]


def degenerate(text: str, item: Item) -> str | None:
    """Why a (possibly passing) answer is not a real answer, or None. A crude screen, because a
    checker alone credits "Your answer must contain the word penguin." as including "penguin":
      under 3 words  too short to address the task (a persona's "Meow." for a tea recipe);
      echoes         repeats 4 consecutive words of the constraint sentence / system prompt
                     (but not of a quoted phrase it asks for, e.g. "Once upon a time", or of the task);
      loop           some 4 consecutive words occur 4 or more times."""
    ws = words(text)
    if len(ws) < 3:
        return "under 3 words"
    grams = four_grams(ws)
    asked = {g for q in re.findall(r"[\"']([^\"']+)[\"']", item.constraint) for g in four_grams(words(q))}
    if set(grams) & (set(four_grams(words(item.constraint))) - asked - set(four_grams(words(item.task)))):
        return "echoes"
    if grams and max(Counter(grams).values()) >= 4:
        return "loop"
    return None


@dataclass(frozen=True, slots=True)
class Setting:
    name: str
    scale: float
    negative: bool  # the paper's negative prompt, else the default unconditional branch


def adherence(engine: Engine, settings: list[Setting], max_tokens: int) -> dict[str, Any]:
    per_item: dict[str, dict[str, Any]] = {
        it.id: {
            "category": it.category,
            "where": it.where,
            "messages": it.messages(),
            "negative_messages": it.negative_messages(),
            "outputs": {},
        }
        for it in ITEMS
    }
    seconds: dict[str, float] = {}
    for s in settings:
        requests = [
            GenerationRequest(
                f"{s.name}/{it.id}",
                encode_chat(engine, it.messages()),
                SamplingParams(max_tokens=max_tokens, temperature=0.0),
                guidance_methods(engine, it, s.scale, s.negative),
            )
            for it in ITEMS
        ]
        start = time.perf_counter()
        results = run(engine, requests)
        seconds[s.name] = time.perf_counter() - start
        for it in ITEMS:
            res = results[f"{s.name}/{it.id}"]
            passed, why = it.check(res.text), degenerate(res.text, it)
            per_item[it.id]["outputs"][s.name] = {
                "pass": passed,
                "degenerate": why,
                "clean": passed and why is None,
                "text": res.text,
                "tokens": res.tokens,
                "finish_reason": res.finish_reason,
            }
        print(
            f"  {s.name}: {sum(per_item[it.id]['outputs'][s.name]['pass'] for it in ITEMS)}/{len(ITEMS)} "
            f"pass in {seconds[s.name]:.0f} s",
            flush=True,
        )

    def summary(ids: list[str]) -> dict[str, Any]:
        outs = {s.name: [per_item[i]["outputs"][s.name] for i in ids] for s in settings}
        return {
            "n": len(ids),
            "pass": {name: sum(o["pass"] for o in os_) / len(ids) for name, os_ in outs.items()},
            "clean_pass": {name: sum(o["clean"] for o in os_) / len(ids) for name, os_ in outs.items()},
            "degenerate": {
                name: dict(Counter(o["degenerate"] for o in os_ if o["degenerate"]))
                for name, os_ in outs.items()
            },
            "mean_tokens": {name: statistics.mean(o["tokens"] for o in os_) for name, os_ in outs.items()},
        }

    categories = list(dict.fromkeys(it.category for it in ITEMS))
    base = settings[0].name
    # per prompt, against plain decoding: which a setting fixed and which it broke
    flips = {
        metric: {
            s.name: {
                "helped": [
                    i
                    for i, v in per_item.items()
                    if v["outputs"][s.name][metric] > v["outputs"][base][metric]
                ],
                "hurt": [
                    i
                    for i, v in per_item.items()
                    if v["outputs"][s.name][metric] < v["outputs"][base][metric]
                ],
            }
            for s in settings[1:]
        }
        for metric in ("pass", "clean")
    }
    return {
        "measured_at": time.strftime("%Y-%m-%d %H:%M"),
        "settings": [
            {
                "name": s.name,
                "scale": s.scale,
                "negative_branch": "constraint-free conversation"
                if s.negative
                else "default (last prompt token)",
            }
            for s in settings
        ],
        "by_category": {c: summary([it.id for it in ITEMS if it.category == c]) for c in categories},
        "by_where": {w: summary([it.id for it in ITEMS if it.where == w]) for w in ("user", "system")},
        "overall": summary([it.id for it in ITEMS]),
        "flips_vs_plain": flips,
        "seconds": seconds,
        "items": per_item,
    }


# ---- latency -------------------------------------------------------------------------------
def wait_for_idle(max_wait: float) -> None:
    """Sleep until the 1-minute load average is below 0.5 or max_wait seconds have passed."""
    deadline = time.monotonic() + max_wait
    while os.getloadavg()[0] >= 0.5 and time.monotonic() < deadline:
        print(f"  load average {os.getloadavg()[0]:.2f}; waiting for < 0.5", flush=True)
        time.sleep(20)


def busy_cpu_s() -> tuple[float, float]:
    """(CPU seconds all processes have used since boot, CPU seconds this process has used).

    The load average counts our own threads too; the difference of the two over the measured
    span is what other processes took from us (Linux /proc/stat: user nice system irq softirq)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    total = sum(int(fields[i]) for i in (0, 1, 2, 5, 6)) / os.sysconf("SC_CLK_TCK")
    own = os.times()
    return total, own.user + own.system


def latency(engine: Engine, tokens: int, repeats: int, scale: float, max_wait: float) -> dict[str, Any]:
    items = [it for it in ITEMS if it.id in ("persona-pirate", "lang-fr-1", "bullets-3")]
    modes = {"plain": None, f"cfg-{scale:g}-negative": True, f"cfg-{scale:g}-default": False}

    def once(it: Item, negative: bool | None, tag: str) -> Result:
        methods = {} if negative is None else guidance_methods(engine, it, scale, negative)
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)  # same length for all
        req = GenerationRequest(f"lat/{tag}/{it.id}", encode_chat(engine, it.messages()), params, methods)
        res = run(engine, [req])[req.request_id]
        assert res.tokens == tokens, (res.tokens, tokens)
        return res

    wait_for_idle(max_wait)
    load_start = os.getloadavg()
    for it in items:  # warm-up: first-call allocations, kernels, caches
        for negative in modes.values():
            once(it, negative, "warm")
    runs: dict[str, list[Result]] = {m: [] for m in modes}
    wall, (total0, own0) = time.perf_counter(), busy_cpu_s()
    for r in range(repeats):
        for it in items:
            for m, negative in modes.items():  # interleaved, so drift in machine load hits all modes alike
                runs[m].append(once(it, negative, f"{m}/{r}"))
    wall, (total1, own1) = time.perf_counter() - wall, busy_cpu_s()
    load_end = os.getloadavg()

    def summary(rs: list[Result]) -> dict[str, float]:
        e2e = [r.finished - r.started for r in rs]
        ttft = [r.first_token - r.started for r in rs]
        decode = [(tokens - 1) / (r.finished - r.first_token) for r in rs]
        return {
            "e2e_s_median": statistics.median(e2e),
            "ttft_s_median": statistics.median(ttft),
            "decode_tok_s_median": statistics.median(decode),
            "runs": len(rs),
        }

    out: dict[str, Any] = {m: summary(rs) for m, rs in runs.items()}
    for m in list(modes)[1:]:
        out[m]["e2e_ratio_vs_plain"] = out[m]["e2e_s_median"] / out["plain"]["e2e_s_median"]
        out[m]["decode_slowdown_vs_plain"] = (
            out["plain"]["decode_tok_s_median"] / out[m]["decode_tok_s_median"]
        )
    return {
        "measured_at": time.strftime("%Y-%m-%d %H:%M"),
        "tokens": tokens,
        "batch": 1,
        "prompts": [it.id for it in items],
        "repeats": repeats,
        "loadavg_start": load_start,
        "loadavg_end": load_end,  # 1/5/15-min; the end one includes this process
        "measured_wall_s": wall,
        "own_cores_busy": (own1 - own0) / wall,
        "other_processes_cores_busy": max(0.0, (total1 - total0) - (own1 - own0)) / wall,
        "modes": out,
    }


# ---- report --------------------------------------------------------------------------------
def rate_table(adh: dict[str, Any], key: str, title: str) -> list[str]:
    names = [s["name"] for s in adh["settings"]]
    lines = [
        title,
        "",
        "| category | n | " + " | ".join(names) + " |",
        "| --- | ---: |" + " ---: |" * len(names),
    ]
    rows = [
        *adh["by_category"].items(),
        *((f"({w} constraint)", v) for w, v in adh["by_where"].items()),
        ("**overall**", adh["overall"]),
    ]
    for label, v in rows:
        lines.append(f"| {label} | {v['n']} | " + " | ".join(f"{v[key][n]:.0%}" for n in names) + " |")
    return [*lines, ""]


def tables(results: dict[str, Any]) -> str:
    lines: list[str] = []
    adh = results.get("adherence")
    if adh:
        lines += rate_table(
            adh,
            "pass",
            f"Constraint pass rate ({results['model']}, greedy, max_tokens {results['max_tokens']})",
        )
        lines += rate_table(
            adh,
            "clean_pass",
            "Clean pass rate (passes and is not under 3 words, an echo of the instruction or a loop)",
        )
        overall = adh["overall"]
        lines += [
            "| setting | negative branch | under 3 words | echoes | loop | mean tokens | batch s |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for s in adh["settings"]:
            n, deg = s["name"], overall["degenerate"][s["name"]]
            branch = s["negative_branch"] if s["scale"] != 1 else "-"
            counts = " | ".join(str(deg.get(why, 0)) for why in ("under 3 words", "echoes", "loop"))
            lines.append(
                f"| {n} | {branch} | {counts} | {overall['mean_tokens'][n]:.0f} | {adh['seconds'][n]:.0f} |"
            )
        lines.append("")
        for metric, by_setting in adh["flips_vs_plain"].items():
            for name, f in by_setting.items():
                helped, hurt = ", ".join(f["helped"]) or "-", ", ".join(f["hurt"]) or "-"
                lines.append(
                    f"- {name} vs plain ({metric}): helped {len(f['helped'])} ({helped}); "
                    f"hurt {len(f['hurt'])} ({hurt})"
                )
        lines.append("")
    lat = results.get("latency")
    if lat:
        caption = (
            f"Latency, batch 1, {lat['tokens']} tokens (ignore_eos), median of {lat['repeats']} x "
            f"{len(lat['prompts'])} prompts. Load average (1-min) {lat['loadavg_start'][0]:.2f} before, "
            f"{lat['loadavg_end'][0]:.2f} after (includes this run); other processes used "
            f"{lat['other_processes_cores_busy']:.2f} cores on average while measuring."
        )
        lines += [
            caption,
            "",
            "| mode | end-to-end s | TTFT s | decode tok/s | e2e vs plain | decode slowdown |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for m, v in lat["modes"].items():
            lines.append(
                f"| {m} | {v['e2e_s_median']:.2f} | {v['ttft_s_median']:.3f} | "
                f"{v['decode_tok_s_median']:.1f} | {v.get('e2e_ratio_vs_plain', 1.0):.2f}x | "
                f"{v.get('decode_slowdown_vs_plain', 1.0):.2f}x |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument(
        "--scales", default="1,1.5,2,3", help="guidance scales with the negative prompt; 1 = plain"
    )
    parser.add_argument(
        "--uncond-scales", default="1.5", help="scales also run with the default unconditional branch"
    )
    parser.add_argument("--latency-tokens", type=int, default=128)
    parser.add_argument("--latency-repeats", type=int, default=3)
    parser.add_argument(
        "--wait-idle", type=float, default=600.0, help="seconds to wait for load average < 0.5"
    )
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--latency-only", action="store_true")
    only.add_argument("--adherence-only", action="store_true")
    parser.add_argument("--out", default="bench/results/cfg_adherence.json")
    args = parser.parse_args(argv)
    out = Path(args.out)

    torch.set_num_threads(os.cpu_count() or 1)
    loaded = load_model(resolve_source(args.model), "float32")
    # room for a whole setting in one batch: 41 prompts, two rows each when guided
    engine = Engine(loaded, EngineConfig(kv_cache_gib=1.5, max_num_seqs=128))
    # A partial run (--latency-only / --adherence-only) keeps the other part of an earlier run.
    results: dict[str, Any] = (
        json.loads(out.read_text()) if out.exists() and (args.latency_only or args.adherence_only) else {}
    )
    results |= {
        "model": loaded.name,
        "max_tokens": args.max_tokens,
        "decoding": "greedy",
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
        },
    }
    # Latency first: our own adherence run would otherwise raise the load average it waits on.
    if not args.adherence_only:
        print("latency (batch 1):", flush=True)
        results["latency"] = latency(engine, args.latency_tokens, args.latency_repeats, 1.5, args.wait_idle)
    if not args.latency_only:
        scales = [float(s) for s in args.scales.split(",")]
        if scales[0] != 1:
            parser.error("--scales must start with 1 (plain decoding, the baseline)")
        settings = [Setting("plain" if s == 1 else f"cfg-{s:g}", s, True) for s in scales]
        settings += [
            Setting(f"cfg-{float(s):g}-default-uncond", float(s), False)
            for s in args.uncond_scales.split(",")
            if s
        ]
        print(f"adherence ({len(ITEMS)} prompts):", flush=True)
        results["adherence"] = adherence(engine, settings, args.max_tokens)
    engine.check_no_leaks()

    report = tables(results)
    print("\n" + report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, ensure_ascii=False))
    out.with_suffix(".txt").write_text(report)
    return results


if __name__ == "__main__":
    main()
