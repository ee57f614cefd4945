"""The engine against transformers: greedy tokens, logprobs, batching, chunking, preemption, stops.

Tiny seeded float32 models (3 layers, hidden 64) of each supported attention flavour:
Llama, Qwen2 (q/k/v biases) and Qwen3 (q/k RMSNorm). Greedy tokens must be identical to
transformers' `generate`; logprobs agree within atol 1e-4 (float32 matmuls in a different
order and batch shape: observed differences are ~1e-6).
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
import torch
from freelunch.config import EngineConfig
from freelunch.engine.engine import Engine, EngineError
from freelunch.engine.kv_cache import KVCache, kv_cache_dtype
from freelunch.engine.request import GenerationRequest, SamplingParams
from freelunch.models.loader import load_model, resolve_source
from tiny_models import TEST_DEVICE, build_tiny_model, engine_settings

LOGPROB_ATOL = 1e-4
# a 16-bit KV cache's rounding (8 bits of mantissa for bfloat16, 11 for float16) moves logprobs by up to
KV_16_BIT_LOGPROB_ATOL = {"float16": 1e-3, "bfloat16": 1e-2}  # measured: 2.4e-4, 2.6e-3
DEVICE = TEST_DEVICE  # bench/device_check.sh runs this file on a GPU

PROMPT_TEXTS = [
    "Hello, my name is",
    "The capital of France",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z " * 3,
    (
        "Once upon a time, in a land far, far away, there lived a small dragon"
        " who loved to read books about the sea."
    ),
]


# ---- fixtures and helpers ---------------------------------------------------------------------


class Model:
    def __init__(self, folder, hf) -> None:
        self.folder = folder
        self.hf = hf
        self.loaded = load_model(resolve_source(str(folder)), "float32", DEVICE)
        self.tok = self.loaded.tokenizer

    def engine(self, kv_blocks: int | None = None, **config) -> Engine:
        # the exact reference: a float32 cache equals transformers to float32 summation order (the
        # default 16-bit one: test_kv_cache_16_bit_keeps_greedy_tokens)
        config.setdefault("kv_cache_dtype", "float32")
        if kv_blocks is not None:
            cfg = self.loaded.model.config
            stored = kv_cache_dtype(config.get("kv_cache_dtype", "auto"), torch.float32, torch.device(DEVICE))
            per_token = KVCache.bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, stored)
            config["kv_cache_gib"] = kv_blocks * config.get("block_size", 16) * per_token / (1 << 30)
        config.setdefault("kv_cache_gib", 0.02)
        return Engine(self.loaded, EngineConfig(model=str(self.folder), device=DEVICE, **engine_settings(config)))

    def ids(self, text: str) -> list[int]:
        return self.tok(text)["input_ids"]


_MODELS: dict[str, Model] = {}


@pytest.fixture(scope="module")
def llama(tiny_llama):
    if "llama" not in _MODELS:
        _MODELS["llama"] = Model(*tiny_llama)
    return _MODELS["llama"]


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def model(request, tiny_llama, tmp_path_factory):
    kind = request.param
    if kind == "llama":
        return request.getfixturevalue("llama")
    if kind not in _MODELS:
        folder = tmp_path_factory.mktemp(f"tiny-{kind}")
        _MODELS[kind] = Model(folder, build_tiny_model(folder, kind, seed=1))
    return _MODELS[kind]


def hf_greedy(hf, ids: list[int], n: int, **kw) -> list[int]:
    kw.setdefault("eos_token_id", None)
    out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0, **kw)
    return out[0, len(ids) :].tolist()


class Result:
    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason = None
        self.logprobs = []
        self.prompt_logprobs = None
        self.outputs = 0


def run(engine: Engine, requests: list[GenerationRequest], joins: dict | None = None, max_steps: int = 2000):
    """Step the engine until idle; `joins` maps a step index to requests added just before it."""
    joins = dict(joins or {})
    for r in requests:
        engine.add_request(r)
    results: dict[str, Result] = {}
    for r in requests + [r for rs in joins.values() for r in rs]:
        results[r.request_id] = Result()
    step = 0
    while engine.has_work() or joins:
        for r in joins.pop(step, []):
            engine.add_request(r)
        assert step < max_steps, "the engine did not finish"
        for o in engine.step():
            res = results.setdefault(o.request_id, Result())
            assert res.finish_reason is None, "output after the request finished"
            res.outputs += 1
            res.tokens.extend(o.new_token_ids)
            res.text += o.new_text
            if o.logprobs:
                res.logprobs.extend(o.logprobs)
            if o.prompt_logprobs is not None:
                assert res.prompt_logprobs is None, "prompt logprobs sent twice"
                res.prompt_logprobs = o.prompt_logprobs
            if o.finished:
                res.finish_reason = o.finish_reason
        step += 1
    return results


def greedy(rid: str, ids: list[int], n: int, **kw) -> GenerationRequest:
    kw.setdefault("ignore_eos", True)
    return GenerationRequest(rid, list(ids), SamplingParams(max_tokens=n, temperature=0.0, **kw))


# ---- greedy parity ----------------------------------------------------------------------------


def test_greedy_alone_matches_transformers(model):
    engine = model.engine()
    for i, text in enumerate(PROMPT_TEXTS):
        ids = model.ids(text)
        ref = hf_greedy(model.hf, ids, 20)
        assert len(ref) == 20
        res = run(engine, [greedy(str(i), ids, 20)])[str(i)]
        assert res.tokens == ref, f"prompt {i}"
        assert res.finish_reason == "length"
    engine.check_no_leaks()


def test_single_token_prompt(llama):
    engine = llama.engine()
    ref = hf_greedy(llama.hf, [42], 12)
    assert run(engine, [greedy("a", [42], 12)])["a"].tokens == ref


def test_mixed_batch_with_requests_joining_midflight(model):
    engine = model.engine()
    long_ids = model.ids(PROMPT_TEXTS[2] * 3)  # ~150 tokens
    prompts = {
        "short": (model.ids("Hi"), 30),
        "mid": (model.ids(PROMPT_TEXTS[3]), 12),
        "long": (long_ids, 16),
        "one": ([7], 8),
        "late": (model.ids(PROMPT_TEXTS[1]), 20),
    }
    refs = {k: hf_greedy(model.hf, ids, n) for k, (ids, n) in prompts.items()}
    reqs = {k: greedy(k, ids, n) for k, (ids, n) in prompts.items()}
    results = run(
        engine,
        [reqs["short"]],
        joins={2: [reqs["long"], reqs["one"]], 5: [reqs["mid"]], 9: [reqs["late"]]},
    )
    for k in prompts:
        assert results[k].tokens == refs[k], k
        assert results[k].finish_reason == "length"
    engine.check_no_leaks()


def test_chunked_prefill_gives_same_tokens(model):
    engine = model.engine(max_num_batched_tokens=16)
    long_ids = model.ids(PROMPT_TEXTS[3] + " " + PROMPT_TEXTS[2])  # > 60 tokens: 4+ chunks
    assert len(long_ids) > 60
    short_ids = model.ids(PROMPT_TEXTS[0])
    refs = {"long": hf_greedy(model.hf, long_ids, 15), "short": hf_greedy(model.hf, short_ids, 25)}
    results = run(engine, [greedy("short", short_ids, 25)], joins={3: [greedy("long", long_ids, 15)]})
    assert results["long"].tokens == refs["long"]
    assert results["short"].tokens == refs["short"]
    # the short request kept decoding while the long prompt was prefilled in chunks
    assert engine.stats["steps"] < 25 + len(long_ids) // 16 + 15
    engine.check_no_leaks()


def test_repetition_penalty_matches_transformers(llama):
    engine = llama.engine()
    ids = llama.ids(PROMPT_TEXTS[2])
    ref = hf_greedy(llama.hf, ids, 20, repetition_penalty=0.4)
    assert ref != hf_greedy(llama.hf, ids, 20)
    req = GenerationRequest(
        "a", ids, SamplingParams(max_tokens=20, temperature=0.0, repetition_penalty=0.4, ignore_eos=True)
    )
    assert run(engine, [req])["a"].tokens == ref


# ---- logprobs ------------------------------------------------------------------------------------


def test_logprobs_match_transformers(model):
    engine = model.engine(max_num_batched_tokens=16)
    prompts = [model.ids(PROMPT_TEXTS[0]), model.ids(PROMPT_TEXTS[3])]
    reqs = [
        GenerationRequest(
            str(i), ids, SamplingParams(max_tokens=10, temperature=0.0, logprobs=5, ignore_eos=True)
        )
        for i, ids in enumerate(prompts)
    ]
    results = run(engine, reqs[:1], joins={2: reqs[1:]})
    for i, ids in enumerate(prompts):
        out = model.hf.generate(
            torch.tensor([ids]),
            max_new_tokens=10,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
            output_logits=True,
            return_dict_in_generate=True,
        )
        ref_tokens = out.sequences[0, len(ids) :].tolist()
        res = results[str(i)]
        assert res.tokens == ref_tokens
        assert len(res.logprobs) == 10
        for step, (rec, logits) in enumerate(zip(res.logprobs, out.logits)):
            lp = torch.log_softmax(logits[0].float(), -1)
            assert rec.token_id == ref_tokens[step]
            assert rec.logprob == pytest.approx(float(lp[rec.token_id]), abs=LOGPROB_ATOL)
            top = torch.topk(lp, 5)
            assert [t for t, _ in rec.top] == top.indices.tolist()
            torch.testing.assert_close(
                torch.tensor([v for _, v in rec.top]), top.values, atol=LOGPROB_ATOL, rtol=0
            )
            # greedy: the chosen token is the best one
            assert rec.top[0][0] == rec.token_id
    engine.check_no_leaks()


@pytest.mark.parametrize("stored", ["float16", "bfloat16"])
def test_kv_cache_16_bit_keeps_greedy_tokens(model, stored):
    """A 16-bit cache (the CPU's default: float16) keeps keys and values rounded to it: transformers'
    greedy tokens still, logprobs within a small bound (a float32 cache: to 1e-4, above)."""
    if DEVICE != "cpu":
        pytest.skip("off the CPU the cache is kept in the model's dtype")
    engine = model.engine(kv_cache_dtype=stored, max_num_batched_tokens=16)  # prompts in chunks: read back
    assert engine.kv.dtype == getattr(torch, stored)
    worst = 0.0
    for i, text in enumerate(PROMPT_TEXTS):
        ids = model.ids(text)
        out = model.hf.generate(
            torch.tensor([ids]), max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None,
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
        req = GenerationRequest(str(i), ids, SamplingParams(max_tokens=20, temperature=0.0, logprobs=1, ignore_eos=True))
        res = run(engine, [req])[str(i)]
        assert res.tokens == out.sequences[0, len(ids) :].tolist(), f"prompt {i}"
        for rec, logits in zip(res.logprobs, out.logits):
            worst = max(worst, abs(rec.logprob - float(torch.log_softmax(logits[0].float(), -1)[rec.token_id])))
    print(f"{stored}: worst logprob difference {worst:.2e}")
    assert worst < KV_16_BIT_LOGPROB_ATOL[stored]
    engine.check_no_leaks()


@pytest.mark.parametrize("chunk", [1024, 16])
def test_prompt_logprobs_match_transformers(llama, chunk):
    engine = llama.engine(max_num_batched_tokens=chunk)
    ids = llama.ids(PROMPT_TEXTS[3] + " Then: " + PROMPT_TEXTS[0] + " Bob. " + PROMPT_TEXTS[1])
    assert len(ids) > 2 * 16 + 1  # three chunks when chunk == 16
    req = GenerationRequest(
        "echo", ids, SamplingParams(max_tokens=3, temperature=0.0, prompt_logprobs=3, ignore_eos=True)
    )
    other = greedy("other", llama.ids("Hello"), 6)
    res = run(engine, [other, req])["echo"]
    with torch.no_grad():
        ref = torch.log_softmax(llama.hf(torch.tensor([ids])).logits[0].float(), -1)
    plp = res.prompt_logprobs
    assert plp is not None and len(plp) == len(ids)
    assert plp[0] is None
    for i in range(1, len(ids)):
        rec = plp[i]
        assert rec.token_id == ids[i]
        assert rec.logprob == pytest.approx(float(ref[i - 1, ids[i]]), abs=LOGPROB_ATOL), i
        top = torch.topk(ref[i - 1], 3)
        assert [t for t, _ in rec.top] == top.indices.tolist()
    # echo does not change the generated tokens
    assert res.tokens == hf_greedy(llama.hf, ids, 3)
    engine.check_no_leaks()


# ---- KV pressure ----------------------------------------------------------------------------------


def test_preemption_under_tiny_kv_budget_keeps_tokens(model):
    # 12 blocks of 16 slots; four requests that end near 60-75 tokens each cannot all stay resident
    engine = model.engine(kv_blocks=12)
    assert engine.blocks.num_blocks == 12
    texts = [PROMPT_TEXTS[3], PROMPT_TEXTS[2], PROMPT_TEXTS[0], PROMPT_TEXTS[1]]
    prompts = {str(i): model.ids(t) for i, t in enumerate(texts)}
    refs = {k: hf_greedy(model.hf, ids, 40) for k, ids in prompts.items()}
    reqs = [greedy(k, ids, 40) for k, ids in prompts.items()]
    results = run(engine, reqs[:2], joins={3: reqs[2:]})
    assert engine.stats["preemptions"] > 0, "the budget was meant to force preemption"
    for k in prompts:
        assert results[k].tokens == refs[k], k
        assert results[k].finish_reason == "length"
    engine.check_no_leaks()


def test_preemption_keeps_logprobs_and_prompt_logprobs(llama):
    engine = llama.engine(kv_blocks=8, max_num_batched_tokens=16)
    ids_a = llama.ids(PROMPT_TEXTS[3])
    ids_b = llama.ids(PROMPT_TEXTS[2])
    a = GenerationRequest(
        "a", ids_a, SamplingParams(max_tokens=40, temperature=0.0, logprobs=2, ignore_eos=True)
    )
    b = GenerationRequest(
        "b",
        ids_b,
        SamplingParams(max_tokens=40, temperature=0.0, logprobs=2, prompt_logprobs=1, ignore_eos=True),
    )
    results = run(engine, [a], joins={2: [b]})
    assert engine.stats["preemptions"] > 0
    for rid, ids in (("a", ids_a), ("b", ids_b)):
        res = results[rid]
        assert res.tokens == hf_greedy(llama.hf, ids, 40)
        assert [r.token_id for r in res.logprobs] == res.tokens  # one record per token, none repeated
    plp = results["b"].prompt_logprobs
    assert plp is not None and len(plp) == len(ids_b)
    assert [r.token_id for r in plp[1:]] == ids_b[1:]
    engine.check_no_leaks()


def test_request_outgrowing_the_whole_cache_finishes(llama):
    """A request that alone needs more KV than exists must end ("length"), not wait forever."""
    engine = llama.engine(kv_blocks=4)  # 64 slots
    ids = llama.ids(PROMPT_TEXTS[3])
    res = run(engine, [greedy("a", ids, 100)], max_steps=200)["a"]
    assert res.finish_reason == "length"
    assert len(ids) + len(res.tokens) <= 64
    assert len(res.tokens) >= 64 - len(ids) - 1
    assert res.tokens == hf_greedy(llama.hf, ids, len(res.tokens))
    with pytest.raises(EngineError):
        engine.add_request(greedy("too-long", list(range(10, 80)), 4))
    engine.check_no_leaks()


# ---- sampling ---------------------------------------------------------------------------------------


def test_seeded_sampling_same_alone_or_beside_others(llama):
    ids = llama.ids(PROMPT_TEXTS[0])

    def seeded(rid, seed=1234):
        return GenerationRequest(
            rid, ids, SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=seed, ignore_eos=True)
        )

    alone = run(llama.engine(), [seeded("s")])["s"].tokens
    again = run(llama.engine(), [seeded("s")])["s"].tokens
    assert alone == again
    engine = llama.engine(max_num_batched_tokens=32)
    others = [
        GenerationRequest(
            "x", llama.ids(PROMPT_TEXTS[2]), SamplingParams(max_tokens=30, temperature=1.0, ignore_eos=True)
        ),
        greedy("g", llama.ids(PROMPT_TEXTS[3]), 10),
        GenerationRequest(
            "y", ids, SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=99, ignore_eos=True)
        ),
    ]
    results = run(engine, [others[0]], joins={1: [seeded("s")], 4: others[1:]})
    assert results["s"].tokens == alone
    # a different seed on the same prompt gives a different continuation (the seed matters)
    assert results["y"].tokens != alone
    engine.check_no_leaks()


# ---- stopping ------------------------------------------------------------------------------------


def _stop_string_from(tok, tokens: list[int]):
    """A stop string that straddles the boundary between two generated tokens, and where it ends."""
    full = tok.decode(tokens)
    for k in range(3, len(tokens) - 2):
        head = tok.decode(tokens[:k])
        a, b = tok.decode(tokens[k - 1 : k]), tok.decode(tokens[k : k + 1])
        if (
            "\ufffd" in a + b
            or head.endswith("\ufffd")
            or len(a) < 2
            or len(b) < 2
            or not full.startswith(head)
        ):
            continue
        stop = head[-2:] + b[:2]
        if full.find(stop) == len(head) - 2:
            return stop, full[: len(head) - 2], k + 1
    raise AssertionError("no usable stop string in the greedy output")


def test_stop_string_and_max_tokens_finish_reasons(model):
    engine = model.engine()
    ids = model.ids(PROMPT_TEXTS[1])
    plain = run(engine, [greedy("plain", ids, 24)])["plain"]
    assert plain.finish_reason == "length" and len(plain.tokens) == 24
    assert plain.text == model.tok.decode(plain.tokens)
    stop, before, n_tokens = _stop_string_from(model.tok, plain.tokens)
    res = run(engine, [greedy("s", ids, 24, stop=[stop])])["s"]
    assert res.finish_reason == "stop"
    assert res.text == before
    assert res.tokens == plain.tokens[:n_tokens]  # generation ended at the token completing the stop
    res = run(engine, [greedy("s2", ids, 24, stop=[stop], include_stop_str_in_output=True)])["s2"]
    assert res.finish_reason == "stop" and res.text == before + stop
    # a stop string only reached after max_tokens: "length"
    res = run(engine, [greedy("s3", ids, n_tokens - 1, stop=[stop])])["s3"]
    assert res.finish_reason == "length" and res.tokens == plain.tokens[: n_tokens - 1]
    engine.check_no_leaks()


def test_stop_token_ids_and_min_tokens_match_transformers(llama):
    engine = llama.engine()
    ids = llama.ids(PROMPT_TEXTS[0])
    plain = hf_greedy(llama.hf, ids, 24)
    stop_tok = plain[5]
    first = plain.index(stop_tok)
    res = run(engine, [greedy("a", ids, 24, stop_token_ids=[stop_tok])])["a"]
    assert res.finish_reason == "stop"
    assert res.tokens == plain[: first + 1]  # the stop token is the last token, not in the text
    assert res.text == llama.tok.decode(plain[:first])
    # min_tokens keeps the stop token from being sampled: same as transformers' min_new_tokens
    ref = hf_greedy(llama.hf, ids, 24, min_new_tokens=first + 3, eos_token_id=stop_tok)
    res = run(engine, [greedy("b", ids, 24, stop_token_ids=[stop_tok], min_tokens=first + 3)])["b"]
    assert res.tokens == ref
    assert stop_tok not in res.tokens[: first + 3]
    assert res.finish_reason == ("stop" if ref[-1] == stop_tok and len(ref) < 24 else "length")
    engine.check_no_leaks()


def test_eos_stops_unless_ignored(llama, tmp_path):
    ids = llama.ids(PROMPT_TEXTS[3])
    plain = hf_greedy(llama.hf, ids, 20)
    eos = plain[6]
    # the same weights (same seed) with that token declared as the model's EOS
    hf = build_tiny_model(tmp_path, "llama", seed=0, eos_token_id=eos)
    m = Model(tmp_path, hf)
    assert eos in m.engine().info.eos_token_ids
    ref = m.hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, pad_token_id=0)[
        0, len(ids) :
    ].tolist()
    assert ref == plain[: plain.index(eos) + 1]  # transformers stops on it
    engine = m.engine()
    res = run(engine, [greedy("a", ids, 20, ignore_eos=False)])["a"]
    assert res.finish_reason == "stop" and res.tokens == ref
    assert res.text == m.tok.decode(ref[:-1])
    res = run(engine, [greedy("b", ids, 20, ignore_eos=True)])["b"]
    assert res.finish_reason == "length" and res.tokens == plain
    engine.check_no_leaks()


def test_max_model_len_finishes_with_length(llama):
    engine = llama.engine(max_model_len=32)
    ids = llama.ids(PROMPT_TEXTS[3])[:20]
    res = run(engine, [greedy("a", ids, 100)])["a"]
    assert res.finish_reason == "length" and len(ids) + len(res.tokens) == 32
    with pytest.raises(EngineError):
        engine.add_request(greedy("b", list(range(100, 140)), 4))
    engine.check_no_leaks()


def test_abort_frees_blocks(llama):
    engine = llama.engine(max_num_batched_tokens=16)
    ids = llama.ids(PROMPT_TEXTS[3])
    engine.add_request(greedy("run", ids, 200))
    engine.add_request(greedy("keep", llama.ids("Hi"), 20))
    got = {"run": [], "keep": []}
    for _ in range(6):
        for o in engine.step():
            got[o.request_id] += o.new_token_ids
    used = engine.blocks.num_blocks - engine.blocks.num_free
    assert used >= engine.blocks.blocks_for(len(ids))
    assert engine.abort("run") and not engine.abort("nope")
    outs = {o.request_id: o for o in engine.step()}
    got["keep"] += outs["keep"].new_token_ids
    assert outs["run"].finished and outs["run"].finish_reason == "abort"
    assert engine.blocks.num_blocks - engine.blocks.num_free < used
    assert not engine.abort("run"), "an aborted request is gone"
    # a request aborted while waiting (never scheduled) is released too
    engine.add_request(greedy("queued", ids, 5))
    assert engine.abort("queued")
    rest = run(engine, [])
    assert rest["queued"].finish_reason == "abort" and rest["queued"].tokens == []
    assert rest["keep"].finish_reason == "length"
    assert got["keep"] + rest["keep"].tokens == hf_greedy(llama.hf, llama.ids("Hi"), 20)
    assert not engine.has_work()
    engine.check_no_leaks()


def test_rejects_bad_requests(llama):
    engine = llama.engine()
    with pytest.raises(EngineError):
        engine.add_request(greedy("empty", [], 4))
    with pytest.raises(EngineError):
        engine.add_request(greedy("oov", [1, 10**6], 4))
    engine.add_request(greedy("dup", [1, 2], 2))
    with pytest.raises(EngineError):
        engine.add_request(greedy("dup", [1, 2], 2))
    run(engine, [])
    engine.check_no_leaks()


# ---- the real default model ------------------------------------------------------------------------


def _hf_from_gguf(source, hf_config):
    """transformers' own model from the GGUF (its loader needs `accelerate`; without it, load the same
    dequantised tensors with transformers' GGUF reader into a transformers model)."""
    import importlib.util

    from transformers import AutoModelForCausalLM

    if importlib.util.find_spec("accelerate") is not None:
        hf = AutoModelForCausalLM.from_pretrained(
            str(source.path.parent), gguf_file=source.path.name, dtype=torch.float32
        )
    else:
        from transformers.initialization import no_init_weights
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        with no_init_weights():  # every weight is loaded below; random init of 135M params is slow
            hf = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
        tensors = load_gguf_checkpoint(str(source.path), return_tensors=True, model_to_load=hf)["tensors"]
        missing, unexpected = hf.load_state_dict(tensors, strict=False)
        hf.tie_weights()
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return hf.eval()


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["none", "auto"])  # float32, and the file's own blocks (auto: gguf)
def test_default_model_greedy_matches_transformers_gguf(monkeypatch, quantization):
    import functools

    import gguf

    # transformers rebuilds the same read-only GGUF name table for every submodule (~400 times, ~9 s)
    monkeypatch.setattr(
        gguf, "get_tensor_name_map", functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map)
    )
    source = resolve_source(None)
    # workers load the folder converted from the GGUF: the same choice there
    assert load_model(source.as_folder(), quantization=quantization).quantization == ("gguf" if quantization == "auto" else "none")
    loaded = load_model(source, quantization=quantization, activations="float")  # int8 activations: eval/, not token for token
    assert loaded.quantization == ("gguf" if quantization == "auto" else "none")
    if quantization == "auto":  # every Q4_1 layer in int4, the tied Q8_0 output layer in int8: none left in float
        kinds = Counter(type(m).__name__ for m in loaded.model.modules() if type(m).__name__.endswith("Linear"))
        assert kinds == {"Int4Linear": 120, "Int8Linear": 1}, kinds
    engine = Engine(loaded, EngineConfig(kv_cache_gib=0.05))
    hf = _hf_from_gguf(source, loaded.hf_config)
    tok = loaded.tokenizer
    prompts = ["The quick brown fox", "def fibonacci(n):"]
    reqs = [greedy(str(i), tok(p)["input_ids"], 16) for i, p in enumerate(prompts)]
    results = run(engine, reqs)
    for i, p in enumerate(prompts):
        ids = tok(p)["input_ids"]
        with torch.no_grad():
            ref = hf_greedy(hf, ids, 16)
        assert results[str(i)].tokens == ref, p
    engine.check_no_leaks()


def test_a_read_only_cache_keeps_the_gguf_unless_a_folder_is_required(monkeypatch, tmp_path):
    from freelunch.models import loader

    def read_only(path):
        raise PermissionError(f"cannot write {path}")

    monkeypatch.setattr(loader, "gguf_to_folder", read_only)
    gguf = loader.ModelSource(tmp_path / "m.gguf", "m")
    assert gguf.as_folder() == gguf  # the native engine reads the GGUF itself
    with pytest.raises(loader.ModelLoadError, match="converting the GGUF failed"):
        gguf.as_folder(required=True)  # vLLM cannot
    folder = loader.ModelSource(tmp_path, "m")
    assert folder.as_folder(required=True) is folder


def test_a_reinstalled_gguf_reuses_its_conversion_and_old_copies_go(monkeypatch, tmp_path):
    """The conversion is named by the file's content: the same file reinstalled (new path, new mtime)
    is not converted again, while each reinstall used to leave another 600 MB folder in the cache."""
    import shutil

    from freelunch.models import loader

    default = loader.default_model_path()
    converted = loader.gguf_to_folder(default)
    copy = tmp_path / "site-packages" / default.name
    copy.parent.mkdir()
    shutil.copyfile(default, copy)
    os.utime(copy, (1_800_000_000, 1_800_000_000))
    cache = tmp_path / "cache"
    monkeypatch.setenv("FREELUNCH_CACHE_DIR", str(cache))
    cache.mkdir()
    (cache / loader.converted_folder(copy).name).symlink_to(converted)  # converted before (as in the real cache)
    stale = [cache / f"{default.stem}-{default.stat().st_size}-{t}" for t in (1796627056, 1796627305)]
    other_file = cache / f"{default.stem}-{default.stat().st_size + 1}-1796627056"
    for folder in [*stale, other_file]:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"0")

    def no_conversion(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(loader, "_read_gguf", no_conversion)
    assert loader.gguf_to_folder(copy).resolve() == converted.resolve()
    assert not any(folder.exists() for folder in stale)
    assert other_file.exists()  # another file's conversion stays
    copy.write_bytes(copy.read_bytes()[:-1] + b"\x00")  # an edited file is another file
    assert loader.converted_folder(copy) != loader.converted_folder(default)


@pytest.mark.parametrize(
    "model_type,tokenizer_class",
    [("llama", "TokenizersBackend"), ("llama", "LlamaTokenizerFast"), ("llama", "GPT2Tokenizer"), ("qwen2", "Qwen2TokenizerFast"),
     ("qwen3", "Qwen2Tokenizer"), ("qwen2_moe", "PreTrainedTokenizerFast"), ("olmoe", "GPT2TokenizerFast"),
     ("qwen3_moe", "LlamaTokenizer"), ("mistral", "LlamaTokenizer"), ("mixtral", "TokenizersBackend")],
)  # fmt: skip
def test_tokenizers_load_as_autotokenizer_loads_them_without_importing_it(tiny_llama, tmp_path, model_type, tokenizer_class):
    """load_tokenizer finds the class without AutoTokenizer (whose import costs each process ~150 MB):
    the same class, ids, chat template and special tokens, for the class names hub folders give."""
    import json
    import shutil
    import subprocess
    import sys

    from transformers import AutoTokenizer

    from freelunch.models.loader import ModelSource, _direct_tokenizer_class, load_tokenizer

    folder = tmp_path / "model"
    shutil.copytree(tiny_llama[0], folder)
    for name, key, value in (("tokenizer_config.json", "tokenizer_class", tokenizer_class), ("config.json", "model_type", model_type)):
        data = json.loads((folder / name).read_text())
        data[key] = value
        (folder / name).write_text(json.dumps(data))
    assert (_direct_tokenizer_class(folder) is None) == (model_type in ("mistral", "mixtral"))  # Mistral's rules: AutoTokenizer
    got, want = load_tokenizer(ModelSource(folder, "m")), AutoTokenizer.from_pretrained(str(folder))
    assert type(got) is type(want)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there, 中文 🎉"}]
    assert got.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == want.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    for text in ["Hello world", "  two  spaces\n\nand lines", "<|im_start|>user\nhi<|im_end|>"]:
        assert got(text)["input_ids"] == want(text)["input_ids"]
    assert (got.all_special_ids, got.eos_token_id, got.bos_token_id, len(got)) == (want.all_special_ids, want.eos_token_id, want.bos_token_id, len(want))
    if tokenizer_class == "TokenizersBackend" and model_type == "llama":  # in a fresh process: no transformers.models.auto
        code = f"import sys; from freelunch.models.loader import ModelSource, load_tokenizer; load_tokenizer(ModelSource(__import__('pathlib').Path({str(folder)!r}), 'm')); print('transformers.models.auto' in sys.modules)"
        assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
