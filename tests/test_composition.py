"""Methods compose in one request, exactly: Token Recycling over guidance or SCMoE equals the
method's own greedy decoding token for token; guidance over SCMoE equals the formula computed
from transformers' logits; pruning composes with drafting and guidance; server defaults compose
with a request's options; and a method defined here alone plugs in through one spec."""

from __future__ import annotations

import math

import httpx
import pytest
import torch
from freelunch.config import EngineConfig
from freelunch.engine import plugins
from freelunch.engine.engine import Engine
from freelunch.engine.request import GenerationRequest, SamplingParams
from freelunch.methods import METHODS
from freelunch.methods.pipeline import Stage, Variant
from freelunch.methods.spec import MethodOptions, MethodSpec
from live_server import live_server, tiny_app
from pydantic import Field
from test_moe import Model, hf_logits

PROMPTS = [
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "1, 2, 3, 4, 5, 6, 7,",
    "Translate to French: I like cheese.",
]
NEGATIVE = "A very sad story about rain"


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> Model:
    return Model("mixtral", tmp_path_factory.mktemp("tiny-mixtral-composed"))


def _engine(loaded, **kw) -> Engine:
    kw.setdefault("kv_cache_gib", 0.05)
    kw.setdefault("max_step_cost", float("inf"))
    return Engine(loaded, EngineConfig(max_model_len=512, **kw))


def _run(engine: Engine, requests: list[GenerationRequest]) -> dict[str, list[int]]:
    for r in requests:
        engine.add_request(r)
    out: dict[str, list[int]] = {}
    _run.stats = {}
    while engine.has_work():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finished:
                _run.stats[o.request_id] = o.method_stats or {}
    engine.check_no_leaks()
    return out


def _req(rid: str, ids: list[int], methods: dict, max_tokens: int = 24, **params) -> GenerationRequest:
    params.setdefault("temperature", 0)
    return GenerationRequest(rid, list(ids), SamplingParams(max_tokens=max_tokens, ignore_eos=True, **params), methods)


TR = {"method": "token_recycling"}


# ---- Token Recycling over a combined distribution ---------------------------------------------


@pytest.mark.parametrize("tree", [None, 5, "2.2.2"])
def test_token_recycling_over_guidance_equals_guidance(loaded, tree):
    tok = loaded.tokenizer
    guidance = {"scale": 2.0, "negative_prompt_ids": tok.encode(NEGATIVE)}
    spec = TR | ({"tree": tree} if tree else {})
    ids = [tok.encode(p) for p in PROMPTS]
    alone = _run(_engine(loaded), [_req(f"r{i}", p, {"guidance": guidance}) for i, p in enumerate(ids)])
    plain = _run(_engine(loaded), [_req(f"r{i}", p, {}) for i, p in enumerate(ids)])
    assert alone != plain, "guidance must change these outputs (the test would be vacuous otherwise)"
    # drafted on both rows, in one batch with a plain request
    mixed = [_req(f"r{i}", p, {"guidance": guidance, "speculative": spec}) for i, p in enumerate(ids)]
    got = _run(_engine(loaded), [*mixed, _req("plain", ids[0], {})])
    assert {k: v for k, v in got.items() if k != "plain"} == alone and got["plain"] == plain["r0"]
    stats = _run.stats["r0"]
    assert stats["speculative"]["steps"] > 0 and stats["guidance"]["extra_rows"] == 1
    assert sum(s["speculative"]["accepted_tokens"] for r, s in _run.stats.items() if r != "plain") > 0


def test_token_recycling_over_guidance_under_preemption_and_chunking(loaded):
    tok = loaded.tokenizer
    guidance = {"scale": 1.5}
    ids = [tok.encode(p) for p in PROMPTS]
    alone = _run(_engine(loaded), [_req(f"r{i}", p, {"guidance": guidance}, max_tokens=40) for i, p in enumerate(ids)])
    # 8 blocks of 16 tokens for 3 requests of 2 rows each: preemption, and 16-token prefill chunks
    tight = _engine(loaded, kv_cache_gib=8 * 16 * 768 / (1 << 30), kv_cache_dtype="float32", max_num_batched_tokens=16)
    got = _run(tight, [_req(f"r{i}", p, {"guidance": guidance, "speculative": TR}, max_tokens=40) for i, p in enumerate(ids)])
    assert got == alone
    assert tight.stats["preemptions"] > 0


def test_token_recycling_over_scmoe_equals_scmoe(moe):
    contrast = {"beta": 0.5, "alpha": 0.1, "weak_rank": 2}
    ids = [moe.ids(p) for p in PROMPTS]
    alone = _run(moe.engine(max_step_cost=float("inf")), [_req(f"r{i}", p, {"moe_contrast": contrast}) for i, p in enumerate(ids)])
    got = _run(
        moe.engine(max_step_cost=float("inf")),
        [_req(f"r{i}", p, {"moe_contrast": contrast, "speculative": TR | {"tree": 6}}) for i, p in enumerate(ids)],
    )
    assert got == alone
    assert _run.stats["r0"]["speculative"]["steps"] > 0 and _run.stats["r0"]["moe_contrast"]["extra_rows"] == 1


# ---- guidance over SCMoE: four rows ---------------------------------------------------------------


def guided_contrast(hf, cond: list[int], uncond: list[int], out: list[int], beta: float, alpha: float, scale: float, rank: int):
    """The composition of docs/composition.md, from transformers' full forwards: contrast inside, guidance
    outside, the plausibility mask from the conditional strong row applied last."""
    cs = torch.log_softmax(hf_logits(hf, cond + out)[-1], -1)
    cw = torch.log_softmax(hf_logits(hf, cond + out, rank)[-1], -1)
    us = torch.log_softmax(hf_logits(hf, uncond + out)[-1], -1)
    uw = torch.log_softmax(hf_logits(hf, uncond + out, rank)[-1], -1)
    c = (1 + beta) * cs - beta * cw
    u = (1 + beta) * us - beta * uw
    g = torch.log_softmax(u, -1) + scale * (torch.log_softmax(c, -1) - torch.log_softmax(u, -1))
    return g.masked_fill(cs < cs.max() + math.log(alpha), -math.inf)


def test_guidance_over_scmoe_is_the_formula(moe):
    beta, alpha, scale, rank = 0.5, 0.1, 2.0, 2
    negative = moe.ids(NEGATIVE)
    methods = {"guidance": {"scale": scale, "negative_prompt_ids": negative}, "moe_contrast": {"beta": beta, "alpha": alpha, "weak_rank": rank}}
    for i, text in enumerate(PROMPTS[:2]):
        ids = moe.ids(text)
        expected: list[int] = []
        for _ in range(8):
            g = guided_contrast(moe.hf, ids, negative, expected, beta, alpha, scale, rank)
            assert not torch.isnan(g).any()
            expected.append(int(g.argmax()))
        got = _run(moe.engine(), [_req("r", ids, methods, max_tokens=8)])["r"]
        assert got == expected, text
        stats = _run.stats["r"]
        assert stats["guidance"]["extra_rows"] == 2 and stats["moe_contrast"]["extra_rows"] == 2
    # ... and with Token Recycling on top, the same tokens
    ids = moe.ids(PROMPTS[0])
    alone = _run(moe.engine(), [_req("r", ids, methods, max_tokens=12)])["r"]
    drafted = _run(moe.engine(max_step_cost=float("inf")), [_req("r", ids, methods | {"speculative": TR}, max_tokens=12)])
    assert drafted["r"] == alone and _run.stats["r"]["speculative"]["steps"] > 0


def test_a_masked_token_stays_masked_through_guidance(moe):
    """With the plausibility mask applied last, a token implausible in the conditional strong row
    is never picked, whatever guidance does; no NaN enters."""
    from freelunch.methods.pipeline import Pipeline

    ids = moe.ids(PROMPTS[2])
    req = _req("r", ids, {"guidance": {"scale": 3.0}, "moe_contrast": {"beta": 1.0, "alpha": 0.5}})
    engine = moe.engine()
    engine.add_request(req)
    pipeline = engine.requests["r"].strategy
    assert isinstance(pipeline, Pipeline) and len(pipeline.rows) == 4
    rows = [torch.randn(moe.loaded.model.config.vocab_size) for _ in range(4)]
    combined = pipeline.combined(rows)
    cs = torch.log_softmax(rows[0], -1)
    masked = cs < cs.max() + math.log(0.5)
    assert torch.isinf(combined[masked]).all() and torch.isfinite(combined[~masked]).all()
    engine.abort("r")
    engine.step()


# ---- pruning with the others ------------------------------------------------------------------


def test_fastv_with_token_recycling_and_guidance_over_the_api(tmp_path_factory):
    """FastV prunes the main row; drafting on its pruned, split cache gives FastV's own output;
    guidance on top keeps the same image tokens."""
    from test_vlm import build_tiny_llava, data_url, random_image

    folder = tmp_path_factory.mktemp("tiny-llava-composed")
    build_tiny_llava(folder)
    app, _ = tiny_app(folder, max_step_cost=float("inf"))
    content = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": data_url(random_image(5, (40, 31)))}}]
    fastv = {"method": "fastv", "keep": 0.5}
    with live_server(app) as base:
        def chat(**extra):
            body = {"messages": [{"role": "user", "content": content}], "max_tokens": 16, "temperature": 0, "ignore_eos": True}
            r = httpx.post(base + "/v1/chat/completions", json=body | extra, timeout=60)
            assert r.status_code == 200, r.text
            return r.json()

        alone = chat(visual_pruning=fastv)
        drafted = chat(visual_pruning=fastv, speculative=TR | {"tree": 4})
        assert drafted["choices"][0]["message"]["content"] == alone["choices"][0]["message"]["content"]
        stats = drafted["usage"]["method_stats"]
        assert stats["speculative"]["steps"] > 0 and stats["visual_pruning"]["kept_image_tokens"] < stats["visual_pruning"]["image_tokens"]
        guided = chat(visual_pruning=fastv, guidance={"scale": 2.0})["usage"]["method_stats"]
        assert guided["visual_pruning"]["kept_image_tokens"] == alone["usage"]["method_stats"]["visual_pruning"]["kept_image_tokens"]
        assert guided["guidance"]["extra_rows"] == 1


# ---- server defaults compose --------------------------------------------------------------------


def test_a_server_default_composes_with_the_request_own_option(tiny_llama):
    folder, _ = tiny_llama
    app, _ = tiny_app(folder, default_methods={"speculative": {"method": "token_recycling"}}, max_step_cost=float("inf"))
    with live_server(app) as base:
        body = {"prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0, "ignore_eos": True}
        both = httpx.post(base + "/v1/completions", json=body | {"guidance": {"scale": 2.0}}).json()
        assert set(both["usage"]["method_stats"]) == {"speculative", "guidance"}
        off = httpx.post(base + "/v1/completions", json=body | {"guidance": {"scale": 2.0}, "speculative": {"method": "none"}}).json()
        assert set(off["usage"]["method_stats"]) == {"guidance"}
        assert both["choices"][0]["text"] == off["choices"][0]["text"]  # drafting changes no token


# ---- a method defined here alone ---------------------------------------------------------------


class DoubleOptions(MethodOptions):
    weight: float = Field(0.5, ge=0, le=1)


class BlendWithPrompt(Stage):
    """A test method: a shadow row with another prompt, blended into the main row's logits."""

    option = "blend"
    order = 2
    expands = True

    def __init__(self, request, main, info) -> None:
        self.weight = DoubleOptions.model_validate(request.methods["blend"]).weight
        self._variants = [Variant(), Variant(prompt=[1, 2, 3])]

    def variants(self):
        return self._variants

    def combine(self, logits):
        return (1 - self.weight) * torch.log_softmax(logits[0], -1) + self.weight * torch.log_softmax(logits[1], -1), None

    def stats(self):
        return {"weight": self.weight}


def test_a_method_defined_in_one_spec_works_through_the_api(tiny_llama, monkeypatch):
    """The interface is narrow: one spec, registered, and the API serves the option (validated by
    its model, in /openapi.json), the engine runs it, composed with another method."""
    spec = MethodSpec("blend", DoubleOptions, "a test method", BlendWithPrompt, stages=("row_expansion", "combination"))
    monkeypatch.setitem(METHODS, "blend", spec)
    monkeypatch.setitem(plugins.STRATEGIES, "blend", spec)
    folder, _ = tiny_llama
    app, _ = tiny_app(folder, max_step_cost=float("inf"))
    with live_server(app) as base:
        assert "blend" in httpx.get(base + "/openapi.json").text
        body = {"prompt": PROMPTS[1], "max_tokens": 10, "temperature": 0, "ignore_eos": True}
        bad = httpx.post(base + "/v1/completions", json=body | {"blend": {"weight": 2}})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "blend.weight"
        blended = httpx.post(base + "/v1/completions", json=body | {"blend": {"weight": 0.5}}).json()
        plain = httpx.post(base + "/v1/completions", json=body).json()
        assert blended["usage"]["method_stats"]["blend"] == {"weight": 0.5, "extra_rows": 1, "extra_prompt_tokens": 3, "extra_tokens": blended["usage"]["method_stats"]["blend"]["extra_tokens"]}
        assert blended["choices"][0]["text"] != plain["choices"][0]["text"]
        drafted = httpx.post(base + "/v1/completions", json=body | {"blend": {"weight": 0.5}, "speculative": TR}).json()
        assert drafted["choices"][0]["text"] == blended["choices"][0]["text"]
