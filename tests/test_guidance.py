"""Classifier-free guidance: token for token as transformers' CFG, and exactly plain at scale 1."""

from __future__ import annotations


import httpx
import pytest
import torch

from freelunch.config import EngineConfig
from freelunch.engine.engine import Engine, EngineError
from freelunch.engine.request import GenerationRequest, SamplingParams
from freelunch.methods.guidance import guide

PROMPTS = [
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "1, 2, 3, 4, 5, 6, 7,",
    "Translate to French: I like cheese.",
]
NEGATIVE = "A very sad story about rain"
LONG_PROMPT = " ".join(f"word{i}" for i in range(30))  # ~60 tokens: 4+ prefill chunks of 16
MAX_TOKENS = 12


def _engine(loaded, **kw) -> Engine:
    kw.setdefault("kv_cache_gib", 0.05)
    kw.setdefault("kv_cache_dtype", "float32")  # transformers' logprobs to 1e-4; 768 bytes a token
    return Engine(loaded, EngineConfig(max_model_len=512, **kw))


def _run(engine: Engine, requests: list[GenerationRequest]) -> dict[str, list[int]]:
    for r in requests:
        engine.add_request(r)
    out: dict[str, list[int]] = {}
    _run.stats, _run.logprobs = {}, {}
    while engine.has_work():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
            _run.logprobs.setdefault(o.request_id, []).extend(o.logprobs or [])
            if o.finished:
                _run.stats[o.request_id] = (o.method_stats or {}).get("guidance")
    engine.check_no_leaks()
    return out


def _req(rid: str, ids: list[int], guidance: dict | None, max_tokens: int = MAX_TOKENS, **params) -> GenerationRequest:
    params.setdefault("temperature", 0)
    methods = {"guidance": guidance} if guidance is not None else {}
    return GenerationRequest(rid, list(ids), SamplingParams(max_tokens=max_tokens, ignore_eos=True, **params), methods)


def _hf(hf_model, ids: list[int], n: int = MAX_TOKENS, scale: float | None = None, negative: list[int] | None = None, **kw):
    neg = torch.tensor([negative]) if negative else None
    out = hf_model.generate(
        torch.tensor([ids]), max_new_tokens=n, do_sample=False, guidance_scale=scale, negative_prompt_ids=neg,
        eos_token_id=None, pad_token_id=0, **kw,
    )
    if kw.get("return_dict_in_generate"):
        return out
    return out[0, len(ids) :].tolist()


# ---- parity with transformers ------------------------------------------------------------
@pytest.mark.parametrize("scale", [1.5, 2.0, 3.0])
def test_greedy_matches_transformers(loaded, tiny_llama, scale):
    _, hf_model = tiny_llama
    tok = loaded.tokenizer
    neg = tok.encode(NEGATIVE)
    reqs, expected = [], {}
    for i, p in enumerate(PROMPTS):
        ids = tok.encode(p)
        reqs.append(_req(f"d{i}", ids, {"scale": scale}))
        reqs.append(_req(f"n{i}", ids, {"scale": scale, "negative_prompt_ids": neg}))
        expected[f"d{i}"] = _hf(hf_model, ids, scale=scale)
        expected[f"n{i}"] = _hf(hf_model, ids, scale=scale, negative=neg)
    engine = _engine(loaded)
    for r in reqs:  # alone
        assert _run(engine, [r])[r.request_id] == expected[r.request_id], r.request_id
    assert _run(engine, reqs) == expected  # all in one batch
    # and guidance does change the output of this model (the test would be vacuous otherwise)
    assert any(expected[f"d{i}"] != _hf(hf_model, tok.encode(p)) for i, p in enumerate(PROMPTS))


def test_chunked_prefill_and_tight_budget_match_transformers(loaded, tiny_llama):
    """Rows finish prefill at different steps (either one first); a budget too small for both
    rows of every request makes a main row decode a step before its shadow."""
    _, hf_model = tiny_llama
    tok = loaded.tokenizer
    long_ids, short_ids = tok.encode(LONG_PROMPT), tok.encode(PROMPTS[1])
    cases = {
        "long-default": (long_ids, None),
        "long-neg": (long_ids, tok.encode(NEGATIVE)),
        "short-longneg": (short_ids, long_ids[5:]),  # the shadow row prefills longer
    }
    expected = {rid: _hf(hf_model, ids, scale=2.0, negative=neg) for rid, (ids, neg) in cases.items()}
    reqs = lambda: [_req(rid, ids, {"scale": 2.0, "negative_prompt_ids": neg}) for rid, (ids, neg) in cases.items()]  # noqa: E731
    engine = _engine(loaded, max_num_batched_tokens=16)
    for r in reqs():
        assert _run(engine, [r])[r.request_id] == expected[r.request_id], r.request_id
    # all together, with plain requests taking budget too: 5 decode rows of guided requests
    # (plus plain ones) never fit in 16 tokens while the long prompts are prefilling
    plain = {f"p{i}": _hf(hf_model, tok.encode(p)) for i, p in enumerate(PROMPTS)}
    mixed = reqs() + [_req(f"p{i}", tok.encode(p), None) for i, p in enumerate(PROMPTS)]
    assert _run(engine, mixed) == expected | plain


def test_shadow_decodes_a_step_after_main(loaded, tiny_llama):
    """17 tokens per step and 18 decode rows: the last request gets only its main row in."""
    _, hf_model = tiny_llama
    tok = loaded.tokenizer
    prompts = [f"{w} is a word" for w in ("apple", "river", "stone", "cloud", "green", "seven", "paper", "night", "house")]
    expected = {f"g{i}": _hf(hf_model, tok.encode(p), scale=1.5) for i, p in enumerate(prompts)}
    engine = _engine(loaded, max_num_batched_tokens=17)
    seen_split = []
    for i, p in enumerate(prompts):  # 9 requests x 2 rows = 18 decode rows > 17
        engine.add_request(_req(f"g{i}", tok.encode(p), {"scale": 1.5}))
    out: dict[str, list[int]] = {}
    while engine.has_work():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
        seen_split += [len(s.strategy._last) for s in engine.requests.values()]
    engine.check_no_leaks()
    assert out == expected
    assert max(seen_split) == 1  # a row's logits waited for the other's


def test_preemption_matches_transformers(loaded, tiny_llama):
    _, hf_model = tiny_llama
    tok = loaded.tokenizer
    neg = tok.encode(NEGATIVE)
    ids = [tok.encode(p) for p in PROMPTS]
    expected = {f"r{i}": _hf(hf_model, x, n=40, scale=2.0, negative=neg) for i, x in enumerate(ids)}
    engine = _engine(loaded, kv_cache_gib=16 * 16 * 768 / 2**30)  # 16 blocks of 16 tokens
    got = _run(engine, [_req(f"r{i}", x, {"scale": 2.0, "negative_prompt_ids": neg}, max_tokens=40) for i, x in enumerate(ids)])
    assert engine.stats["preemptions"] > 0
    assert got == expected


def test_logprobs_are_the_guided_distribution(loaded, tiny_llama):
    _, hf_model = tiny_llama
    tok = loaded.tokenizer
    ids, neg = tok.encode(PROMPTS[0]), tok.encode(NEGATIVE)
    hf = _hf(hf_model, ids, n=6, scale=2.0, negative=neg, return_dict_in_generate=True, output_scores=True)
    got = _run(_engine(loaded), [_req("r", ids, {"scale": 2.0, "negative_prompt_ids": neg}, max_tokens=6, logprobs=3)])
    assert got["r"] == hf.sequences[0, len(ids) :].tolist()
    for record, scores in zip(_run.logprobs["r"], hf.scores):
        expected = torch.log_softmax(scores[0], -1)
        assert record.logprob == pytest.approx(float(expected[record.token_id]), abs=1e-3)
        assert [t for t, _ in record.top] == torch.topk(expected, 3).indices.tolist()


def test_penalties_apply_after_guidance_as_transformers(loaded, tiny_llama):
    _, hf_model = tiny_llama
    tok = loaded.tokenizer
    ids, neg = tok.encode(PROMPTS[1]), tok.encode(NEGATIVE)
    expected = _hf(hf_model, ids, n=20, scale=2.0, negative=neg, repetition_penalty=1.3)
    assert expected != _hf(hf_model, ids, n=20, scale=2.0, negative=neg)
    g = {"scale": 2.0, "negative_prompt_ids": neg}
    assert _run(_engine(loaded), [_req("r", ids, g, max_tokens=20, repetition_penalty=1.3)])["r"] == expected


def test_rescale_is_lin_et_al_std_rescale(loaded, tiny_llama):
    """rescale phi: r = g * std(cond) / std(g), then phi * r + (1 - phi) * g on log-probabilities
    (Lin et al. 2023 eq. 15-16). A positive factor on g: greedy tokens stay those of plain guidance,
    the reported (guided) logprobs are the rescaled distribution's, computed here from HF's logits."""
    _, hf_model = tiny_llama
    tok = loaded.tokenizer
    ids, neg = tok.encode(PROMPTS[2]), tok.encode(NEGATIVE)
    g = {"scale": 3.0, "negative_prompt_ids": neg}
    guided = _hf(hf_model, ids, scale=3.0, negative=neg)
    reqs = [_req(f"phi{phi}", ids, g | {"rescale": phi}, logprobs=3) for phi in (0, 0.5, 1.0)]
    got = _run(_engine(loaded), reqs)
    assert got == {"phi0": guided, "phi0.5": guided, "phi1.0": guided}
    with torch.no_grad():
        cond = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0, -1].float(), -1)
        uncond = torch.log_softmax(hf_model(torch.tensor([neg])).logits[0, -1].float(), -1)
    plain = 3.0 * (cond - uncond) + uncond
    for phi in (0, 0.5, 1.0):
        direct = phi * plain * (cond.std() / plain.std()) + (1 - phi) * plain
        first = _run.logprobs[f"phi{phi}"][0]
        expected = torch.log_softmax(direct, -1)
        assert first.token_id == guided[0]
        assert first.logprob == pytest.approx(float(expected[guided[0]]), abs=1e-4)
        assert [t for t, _ in first.top] == expected.topk(3).indices.tolist()
    # the rescale calms the guided distribution: scale 3 sharpens it, the rescale undoes some of it
    entropy = lambda lp: float(-(lp.exp() * lp).sum())  # noqa: E731
    lps = {phi: torch.log_softmax(phi * plain * (cond.std() / plain.std()) + (1 - phi) * plain, -1) for phi in (0, 1.0)}
    assert entropy(lps[1.0]) != pytest.approx(entropy(lps[0]), rel=1e-3)
    c, u = torch.randn(50), torch.randn(50)
    torch.testing.assert_close(guide(c, u, 1.0, 1.0), torch.log_softmax(c, -1))
    torch.testing.assert_close(guide(c, u, 2.0, 0.0), guide(c, u, 2.0, None))


# ---- identity and isolation --------------------------------------------------------------
def test_scale_one_is_plain_decoding(loaded):
    tok = loaded.tokenizer
    neg = tok.encode(NEGATIVE)
    for params in ({"temperature": 0}, {"temperature": 0.9, "top_p": 0.9, "seed": 11, "logprobs": 2}):
        reqs = [_req(f"p{i}", tok.encode(p), None, **params) for i, p in enumerate(PROMPTS)]
        plain = _run(_engine(loaded), reqs)
        plain_lp = _run.logprobs
        reqs = [_req(f"p{i}", tok.encode(p), {"scale": 1, "negative_prompt_ids": neg}, **params) for i, p in enumerate(PROMPTS)]
        assert _run(_engine(loaded), reqs) == plain
        assert _run.logprobs == plain_lp
        assert _run.stats["p0"] == {"scale": 1.0, "extra_rows": 0, "extra_prompt_tokens": 0, "extra_tokens": 0}


def test_guided_beside_plain_changes_no_plain_output(loaded):
    tok = loaded.tokenizer
    sampled = {"temperature": 0.8, "seed": 5}
    plain_reqs = lambda: [_req(f"p{i}", tok.encode(p), None) for i, p in enumerate(PROMPTS)] + [  # noqa: E731
        _req(f"s{i}", tok.encode(p), None, **sampled) for i, p in enumerate(PROMPTS)
    ]
    plain = _run(_engine(loaded), plain_reqs())
    guided = [_req(f"g{i}", tok.encode(p), {"scale": 2.5}) for i, p in enumerate(PROMPTS)]
    guided += [_req("gs", tok.encode(PROMPTS[0]), {"scale": 2.5, "negative_prompt_ids": tok.encode(NEGATIVE)}, **sampled)]
    got = _run(_engine(loaded), guided + plain_reqs())
    assert {k: v for k, v in got.items() if not k.startswith("g")} == plain
    # seeded guided sampling is reproducible, alone or in a batch
    assert _run(_engine(loaded), [guided[-1]])["gs"] == got["gs"]


def test_stats(loaded):
    tok = loaded.tokenizer
    ids, neg = tok.encode(PROMPTS[0]), tok.encode(NEGATIVE)
    _run(_engine(loaded), [_req("d", ids, {}), _req("n", ids, {"scale": 2, "negative_prompt_ids": neg})])
    assert _run.stats["d"] == {"scale": 1.5, "extra_rows": 1, "extra_prompt_tokens": 1, "extra_tokens": MAX_TOKENS}
    assert _run.stats["n"] == {
        "scale": 2.0, "extra_rows": 1, "extra_prompt_tokens": len(neg), "extra_tokens": len(neg) + MAX_TOKENS - 1,
    }


def test_long_negative_prompt_caps_max_tokens(loaded):
    tok = loaded.tokenizer
    engine = Engine(loaded, EngineConfig(max_model_len=64, kv_cache_gib=0.05))
    neg = tok.encode(LONG_PROMPT)[:56]
    got = _run(engine, [_req("r", tok.encode("hi"), {"negative_prompt_ids": neg}, max_tokens=40)])
    assert len(got["r"]) == 64 - 56


@pytest.mark.parametrize(
    "bad,field",
    [
        ({"scale": 0}, "scale"),
        ({"scale": -1.5}, "scale"),
        ({"scale": 31}, "scale"),
        ({"scale": "2"}, "scale"),
        ({"scale": True}, "scale"),
        ({"scale": float("nan")}, "scale"),
        ({"rescale": 1.5}, "rescale"),
        ({"rescale": -0.1}, "rescale"),
        ({"rescale": "half"}, "rescale"),
        ({"negative_prompt_ids": [-1]}, "negative_prompt_ids"),
        ({"negative_prompt_ids": [10**6]}, "negative_prompt_ids"),
        ({"negative_prompt_ids": "text"}, "negative_prompt_ids"),
        ({"negative_prompt_ids": [1] * 600}, "negative_prompt"),
        ({"negative_prompt": "raw text"}, "negative_prompt"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_bad_options_are_refused(loaded, bad, field):
    engine = _engine(loaded)
    with pytest.raises(EngineError, match=f"guidance.{field}"):
        engine.add_request(_req("b", [1, 2, 3], bad))
    engine.check_no_leaks()


# ---- over HTTP ---------------------------------------------------------------------------


def _post(base: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(base + path, json=body, timeout=60)


def test_completions_with_negative_prompt_over_http(server):
    base, name, hf_model, worker = server
    tok = worker.engine.tokenizer
    prompt = PROMPTS[0]
    body = {"model": name, "prompt": prompt, "max_tokens": 10, "temperature": 0, "ignore_eos": True,
            "guidance": {"scale": 2, "negative_prompt": NEGATIVE}}
    r = _post(base, "/v1/completions", body)
    assert r.status_code == 200, r.text
    neg = tok.encode(NEGATIVE)
    expected = tok.decode(_hf(hf_model, tok.encode(prompt), n=10, scale=2.0, negative=neg), skip_special_tokens=True)
    assert r.json()["choices"][0]["text"] == expected
    stats = r.json()["usage"]["method_stats"]["guidance"]
    assert stats == {"scale": 2.0, "extra_rows": 1, "extra_prompt_tokens": len(neg), "extra_tokens": len(neg) + 9}
    # "" = the default unconditional prompt (the last prompt token)
    r = _post(base, "/v1/completions", body | {"guidance": {"scale": 2, "negative_prompt": ""}})
    assert r.json()["choices"][0]["text"] == tok.decode(_hf(hf_model, tok.encode(prompt), n=10, scale=2.0))
    assert r.json()["usage"]["method_stats"]["guidance"]["extra_prompt_tokens"] == 1
    # streamed, n = 2 seeded, stop strings and logprobs ride along
    chunks = []
    with httpx.stream("POST", base + "/v1/completions", json=body | {"stream": True}, timeout=60) as s:
        chunks = [line for line in s.iter_lines() if line.startswith("data: {")]
    import json

    assert "".join(json.loads(c[6:])["choices"][0]["text"] for c in chunks) == expected
    sampled = body | {"temperature": 0.9, "seed": 3, "n": 2, "logprobs": 1, "stop": [expected[4:7]]}
    a, b = _post(base, "/v1/completions", sampled).json(), _post(base, "/v1/completions", sampled).json()
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]
    assert a["usage"]["method_stats"]["guidance"]["extra_rows"] == 2


def test_chat_with_negative_messages_over_http(server):
    base, name, hf_model, worker = server
    tok = worker.engine.tokenizer
    msgs = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Say hello."}]
    neg_msgs = [{"role": "user", "content": "Say hello."}]
    body = {"model": name, "messages": msgs, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    render = lambda m: tok.encode(tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True), add_special_tokens=False)  # noqa: E731
    expected = tok.decode(_hf(hf_model, render(msgs), n=8, scale=3.0, negative=render(neg_msgs)))
    for extra in ({"negative_messages": neg_msgs, "guidance": {"scale": 3}}, {"guidance": {"scale": 3, "negative_messages": neg_msgs}}):
        r = _post(base, "/v1/chat/completions", body | extra)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == expected
        stats = r.json()["usage"]["method_stats"]["guidance"]
        assert stats["extra_rows"] == 1 and stats["extra_prompt_tokens"] == len(render(neg_msgs))
    # negative_messages alone turns guidance on with the default scale
    r = _post(base, "/v1/chat/completions", body | {"negative_messages": neg_msgs})
    assert r.status_code == 200 and r.json()["usage"]["method_stats"]["guidance"]["scale"] == 1.5


@pytest.mark.parametrize(
    "path,guidance,param",
    [
        ("/v1/completions", {"scale": 0}, None),
        ("/v1/completions", {"scale": 100}, None),
        ("/v1/completions", {"rescale": 2}, None),
        ("/v1/completions", {"temperature": 2}, None),
        ("/v1/completions", {"negative_prompt": 5}, "guidance.negative_prompt"),
        ("/v1/completions", {"negative_prompt": "a", "negative_prompt_ids": [1]}, "guidance.negative_prompt_ids"),
        ("/v1/chat/completions", {"negative_messages": [{"role": "wizard", "content": "x"}]}, "guidance.negative_messages"),
        ("/v1/chat/completions", {"negative_messages": "not a list"}, "guidance.negative_messages"),
    ],
)
def test_bad_guidance_over_http_is_400(server, path, guidance, param):
    base, name, *_ = server
    body = {"model": name, "max_tokens": 2, "guidance": guidance}
    body |= {"prompt": "x"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]}
    r = _post(base, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert "guidance" in err["message"] and err["type"] == "invalid_request_error"
    if param:
        assert err["param"] == param
    assert httpx.get(base + "/health").status_code == 200


