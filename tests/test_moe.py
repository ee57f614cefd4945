"""Sparse MoE models and SCMoE (`moe_contrast`) against transformers.

Tiny seeded float32 models of each supported MoE architecture (tiny_models.MOE_KINDS): greedy
tokens identical to transformers' `generate`; the per-row routing override ("only the expert of
router rank r, weight 1") against transformers' own modules with their routers patched; SCMoE
against a reference loop over transformers' logits under strong and weak routing.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math

import httpx
import pytest
import torch
import torch.nn.functional as F
from freelunch.config import EngineConfig
from freelunch.engine.block_manager import BlockManager
from freelunch.engine.engine import Engine, EngineError
from freelunch.engine.kv_cache import KVCache
from freelunch.engine.model_runner import ModelRunner
from freelunch.engine.request import GenerationRequest, SamplingParams, Sequence
from freelunch.engine.strategy import RowPlan
from freelunch.models.expert_routing import EXPERT_RANK, ExpertRouting, route
from freelunch.models.loader import load_model, resolve_source
from freelunch.models.moe import MoeForCausalLM
from live_server import live_server, tiny_app
from tiny_models import MOE_KINDS, TEST_DEVICE, build_tiny_model, default_tokenizer, engine_settings

PROMPTS = [
    "Hello, my name is",
    "The capital of France",
    "1, 2, 3, 4, 5, 6, 7,",
    "Once upon a time, in a land far, far away, there lived a small dragon who loved books.",
]
MAX_TOKENS = 10
LOGITS_ATOL = 1e-4


class Model:
    def __init__(self, kind: str, folder) -> None:
        self.kind = kind
        self.folder = folder
        self.hf = build_tiny_model(folder, kind, seed=3)
        self.loaded = load_model(resolve_source(str(folder)), "float32", TEST_DEVICE)
        self.tok = self.loaded.tokenizer

    def engine(self, **config) -> Engine:
        config.setdefault("kv_cache_gib", 0.02)
        config = engine_settings(config)
        return Engine(self.loaded, EngineConfig(model=str(self.folder), max_model_len=512, device=TEST_DEVICE, **config))

    def ids(self, text: str) -> list[int]:
        return self.tok.encode(text)


_MODELS: dict[str, Model] = {}


@pytest.fixture(scope="module", params=sorted(MOE_KINDS))
def model(request, tmp_path_factory) -> Model:
    kind = request.param
    if kind not in _MODELS:
        _MODELS[kind] = Model(kind, tmp_path_factory.mktemp(f"tiny-{kind}"))
    return _MODELS[kind]


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> Model:
    if "mixtral" not in _MODELS:
        _MODELS["mixtral"] = Model("mixtral", tmp_path_factory.mktemp("tiny-mixtral"))
    return _MODELS["mixtral"]


def _req(
    rid: str, ids: list[int], options: dict | None, max_tokens: int = MAX_TOKENS, **params
) -> GenerationRequest:
    params.setdefault("temperature", 0)
    params.setdefault("ignore_eos", True)
    methods = {"moe_contrast": options} if options is not None else {}
    return GenerationRequest(rid, list(ids), SamplingParams(max_tokens=max_tokens, **params), methods)


def _run(engine: Engine, requests: list[GenerationRequest]) -> dict[str, list[int]]:
    """Step until idle; tokens per request (finish reasons, stats and logprobs on the function)."""
    for r in requests:
        engine.add_request(r)
    out: dict[str, list[int]] = {}
    _run.finish, _run.stats, _run.logprobs = {}, {}, {}
    while engine.has_work():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
            _run.logprobs.setdefault(o.request_id, []).extend(o.logprobs or [])
            if o.finished:
                _run.finish[o.request_id] = o.finish_reason
                _run.stats[o.request_id] = (o.method_stats or {}).get("moe_contrast")
    engine.check_no_leaks()
    return out


# ---- transformers references ---------------------------------------------------------------------
@contextlib.contextmanager
def hf_weak_routing(hf, rank: int):
    """transformers' model with every router made "only the expert of rank `rank` (1-based), weight 1"."""

    def weak(router, hidden):
        logits = F.linear(hidden.reshape(-1, router.hidden_dim), router.weight)
        index = torch.topk(torch.softmax(logits.float(), dim=-1), rank, dim=-1).indices[:, rank - 1 :]
        return logits, torch.ones(index.shape, dtype=logits.dtype), index

    routers = [m for m in hf.modules() if type(m).__name__.endswith("TopKRouter")]
    assert routers
    for router in routers:
        router.forward = functools.partial(weak, router)
    try:
        yield
    finally:
        for router in routers:
            del router.forward


@torch.no_grad()
def hf_logits(hf, ids: list[int], rank: int = 0) -> torch.Tensor:
    """Logits [len(ids), vocab] of a full forward, routed by default (rank 0) or weakly."""
    with hf_weak_routing(hf, rank) if rank else contextlib.nullcontext():
        return hf(torch.tensor([ids])).logits[0].float()


def hf_greedy(hf, ids: list[int], n: int = MAX_TOKENS) -> list[int]:
    out = hf.generate(
        torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return out[0, len(ids) :].tolist()


def reference_scmoe(
    hf, ids: list[int], beta: float, alpha: float, weak_rank: int, n: int = MAX_TOKENS
) -> list[int]:
    """Greedy SCMoE as the paper states it (docs/moe_contrast.md), recomputing both branches from scratch each step."""
    out: list[int] = []
    for _ in range(n):
        s = torch.log_softmax(hf_logits(hf, ids + out)[-1], -1)
        w = torch.log_softmax(hf_logits(hf, ids + out, weak_rank)[-1], -1)
        d = (1 + beta) * s - beta * w
        d[s < s.max() + math.log(alpha)] = -math.inf
        out.append(int(d.argmax()))
    return out


# ---- models ------------------------------------------------------------------------------------
def test_greedy_matches_transformers(model):
    assert isinstance(model.loaded.model, MoeForCausalLM)
    expected = {f"r{i}": hf_greedy(model.hf, model.ids(p)) for i, p in enumerate(PROMPTS)}
    reqs = lambda: [_req(f"r{i}", model.ids(p), None) for i, p in enumerate(PROMPTS)]
    assert _run(model.engine(), reqs()) == expected  # one batch
    assert _run(model.engine(max_num_batched_tokens=16), reqs()) == expected  # chunked prefill beside decodes


def test_fused_expert_checkpoint_loads_the_same_weights(mixtral, tmp_path):
    """transformers saves experts one by one; its in-memory layout (3-D `experts.gate_up_proj`) loads too."""
    from safetensors.torch import save_file

    fused = {k: v.contiguous() for k, v in mixtral.hf.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in fused)
    mixtral.hf.config.save_pretrained(tmp_path)
    default_tokenizer().save_pretrained(tmp_path)
    save_file(fused, str(tmp_path / "model.safetensors"))
    ours = load_model(resolve_source(str(tmp_path)), "float32").model
    for (name, a), (_, b) in zip(ours.state_dict().items(), mixtral.loaded.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_routing_override_per_row_matches_transformers(model):
    """Rows routed by default, by rank 1, 2 and the last rank share a prefill and a decode step."""
    m = model.loaded.model
    cfg = m.config
    ranks = [0, 1, 2, cfg.moe.num_experts]
    prompts = [model.ids(p) for p in PROMPTS]
    kv = KVCache(cfg.num_layers, 512, cfg.num_kv_heads, cfg.head_dim, torch.float32, torch.device("cpu"))
    blocks = BlockManager(32, 16)
    runner = ModelRunner(m, kv, blocks, torch.device("cpu"))
    seqs = [Sequence(list(ids), len(ids)) for ids in prompts]
    for seq in seqs:
        blocks.allocate(seq, seq.num_tokens + 1)
    prefill = runner.run(
        [
            RowPlan(s, list(s.token_ids), list(range(s.num_tokens)), extras={EXPERT_RANK: r})
            for s, r in zip(seqs, ranks)
        ]
    )
    for seq, ids, rank in zip(seqs, prompts, ranks):
        torch.testing.assert_close(
            prefill[seq.seq_id], hf_logits(model.hf, ids, rank), atol=LOGITS_ATOL, rtol=0
        )
        seq.num_computed = seq.num_tokens
        seq.token_ids.append(int(prefill[seq.seq_id][-1].argmax()))
    decode = runner.run(
        [RowPlan(s, s.token_ids[-1:], [0], extras={EXPERT_RANK: r}) for s, r in zip(seqs, ranks)]
    )
    for seq, rank in zip(seqs, ranks):
        expected = hf_logits(model.hf, seq.token_ids, rank)[-1:]
        torch.testing.assert_close(decode[seq.seq_id], expected, atol=LOGITS_ATOL, rtol=0)
    # the override does change the model (else the test above proves little)
    assert not torch.allclose(prefill[seqs[0].seq_id], hf_logits(model.hf, prompts[0], 2), atol=1e-2)


def test_route_override_and_prune_selection():
    logits = torch.tensor([[0.1, 2.0, 1.0, -1.0], [3.0, 0.0, 1.0, 2.0], [0.0, 0.5, 1.0, 1.5]])
    experts, weights = route(logits, 2, True)
    assert experts.tolist() == [[1, 2], [0, 3], [3, 2]]
    torch.testing.assert_close(weights.sum(-1), torch.ones(3))
    routing = ExpertRouting.from_rows([(0, 0, 1), (3, 0, 1), (1, 0, 1)], torch.device("cpu"))
    experts, weights = route(logits, 2, False, routing)
    assert experts.tolist() == [[1, 2], [2, -1], [3, -1]]
    assert weights[1:].tolist() == [[1.0, 0.0], [1.0, 0.0]]
    assert routing.select(torch.tensor([1])).rank.tolist() == [3]
    assert ExpertRouting.from_rows([(0, 0, 5)], torch.device("cpu")) is None
    # own top-k per token: 3 experts, 1 expert, the model's 2; renormalised over each token's own
    routing = ExpertRouting.from_rows([(0, 3, 1), (0, 1, 1), (0, 0, 1)], torch.device("cpu"))
    experts, weights = route(logits, 2, True, routing)
    assert experts.tolist() == [[1, 2, 0], [0, -1, -1], [3, 2, -1]]
    torch.testing.assert_close(weights.sum(-1), torch.ones(3))
    torch.testing.assert_close(weights[0], route(logits[:1], 3, True)[1][0])


@contextlib.contextmanager
def hf_top_k(hf, k: int):
    """transformers' model with every router's top-k set to `k`."""
    routers = [m for m in hf.modules() if type(m).__name__.endswith("TopKRouter")]
    assert routers and all(hasattr(r, "top_k") for r in routers)
    saved = [r.top_k for r in routers]
    for r in routers:
        r.top_k = k
    try:
        yield
    finally:
        for r, old in zip(routers, saved):
            r.top_k = old


# ---- SCMoE -------------------------------------------------------------------------------------
def test_strong_top_k_matches_transformers_with_that_top_k(mixtral):
    """A row with its own top-k (3 of 8 experts) beside rows with the model's top-2, in one batch."""
    with hf_top_k(mixtral.hf, 3):
        top3 = {f"k{i}": hf_greedy(mixtral.hf, mixtral.ids(p)) for i, p in enumerate(PROMPTS)}
        s_ref = reference_scmoe(mixtral.hf, mixtral.ids(PROMPTS[0]), 0.0, 0.1, 2)
    assert top3["k0"] == s_ref
    plain = {f"p{i}": hf_greedy(mixtral.hf, mixtral.ids(p)) for i, p in enumerate(PROMPTS)}
    assert plain != {k.replace("k", "p"): v for k, v in top3.items()}, "top-3 should change some output"
    reqs = [_req(f"k{i}", mixtral.ids(p), {"beta": 0, "strong_top_k": 3}) for i, p in enumerate(PROMPTS)]
    reqs += [_req(f"p{i}", mixtral.ids(p), None) for i, p in enumerate(PROMPTS)]
    assert _run(mixtral.engine(), reqs) == top3 | plain
    assert _run.stats["k0"]["strong_top_k"] == 3


def test_scmoe_with_strong_top_k_matches_reference(mixtral):
    ids = mixtral.ids(PROMPTS[1])
    out: list[int] = []
    for _ in range(MAX_TOKENS):  # the reference, with the strong branch at top-3
        with hf_top_k(mixtral.hf, 3):
            s = torch.log_softmax(hf_logits(mixtral.hf, ids + out)[-1], -1)
        w = torch.log_softmax(hf_logits(mixtral.hf, ids + out, 2)[-1], -1)
        d = 1.5 * s - 0.5 * w
        d[s < s.max() + math.log(0.1)] = -math.inf
        out.append(int(d.argmax()))
    got = _run(mixtral.engine(), [_req("c", ids, {"beta": 0.5, "strong_top_k": 3})])
    assert got["c"] == out
@pytest.mark.parametrize("beta,weak_rank", [(0.5, 2), (1.0, 3)])
def test_scmoe_greedy_matches_reference(model, beta, weak_rank):
    options = {"beta": beta, "alpha": 0.1, "weak_rank": weak_rank}
    prompts = PROMPTS[:3]
    expected = {
        f"c{i}": reference_scmoe(model.hf, model.ids(p), beta, 0.1, weak_rank) for i, p in enumerate(prompts)
    }
    plain = {"plain": hf_greedy(model.hf, model.ids(PROMPTS[3]))}
    reqs = lambda: (
        [_req(f"c{i}", model.ids(p), options) for i, p in enumerate(prompts)]
        + [_req("plain", model.ids(PROMPTS[3]), None)]
    )
    assert _run(model.engine(), reqs()) == expected | plain
    assert _run(model.engine(max_num_batched_tokens=16), reqs()) == expected | plain  # rows prefill apart
    # the contrast changes the output of this model (the test would be vacuous otherwise)
    assert any(expected[f"c{i}"] != hf_greedy(model.hf, model.ids(p)) for i, p in enumerate(prompts))


def test_beta_zero_is_plain_decoding(mixtral):
    for params in ({"temperature": 0}, {"temperature": 0.9, "top_p": 0.9, "seed": 11, "logprobs": 2}):
        plain = _run(
            mixtral.engine(), [_req(f"p{i}", mixtral.ids(p), None, **params) for i, p in enumerate(PROMPTS)]
        )
        plain_logprobs = _run.logprobs
        zero = [
            _req(f"p{i}", mixtral.ids(p), {"beta": 0, "weak_rank": 3}, **params)
            for i, p in enumerate(PROMPTS)
        ]
        assert _run(mixtral.engine(), zero) == plain
        assert _run.logprobs == plain_logprobs
        assert _run.stats["p0"] == {
            "beta": 0.0,
            "alpha": 0.1,
            "weak_rank": 3,
            "extra_rows": 0,
            "extra_prompt_tokens": 0,
            "extra_tokens": 0,
        }


def test_scmoe_beside_plain_changes_no_plain_output(mixtral):
    sampled = {"temperature": 0.8, "seed": 5}
    plain_reqs = lambda: (
        [_req(f"p{i}", mixtral.ids(p), None) for i, p in enumerate(PROMPTS)]
        + [_req(f"s{i}", mixtral.ids(p), None, **sampled) for i, p in enumerate(PROMPTS)]
    )
    plain = _run(mixtral.engine(), plain_reqs())
    contrasted = [_req(f"c{i}", mixtral.ids(p), {}) for i, p in enumerate(PROMPTS)]
    contrasted.append(_req("cs", mixtral.ids(PROMPTS[0]), {"beta": 1.0}, **sampled))
    got = _run(mixtral.engine(), contrasted + plain_reqs())
    assert {k: v for k, v in got.items() if not k.startswith("c")} == plain
    # seeded SCMoE sampling is reproducible, alone or in a batch
    assert _run(mixtral.engine(), [contrasted[-1]])["cs"] == got["cs"]


def test_stats_and_eos_not_blocked(mixtral):
    ids = mixtral.ids(PROMPTS[1])
    tokens = _run(mixtral.engine(), [_req("c", ids, {})])["c"]
    assert _run.stats["c"] == {
        "beta": 0.5,
        "alpha": 0.1,
        "weak_rank": 2,
        "extra_rows": 1,
        "extra_prompt_tokens": len(ids),
        "extra_tokens": len(ids) + MAX_TOKENS - 1,
    }
    # the method never blocks an end token: a request whose stop token SCMoE picks ends there
    stop_at = tokens[3]
    first = tokens.index(stop_at)
    got = _run(mixtral.engine(), [_req("c", ids, {}, ignore_eos=False, stop_token_ids=[stop_at])])["c"]
    assert got == tokens[: first + 1] and _run.finish["c"] == "stop"


@pytest.mark.parametrize(
    "bad,field",
    [
        ({"beta": -0.1}, "beta"),
        ({"beta": 11}, "beta"),
        ({"beta": "0.5"}, "beta"),
        ({"beta": float("nan")}, "beta"),
        ({"alpha": 1.5}, "alpha"),
        ({"alpha": -0.1}, "alpha"),
        ({"alpha": None}, "alpha"),
        ({"weak_rank": 0}, "weak_rank"),
        ({"weak_rank": 9}, "weak_rank"),  # the tiny Mixtral has 8 experts
        ({"weak_rank": 2.0}, "weak_rank"),
        ({"weak_rank": True}, "weak_rank"),
        ({"strong_top_k": 0}, "strong_top_k"),
        ({"strong_top_k": 9}, "strong_top_k"),
        ({"strong_top_k": "3"}, "strong_top_k"),
        ({"temperature": 1}, "temperature"),
    ],
)
def test_bad_options_are_refused(mixtral, bad, field):
    engine = mixtral.engine()
    with pytest.raises(EngineError, match=f"moe_contrast.{field}"):
        engine.add_request(_req("b", [1, 2, 3], bad))
    engine.check_no_leaks()


def test_refused_on_a_dense_model_or_without_an_object(tiny_llama, mixtral):
    folder, _ = tiny_llama
    engine = Engine(load_model(resolve_source(str(folder)), "float32"), EngineConfig(kv_cache_gib=0.01))
    with pytest.raises(EngineError, match="needs a Mixture-of-Experts model"):
        engine.add_request(_req("b", [1, 2, 3], {}))
    with pytest.raises(EngineError, match="moe_contrast: Input should be a valid dictionary"):
        mixtral.engine().add_request(_req("b", [1, 2, 3], [0.5]))


# ---- over HTTP ---------------------------------------------------------------------------------
def test_completions_over_http(mixtral):
    app, _ = tiny_app(mixtral.folder)
    prompt = PROMPTS[2]
    body = {
        "model": mixtral.folder.name,
        "prompt": prompt,
        "max_tokens": 8,
        "temperature": 0,
        "ignore_eos": True,
        "moe_contrast": {"beta": 1.0, "weak_rank": 3},
    }
    expected = mixtral.tok.decode(reference_scmoe(mixtral.hf, mixtral.ids(prompt), 1.0, 0.1, 3, n=8))
    with live_server(app) as base:
        r = httpx.post(base + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected
        stats = r.json()["usage"]["method_stats"]["moe_contrast"]
        assert stats["extra_rows"] == 1 and stats["weak_rank"] == 3
        with httpx.stream("POST", base + "/v1/completions", json=body | {"stream": True}, timeout=60) as s:
            chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == expected
        sampled = body | {"temperature": 0.9, "seed": 3, "n": 2, "stop": [expected[3:6]]}
        a, b = (httpx.post(base + "/v1/completions", json=sampled, timeout=60).json() for _ in range(2))
        assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]
        assert a["usage"]["method_stats"]["moe_contrast"]["extra_rows"] == 2
        bad = httpx.post(
            base + "/v1/completions", json=body | {"moe_contrast": {"weak_rank": 99}}, timeout=60
        )
        assert bad.status_code == 400 and "moe_contrast.weak_rank" in bad.json()["error"]["message"]
