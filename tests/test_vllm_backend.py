"""`--engine vllm`: vLLM's CPU build, for real (no mocks), against the native engine and transformers.

Marked `vllm`: `.ci/run` runs these in a second pytest pass, after the fast suite. One vLLM engine
starts per module fixture (~20 s each on 2 cores), so the tests share two: a tiny seeded Llama
and the real default model.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json

import httpx
import pytest
import torch

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm", reason="the vllm extra is not installed")

from freelunch.api.app import create_app
from freelunch.config import EngineConfig
from freelunch.engine.request import ConstraintSpec, GenerationRequest, SamplingParams
from freelunch.methods import method_specs
from freelunch.pool.local_engine import ThreadWorker
from freelunch.pool.pool import WorkerPool
from live_server import live_server
from tiny_models import build_tiny_model

# vLLM's CPU attention kernels take head_dim 32 and up: 2 heads of 32 (1 KV head) over hidden 64.
TINY = {"num_attention_heads": 2, "num_key_value_heads": 1}
# Odd on purpose: guided pairs added together cannot all be admitted in one step, so some fall out
# of lockstep and must be restarted, which the parity tests then cover.
MAX_SEQS = 5
PROMPTS = [[1, 5, 9, 200, 31], [1, 4000, 17], [1] + list(range(300, 340)), [1, 77, 78, 79, 80, 81, 82, 83]]


def run_all(engine, requests: list[GenerationRequest]) -> dict[str, list]:
    """Drive an engine (native or vLLM) to completion: request id -> its outputs."""
    for r in requests:
        engine.add_request(r)
    outs: dict[str, list] = {r.request_id: [] for r in requests}
    while engine.has_work():
        for o in engine.step():
            outs[o.request_id].append(o)
    return outs


def tokens(outs) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def greedy(max_tokens: int = 12, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, HF model, vLLM engine, native engine) on one tiny seeded Llama, float32."""
    from freelunch.backends.vllm_engine import VllmEngine
    from freelunch.pool.local_engine import load_engine

    folder = tmp_path_factory.mktemp("tiny-llama-hd32")
    hf = build_tiny_model(folder, "llama", seed=3, **TINY)
    config = EngineConfig(model=str(folder), dtype="float32", max_model_len=512, max_num_seqs=MAX_SEQS, kv_cache_gib=0.05)
    return folder, hf, VllmEngine(config), load_engine(config)


def test_greedy_tokens_match_native_engine_and_transformers(tiny):
    _, hf, vllm_engine, native = tiny
    reqs = lambda: [GenerationRequest(f"r{i}", p, greedy(ignore_eos=True)) for i, p in enumerate(PROMPTS)]
    got, want = run_all(vllm_engine, reqs()), run_all(native, reqs())
    for i, prompt in enumerate(PROMPTS):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, min_new_tokens=12)[0, len(prompt) :]
        assert tokens(got[f"r{i}"]) == tokens(want[f"r{i}"]) == ref.tolist()
        last = got[f"r{i}"][-1]
        assert last.finished and last.finish_reason == "length"
        assert (last.num_prompt_tokens, last.num_output_tokens) == (len(prompt), 12)


def test_logprobs_and_prompt_logprobs_match_native_engine(tiny):
    _, _, vllm_engine, native = tiny
    params = lambda: greedy(6, logprobs=3, prompt_logprobs=2)
    got = run_all(vllm_engine, [GenerationRequest("lp", PROMPTS[0], params())])["lp"]
    want = run_all(native, [GenerationRequest("lp", PROMPTS[0], params())])["lp"]
    g = [r for o in got for r in (o.logprobs or [])]
    w = [r for o in want for r in (o.logprobs or [])]
    assert len(g) == len(w) == 6
    for a, b in zip(g, w):
        assert a.token_id == b.token_id
        assert a.logprob == pytest.approx(b.logprob, abs=1e-3)
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
    gp = next(o.prompt_logprobs for o in got if o.prompt_logprobs is not None)
    wp = next(o.prompt_logprobs for o in want if o.prompt_logprobs is not None)
    assert gp[0] is None and wp[0] is None and len(gp) == len(wp) == len(PROMPTS[0])
    for a, b in zip(gp[1:], wp[1:]):
        assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-3)


@pytest.mark.parametrize("scale,negative", [(1.5, None), (3.0, None), (2.0, [1, 4000, 17, 9])])
def test_guidance_matches_native_engine_with_pairs_out_of_lockstep(tiny, scale, negative):
    """Six guided requests (twelve rows) at once into five batch slots: pairs are split by the
    scheduler and restarted, and the greedy guided tokens still equal the native engine's."""
    _, hf, vllm_engine, native = tiny
    opts = {"scale": scale, "negative_prompt_ids": negative}
    prompts = PROMPTS + PROMPTS[:2]

    def reqs():
        return [GenerationRequest(f"g{i}", p, greedy(10, ignore_eos=True), {"guidance": dict(opts)}) for i, p in enumerate(prompts)]

    got, want = run_all(vllm_engine, reqs()), run_all(native, reqs())
    plain = run_all(native, [GenerationRequest("p", prompts[0], greedy(10, ignore_eos=True))])["p"]
    for i in range(len(prompts)):
        assert tokens(got[f"g{i}"]) == tokens(want[f"g{i}"]), f"request {i}"
        stats = got[f"g{i}"][-1].method_stats["guidance"]
        assert stats["scale"] == scale and stats["extra_tokens"] == 10
    assert tokens(got["g0"]) != tokens(plain), "guidance should change this output"
    neg = torch.tensor([negative]) if negative else None
    ref = hf.generate(
        torch.tensor([prompts[2]]), max_new_tokens=10, do_sample=False, guidance_scale=scale, negative_prompt_ids=neg,
        eos_token_id=None, pad_token_id=0,
    )[0, len(prompts[2]) :]  # fmt: skip
    assert tokens(got["g2"]) == ref.tolist()
    assert sum(got[f"g{i}"][-1].method_stats["guidance"]["resyncs"] for i in range(len(prompts))) > 0
    assert not vllm_engine.requests


def test_seeded_sampling_is_reproducible_and_seeds_differ(tiny):
    _, _, vllm_engine, _ = tiny
    sample = lambda seed: SamplingParams(max_tokens=8, temperature=1.0, seed=seed, ignore_eos=True)
    a = run_all(vllm_engine, [GenerationRequest("s1", PROMPTS[0], sample(7)), GenerationRequest("s2", PROMPTS[0], sample(8))])
    b = run_all(vllm_engine, [GenerationRequest("s1", PROMPTS[0], sample(7))])
    assert tokens(a["s1"]) == tokens(b["s1"])
    assert tokens(a["s1"]) != tokens(a["s2"])


def test_guided_sampling_draws_one_token_for_both_rows(tiny):
    """A sampled guided request: the processor draws the pair's token (methods/guidance_vllm.py). Top-k 1
    draws the guided argmax, so it equals greedy guidance; a seed reproduces its draws."""
    _, _, vllm_engine, native = tiny
    guided = {"guidance": {"scale": 2.0}}

    def run(rid: str, **params) -> list:
        p = SamplingParams(max_tokens=10, ignore_eos=True, **params)
        return run_all(vllm_engine, [GenerationRequest(rid, PROMPTS[1], p, dict(guided))])[rid]

    want = tokens(run_all(native, [GenerationRequest("n", PROMPTS[1], greedy(10, ignore_eos=True), dict(guided))])["n"])
    assert tokens(run("k1", temperature=1.0, top_k=1)) == want
    a, b, c = run("s1", temperature=1.0, seed=3), run("s2", temperature=1.0, seed=3), run("s3", temperature=1.0, seed=4)
    assert all(o[-1].method_stats["guidance"]["resyncs"] == 0 for o in (a, b, c)), "one request alone stays in lockstep"
    assert tokens(a) == tokens(b) != tokens(c)


def test_abort_answers_and_frees_the_request(tiny):
    _, _, vllm_engine, _ = tiny
    vllm_engine.add_request(GenerationRequest("x", PROMPTS[1], greedy(200, ignore_eos=True)))
    vllm_engine.step()
    assert vllm_engine.abort("x") and not vllm_engine.abort("x")
    outs = []
    while vllm_engine.has_work():
        outs += vllm_engine.step()
    assert [(o.request_id, o.finish_reason) for o in outs if o.finished] == [("x", "abort")]
    assert not vllm_engine.requests and vllm_engine.llm.get_num_unfinished_requests() == 0


def test_bad_requests_are_refused_with_the_field(tiny):
    from freelunch.engine.engine import EngineError

    _, _, vllm_engine, _ = tiny
    cases = [
        (GenerationRequest("b1", [], greedy()), "prompt"),
        (GenerationRequest("b2", [10**6], greedy()), "prompt"),
        (GenerationRequest("b3", PROMPTS[0], greedy(), {"speculative": {"method": "token_recycling"}}), "speculative"),
        (GenerationRequest("b4", PROMPTS[0], greedy(), {"guidance": {"scale": -1}}), "guidance.scale"),
        (GenerationRequest("b5", PROMPTS[0], greedy(logprobs=1), {"guidance": {"scale": 2}}), "logprobs"),
    ]
    for request, param in cases:
        with pytest.raises(EngineError) as e:
            vllm_engine.add_request(request)
        assert e.value.param == param
    assert not vllm_engine.requests


def test_prefix_cache_reports_cached_tokens_and_salts_per_tenant(tiny):
    """vLLM's own prefix caching is on and reported as ours; an API key salts its block hashes."""
    from vllm.inputs import TokensPrompt

    _, _, vllm_engine, native = tiny
    prompt = [1] + list(range(500, 800))
    outs = {rid: run_all(vllm_engine, [GenerationRequest(rid, prompt, greedy(ignore_eos=True))])[rid] for rid in ("p1", "p2")}
    native_out = run_all(native, [GenerationRequest("n", prompt, greedy(ignore_eos=True))])["n"]
    assert outs["p1"][-1].num_cached_tokens == 0 and 0 < outs["p2"][-1].num_cached_tokens < len(prompt)
    assert tokens(outs["p1"]) == tokens(outs["p2"]) == tokens(native_out)
    salted = vllm_engine._prompt(TokensPrompt, prompt, GenerationRequest("s", prompt, greedy(), tenant="alice"))
    assert salted["cache_salt"] == "alice"
    assert "cache_salt" not in vllm_engine._prompt(TokensPrompt, prompt, GenerationRequest("u", prompt, greedy()))

# ---- the HTTP API over a mixed pool ---------------------------------------------------------------
@pytest.fixture
def mixed_server(tiny):
    """The API over the vLLM engine plus one native worker (for the options vLLM cannot run).
    Per test: one loop drives an engine at a time, and other tests put the same engines in other pools."""
    folder, _, vllm_engine, native = tiny
    pool = WorkerPool([ThreadWorker(vllm_engine, "vllm-0", backend="vllm"), ThreadWorker(native, "native-0")])
    with live_server(create_app(pool)) as base:
        yield base, folder.name, pool


def complete(base: str, **body) -> httpx.Response:
    return httpx.post(base + "/v1/completions", json=body, timeout=120)


def test_api_plain_requests_run_on_vllm_and_match_native(mixed_server, tiny):
    base, model, pool = mixed_server
    # the model card lists the methods of either worker: the native one beside vLLM runs the rest
    card = httpx.get(base + "/v1/models").json()["data"][0]
    assert {m["option"] for m in card["methods"]} == {o for o, spec in method_specs().items() if not spec.requires}
    _, _, _, native = tiny
    prompt = "The capital of France is"
    r = complete(base, model=model, prompt=prompt, max_tokens=10, temperature=0, ignore_eos=True)
    assert r.status_code == 200, r.text
    pool.shutdown()  # the native engine is stepped from here next, and one loop drives an engine at a time
    ids = pool.served.tokenizer.encode(prompt)
    want = run_all(native, [GenerationRequest("n", ids, greedy(10, ignore_eos=True))])["n"]
    body = r.json()
    assert body["choices"][0]["text"] == "".join(o.new_text for o in want)
    assert body["usage"] == {
        "prompt_tokens": len(ids), "completion_tokens": 10, "total_tokens": len(ids) + 10, "prompt_tokens_details": {"cached_tokens": 0},
    }  # fmt: skip


def test_api_streaming_stop_and_n(mixed_server):
    base, model, _ = mixed_server
    full = complete(base, model=model, prompt="Once upon", max_tokens=12, temperature=0, ignore_eos=True).json()
    text = full["choices"][0]["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    chunks = []
    with httpx.stream(
        "POST", base + "/v1/completions", timeout=120,
        json={"model": model, "prompt": "Once upon", "max_tokens": 12, "temperature": 0, "stream": True, "stop": [stop], "ignore_eos": True},
    ) as r:  # fmt: skip
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    streamed = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert streamed == text[: text.index(stop)]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    n = complete(base, model=model, prompt="Once upon", max_tokens=6, temperature=1.0, seed=5, n=3, ignore_eos=True).json()
    assert sorted(c["index"] for c in n["choices"]) == [0, 1, 2]
    again = complete(base, model=model, prompt="Once upon", max_tokens=6, temperature=1.0, seed=5, n=3, ignore_eos=True).json()
    assert [c["text"] for c in n["choices"]] == [c["text"] for c in again["choices"]]


def test_api_routes_options_vllm_cannot_run_to_native_workers(mixed_server):
    base, model, _ = mixed_server
    plain = complete(base, model=model, prompt="Hello there", max_tokens=10, temperature=0, ignore_eos=True).json()
    spec = complete(
        base, model=model, prompt="Hello there", max_tokens=10, temperature=0, ignore_eos=True,
        speculative={"method": "token_recycling"},
    ).json()  # fmt: skip
    assert spec["choices"][0]["text"] == plain["choices"][0]["text"]  # lossless, and served (natively)
    assert "speculative" in spec["usage"]["method_stats"]
    guided = complete(base, model=model, prompt="Hello there", max_tokens=10, temperature=0, guidance={"scale": 2.0}).json()
    assert guided["usage"]["method_stats"]["guidance"]["scale"] == 2.0


def test_api_without_native_workers_refuses_with_option_and_backend(tiny):
    folder, _, vllm_engine, _ = tiny
    pool = WorkerPool([ThreadWorker(vllm_engine, "vllm-only", backend="vllm")])
    with live_server(create_app(pool)) as base:
        # the model card (and the playground built from it) offers only what vLLM runs here
        card = httpx.get(base + "/v1/models").json()["data"][0]
        on_vllm = {option for option, spec in method_specs().items() if "vllm" in spec.engines}
        assert {m["option"] for m in card["methods"]} == on_vllm and card["images"] is False
        r = complete(base, model=folder.name, prompt="Hi", max_tokens=4, speculative={"method": "token_recycling"})
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["param"] == "speculative" and "vllm" in err["message"] and "--native-workers" in err["message"]
        ok = complete(base, model=folder.name, prompt="Hi", max_tokens=4)
        assert ok.status_code == 200


def test_api_concurrent_mixed_traffic(mixed_server):
    """Plain, guided and speculative requests at once: every one answers, greedy outputs equal
    the same request alone."""
    base, model, _ = mixed_server
    bodies = [
        {"prompt": f"Story {i}:", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        | ({"guidance": {"scale": 1.5}} if i % 3 == 1 else {"speculative": {"method": "token_recycling"}} if i % 3 == 2 else {})
        for i in range(9)
    ]
    alone = [complete(base, model=model, **b).json()["choices"][0]["text"] for b in bodies]
    with concurrent.futures.ThreadPoolExecutor(9) as ex:
        together = list(ex.map(lambda b: complete(base, model=model, **b).json()["choices"][0]["text"], bodies))
    assert together == alone


# ---- the real default model, and the CLI as a process --------------------------------------------
@pytest.mark.slow
def test_default_model_greedy_matches_native_engine():
    from freelunch.backends.vllm_engine import VllmEngine
    from freelunch.pool.local_engine import load_engine

    config = EngineConfig(dtype="float32", max_model_len=1024, max_num_seqs=4, kv_cache_gib=0.25)
    vllm_engine = VllmEngine(config)
    tok = vllm_engine.tokenizer
    chats = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]
    texts = [tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True, tokenize=False) for c in chats]
    ids = [tok.encode(t, add_special_tokens=False) for t in texts]
    schema = {"type": "object", "properties": {"answer": {"type": "string"}, "sure": {"type": "boolean"}},
              "required": ["answer", "sure"], "additionalProperties": False}
    # strings bounded at 16 characters: on the output's text natively, in vLLM's grammar (maxLength)
    spec = ConstraintSpec("json_schema", json.dumps(schema), max_string=16)

    def reqs():  # plain, then the same chats under a JSON schema (vLLM's own structured outputs)
        plain = [GenerationRequest(f"c{i}", p, greedy(24)) for i, p in enumerate(ids)]
        return plain + [GenerationRequest(f"j{i}", p, greedy(48), constraint=spec) for i, p in enumerate(ids)]

    got = run_all(vllm_engine, reqs())
    # vLLM computes float32 on the dequantised weights: the native engine's exact counterpart is
    # float activations over a float32 cache (its defaults, int8 activations and a float16 cache,
    # are measured for quality in bench/eval_quantization.py and bench/eval_kv_cache.py)
    want = run_all(load_engine(dataclasses.replace(config, activations="float", kv_cache_dtype="float32")), reqs())
    for i in range(len(ids)):
        assert tokens(got[f"c{i}"]) == tokens(want[f"c{i}"]), chats[i]
        assert "".join(o.new_text for o in got[f"c{i}"]) == "".join(o.new_text for o in want[f"c{i}"])
        assert tokens(got[f"j{i}"]) == tokens(want[f"j{i}"]), chats[i]
        structured = "".join(o.new_text for o in want[f"j{i}"])
        if want[f"j{i}"][-1].finish_reason == "stop":
            assert set(json.loads(structured)) == {"answer", "sure"} and len(json.loads(structured)["answer"]) <= 16


def test_cli_serves_vllm_with_native_workers(tiny):
    """`freelunch serve --engine vllm --native-workers 1` as real processes."""
    from test_worker_processes import start_server, stop_server

    folder = tiny[0]
    proc, base = start_server(folder, 1, "--engine", "vllm", "--native-workers", "1", "--max-num-seqs", "4")
    try:
        ready = httpx.get(base + "/ready").json()
        assert {w["name"] for w in ready["workers"]} == {"worker-0", "native-worker-0"}
        plain = complete(base, model=folder.name, prompt="Hello", max_tokens=6, temperature=0, ignore_eos=True).json()
        spec = complete(
            base, model=folder.name, prompt="Hello", max_tokens=6, temperature=0, ignore_eos=True,
            speculative={"method": "token_recycling"},
        ).json()  # fmt: skip
        assert spec["choices"][0]["text"] == plain["choices"][0]["text"]
        assert "speculative" in spec["usage"]["method_stats"]
        metrics = {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in httpx.get(base + "/metrics").text.splitlines()
            if line and not line.startswith("#")
        }
        assert metrics['freelunch_request_success_total{finished_reason="length"}'] == 2
        assert metrics["freelunch_generation_tokens_total"] == 12
        assert metrics["freelunch_workers_alive"] == 2
    finally:
        stop_server(proc)

