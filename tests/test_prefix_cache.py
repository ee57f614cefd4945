"""Automatic prefix caching: the block pool's reference counts and LRU eviction, and output that
is the same with the cache on and off, for every method, under preemption and eviction, for
requests sharing a prefix at once (n > 1), with per-tenant salting, and through the API."""

from __future__ import annotations

import random

import httpx
import pytest
import torch
from freelunch.config import EngineConfig
from freelunch.engine.block_manager import BlockManager
from freelunch.engine.engine import Engine
from freelunch.engine.request import GenerationRequest, SamplingParams, Sequence
from live_server import live_server, tiny_app

SYSTEM = (
    "You are a careful assistant for a bakery. Answer in one sentence, mention the price when asked, "
    "and never invent opening hours. The shop sells bread, cakes, coffee and tea. "
)
QUESTIONS = ["What does a cake cost?", "Do you sell tea?", "When do you open?", "Is the bread fresh?"]


# ---- the block pool ------------------------------------------------------------------------------


def _seq(tokens: list[int], key: bytes | None = b"") -> Sequence:
    seq = Sequence(list(tokens), len(tokens))
    seq.cache_key = key
    return seq


def _compute(bm: BlockManager, seq: Sequence, content: dict[int, tuple]) -> None:
    """What the engine does for a row: attach, allocate, 'compute' (write each block's tokens into
    `content`), commit, register."""
    bm.attach_prefix(seq)
    for i, block in enumerate(seq.block_table[: seq.num_computed // bm.block_size]):
        # a shared block holds exactly the tokens this row would have written
        assert content[block] == tuple(seq.token_ids[i * bm.block_size : (i + 1) * bm.block_size])
    bm.allocate(seq, seq.num_tokens)
    for i in range(seq.num_computed // bm.block_size, len(seq.block_table)):
        content[seq.block_table[i]] = tuple(seq.token_ids[i * bm.block_size : (i + 1) * bm.block_size])
    seq.num_computed = seq.num_tokens
    bm.register_committed(seq)


def test_shared_blocks_are_counted_and_never_handed_out_while_held():
    rng = random.Random(7)
    bm = BlockManager(num_blocks=40, block_size=4)
    prefixes = [[rng.randrange(100) for _ in range(rng.randint(4, 24))] for _ in range(4)]
    content: dict[int, tuple] = {}
    live: list[Sequence] = []
    for _ in range(3000):
        if live and (rng.random() < 0.45 or bm.num_free < 10):
            bm.free(live.pop(rng.randrange(len(live))))
        else:
            seq = _seq(rng.choice(prefixes) + [rng.randrange(100) for _ in range(rng.randint(1, 9))])
            _compute(bm, seq, content)
            live.append(seq)
        held = {}
        for s in live:
            for b in s.block_table:
                held.setdefault(b, []).append(s.seq_id)
        assert {b: sorted(h) for b, h in bm.lower.holders.items()} == {b: sorted(h) for b, h in held.items()}
        assert not set(held) & (set(bm.lower.free) | set(bm.lower.cached)), "a held block is free or evictable"
        assert bm.num_free + len(held) == bm.num_blocks
    stats = bm.cache_stats
    assert stats.hits > 0 and stats.evictions > 0 and stats.hits <= stats.queries
    for s in live:
        bm.free(s)
    bm.check_no_leaks()
    assert bm.num_free == bm.num_blocks and bm.cached_blocks > 0  # content kept, memory free


def test_least_recently_used_goes_first_and_the_bound_holds():
    bm = BlockManager(num_blocks=6, block_size=2, cache_blocks=2)
    content: dict[int, tuple] = {}
    a, b, c = _seq([1, 2, 3, 4, 9]), _seq([5, 6, 7, 8, 9]), _seq([1, 2, 3, 4, 8])
    for s in (a, b):
        _compute(bm, s, content)
    bm.free(a)  # a's two full blocks: cached
    bm.free(b)  # b's two: cached, a's evicted (at most 2 kept unheld)
    assert bm.cached_blocks == 2 and bm.cache_stats.evictions == 2
    assert bm.attach_prefix(c) == 0  # a's prefix is gone
    bm.free(c)
    d = _seq([5, 6, 7, 8, 1])
    assert bm.attach_prefix(d) == 4  # b's is there
    bm.free(d)
    bm.check_no_leaks()


def test_a_row_without_a_key_neither_finds_nor_leaves_blocks():
    bm = BlockManager(num_blocks=8, block_size=2)
    content: dict[int, tuple] = {}
    _compute(bm, keyed := _seq([1, 2, 3, 4, 5]), content)
    unkeyed = _seq([1, 2, 3, 4, 5], key=None)
    _compute(bm, unkeyed, content)
    assert unkeyed.num_cached is None and bm.cached_blocks == 2
    other_tenant = _seq([1, 2, 3, 4, 5], key=b"tenant-b")
    assert bm.attach_prefix(other_tenant) == 0
    for s in (keyed, unkeyed, other_tenant):
        bm.free(s)
    bm.check_no_leaks()


# ---- the engine: the same output with the cache on and off -----------------------------------------


def _engine(loaded, caching: bool = True, **kw) -> Engine:
    kw.setdefault("kv_cache_gib", 0.05)
    kw.setdefault("max_step_cost", float("inf"))
    return Engine(loaded, EngineConfig(max_model_len=512, enable_prefix_caching=caching, **kw))


def _req(rid: str, ids: list[int], methods: dict | None = None, max_tokens: int = 12, tenant: str | None = None, **params) -> GenerationRequest:
    params.setdefault("temperature", 0)
    params.setdefault("logprobs", 2)
    sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True, **params)
    return GenerationRequest(rid, list(ids), sampling, dict(methods or {}), tenant=tenant)


def _run(engine: Engine, waves: list[list[GenerationRequest]]) -> dict[str, dict]:
    """Each wave is added at once and run to the end before the next."""
    out: dict[str, dict] = {}
    for wave in waves:
        for r in wave:
            engine.add_request(r)
        while engine.has_work():
            for o in engine.step():
                got = out.setdefault(o.request_id, {"tokens": [], "logprobs": [], "cached": 0, "prompt_logprobs": None})
                got["tokens"] += o.new_token_ids
                got["logprobs"] += [lp.logprob for lp in o.logprobs or []]
                got["cached"] = o.num_cached_tokens
                got["prompt_logprobs"] = o.prompt_logprobs or got["prompt_logprobs"]
    engine.check_no_leaks()
    return out


def _same(on: dict[str, dict], off: dict[str, dict]) -> None:
    assert {r: o["tokens"] for r, o in on.items()} == {r: o["tokens"] for r, o in off.items()}
    for rid in off:
        assert torch.allclose(torch.tensor(on[rid]["logprobs"]), torch.tensor(off[rid]["logprobs"]), atol=1e-4), rid
        assert off[rid]["cached"] == 0


def _conversation(tok) -> list[list[int]]:
    return [tok.encode(SYSTEM + q) for q in QUESTIONS]


@pytest.mark.parametrize(
    "methods",
    [
        {},
        {"speculative": {"method": "token_recycling", "tree": 6}},
        {"guidance": {"scale": 1.8, "negative_prompt": "NEG"}},
        {"guidance": {"scale": 1.8}, "speculative": {"method": "token_recycling", "tree": 4}},
    ],
    ids=["plain", "token_recycling", "guidance", "guidance+token_recycling"],
)
def test_output_is_the_same_with_the_cache_on_and_off(loaded, methods):
    tok = loaded.tokenizer
    prompts = _conversation(tok)
    if "guidance" in methods and "negative_prompt" in methods["guidance"]:
        # the negative branch shares the system prompt with the conditional one
        methods = {"guidance": {"scale": 1.8, "negative_prompt_ids": tok.encode(SYSTEM + "Answer rudely.")}}

    def waves(tag):  # one alone, then the rest at once beside a plain request (a mixed batch)
        first = [_req(f"{tag}0", prompts[0], methods)]
        rest = [_req(f"{tag}{i}", p, methods) for i, p in enumerate(prompts[1:], 1)] + [_req(f"{tag}plain", prompts[0])]
        return [first, rest]

    off = _run(_engine(loaded, caching=False), waves("r"))
    on = _run(_engine(loaded), waves("r"))
    _same(on, off)
    shared = len(tok.encode(SYSTEM)) // 16 * 16
    assert on["r0"]["cached"] == 0 and all(on[f"r{i}"]["cached"] >= shared - 16 for i in (1, 2, 3))
    assert on["rplain"]["cached"] >= shared - 16


def test_negative_branch_reuses_the_conditional_branch_blocks(loaded):
    tok = loaded.tokenizer
    prompt = tok.encode(SYSTEM + QUESTIONS[0])
    guidance = {"guidance": {"scale": 1.5, "negative_prompt_ids": tok.encode(SYSTEM + "Answer rudely.")}}
    engine = _engine(loaded)
    on = _run(engine, [[_req("g", prompt, guidance)]])
    off = _run(_engine(loaded, caching=False), [[_req("g", prompt, guidance)]])
    _same(on, off)
    shared = len(tok.encode(SYSTEM)) // 16 * 16 - 16  # the BPE merge at the seam may differ
    # the conditional row computed its prompt; the unconditional one started after the shared blocks
    assert engine.blocks.cache_stats.hits >= shared


def test_preemption_and_eviction_under_a_small_cache(loaded):
    tok = loaded.tokenizer
    prompts = _conversation(tok) * 2

    def waves(*tags):
        return [[_req(f"{tag}{i}", p, max_tokens=24) for i, p in enumerate(prompts)] for tag in tags]

    off = _run(_engine(loaded, caching=False), waves("a", "b"))
    # 14 blocks of 16 tokens for 8 requests of ~50 tokens each: preemption and eviction
    tight = _engine(loaded, kv_cache_gib=14 * 16 * 768 / (1 << 30), kv_cache_dtype="float32", max_num_batched_tokens=32)
    on = _run(tight, waves("a", "b"))
    _same(on, off)
    assert tight.stats["preemptions"] > 0 and tight.blocks.cache_stats.evictions > 0
    bounded = _engine(loaded, prefix_cache_blocks=2)
    _same(_run(bounded, waves("a", "b")), off)
    assert len(bounded.blocks.lower.cached) <= 2 and bounded.blocks.cache_stats.evictions > 0


def test_requests_with_the_same_prompt_at_once_compute_it_once(loaded):
    """As `n` > 1 sends them: the first computes the prompt, the others wait and take its blocks."""
    prompt = loaded.tokenizer.encode(SYSTEM + QUESTIONS[1])
    engine = _engine(loaded)
    on = _run(engine, [[_req(f"c{i}", prompt, temperature=1.0, seed=i) for i in range(4)]])
    off = _run(_engine(loaded, caching=False), [[_req(f"c{i}", prompt, temperature=1.0, seed=i) for i in range(4)]])
    _same(on, off)
    full = (len(prompt) - 1) // 16 * 16
    assert sorted(o["cached"] for o in on.values()) == [0, full, full, full]


def test_prompt_logprobs_skip_the_cache(loaded):
    prompt = loaded.tokenizer.encode(SYSTEM + QUESTIONS[2])
    engine = _engine(loaded)
    _run(engine, [[_req("warm", prompt)]])
    echo = _run(engine, [[_req("echo", prompt, prompt_logprobs=1)]])["echo"]
    alone = _run(_engine(loaded, caching=False), [[_req("echo", prompt, prompt_logprobs=1)]])["echo"]
    assert echo["cached"] == 0 and len(echo["prompt_logprobs"]) == len(prompt)
    assert [p.logprob if p else None for p in echo["prompt_logprobs"]] == pytest.approx(
        [p.logprob if p else None for p in alone["prompt_logprobs"]], abs=1e-5
    )


def test_cancelled_requests_release_every_block(loaded):
    tok = loaded.tokenizer
    engine = _engine(loaded, max_num_batched_tokens=32)
    prompts = _conversation(tok)
    for i, p in enumerate(prompts):
        engine.add_request(_req(f"a{i}", p, {"guidance": {"scale": 1.5}} if i % 2 else None, max_tokens=30))
    for step in range(6):  # some mid-prefill (chunks of 32), some waiting for a shared prefix
        engine.step()
        if step == 1:
            engine.abort("a0")
    assert engine.blocks.lower.holders
    for i in range(1, len(prompts)):
        engine.abort(f"a{i}")
    while engine.has_work():
        engine.step()
    engine.check_no_leaks()
    assert not engine.blocks.lower.holders and engine.blocks.num_free == engine.blocks.num_blocks


def test_tenants_share_only_with_themselves_unless_configured(loaded):
    prompt = loaded.tokenizer.encode(SYSTEM + QUESTIONS[3])
    salted = _engine(loaded)
    got = _run(salted, [[_req("a", prompt, tenant="alice")], [_req("b", prompt, tenant="bob")], [_req("a2", prompt, tenant="alice")]])
    assert (got["a"]["cached"], got["b"]["cached"]) == (0, 0) and got["a2"]["cached"] > 0
    shared = _run(_engine(loaded, prefix_cache_salt="shared"), [[_req("a", prompt, tenant="alice")], [_req("b", prompt, tenant="bob")]])
    assert shared["b"]["cached"] > 0 and shared["b"]["tokens"] == got["b"]["tokens"]


# ---- methods with their own KV: SCMoE's weak routing, FastV's pruning ------------------------------------


def test_scmoe_weak_row_is_keyed_by_its_routing(tmp_path_factory):
    from test_moe import Model

    moe = Model("mixtral", tmp_path_factory.mktemp("tiny-mixtral-cached"))
    prompt = moe.ids(SYSTEM + QUESTIONS[0])
    contrast = {"moe_contrast": {"beta": 0.5, "alpha": 0.1, "weak_rank": 2}}

    def waves():  # a plain request first: its blocks must not serve the weak row
        return [[_req("plain", prompt)], [_req("c1", prompt, contrast)], [_req("c2", prompt, contrast)]]

    on_engine = moe.engine(enable_prefix_caching=True)
    on = _run(on_engine, waves())
    off = _run(moe.engine(enable_prefix_caching=False), waves())
    _same(on, off)
    full = (len(prompt) - 1) // 16 * 16
    assert on["c1"]["cached"] == full and on["c2"]["cached"] == full
    # c1's weak row computed its prompt (nothing keyed by its routing yet); c2's found it
    assert on_engine.blocks.cache_stats.hits == 3 * full


def test_fastv_pruned_rows_compute_their_prompt(tmp_path_factory):
    from test_vlm import build_tiny_llava, data_url, random_image

    folder = tmp_path_factory.mktemp("tiny-llava-cached")
    build_tiny_llava(folder)
    app, worker = tiny_app(folder)
    content = [{"type": "text", "text": SYSTEM}, {"type": "image_url", "image_url": {"url": data_url(random_image(3, (40, 31)))}}]
    with live_server(app) as base:

        def chat(**extra):
            body = {"messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 0}
            r = httpx.post(base + "/v1/chat/completions", json=body | extra, timeout=60)
            assert r.status_code == 200, r.text
            return r.json()

        plain = [chat(), chat()]
        pruned = [chat(visual_pruning={"method": "fastv", "keep": 0.5}) for _ in range(2)]
        cls = [chat(visual_pruning={"method": "cls", "keep": 0.5}) for _ in range(2)]
        content[1] = {"type": "image_url", "image_url": {"url": data_url(random_image(4, (40, 31)))}}
        other_image = chat()
    cached = lambda r: r["usage"]["prompt_tokens_details"]["cached_tokens"]  # noqa: E731
    assert cached(plain[0]) == 0 and cached(plain[1]) > 0  # the same image: the same key
    assert plain[0]["choices"] == plain[1]["choices"]
    assert [cached(r) for r in pruned] == [0, 0] and pruned[0]["choices"] == pruned[1]["choices"]
    assert cached(cls[1]) > 0 and cls[0]["choices"] == cls[1]["choices"]
    # another image: the row's key differs (nothing of the first image's KV serves it)
    assert cached(other_image) == 0


# ---- through the API ---------------------------------------------------------------------------------------


def test_usage_reports_cached_tokens_and_metrics_count_them(tiny_llama):
    folder, _ = tiny_llama
    app, _ = tiny_app(folder)
    messages = [{"role": "system", "content": SYSTEM * 2}, {"role": "user", "content": QUESTIONS[0]}]
    with live_server(app) as base:
        first = httpx.post(base + "/v1/chat/completions", json={"messages": messages, "max_tokens": 4}, timeout=60).json()
        second = httpx.post(base + "/v1/chat/completions", json={"messages": messages, "max_tokens": 4}, timeout=60).json()
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert 0 < cached < second["usage"]["prompt_tokens"] and cached % 16 == 0
        body = {"messages": messages, "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=60) as r:
            chunks = [line for line in r.iter_lines() if line.startswith("data: {")]
        assert f'"cached_tokens": {cached}' in chunks[-1]
        prompt = SYSTEM * 2 + QUESTIONS[1]
        completions = httpx.post(base + "/v1/completions", json={"prompt": [prompt, prompt], "max_tokens": 2, "n": 2}, timeout=60).json()
        length = completions["usage"]["prompt_tokens"] // 4
        per_prompt = completions["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert len(completions["choices"]) == 4 and per_prompt == 3 * ((length - 1) // 16 * 16)  # all but the first found it
        metrics = httpx.get(base + "/metrics").text
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line and not line.startswith("#")}
    assert values["freelunch_prefix_cache_hits_total"] >= 2 * cached + per_prompt
    assert values["freelunch_prefix_cache_queries_total"] > values["freelunch_prefix_cache_hits_total"]
    assert values["freelunch_prefix_cache_blocks"] > 0 and "freelunch_prefix_cache_evictions_total" in values


def test_no_prefix_caching_flag(tiny_llama):
    folder, _ = tiny_llama
    app, _ = tiny_app(folder, enable_prefix_caching=False)
    body = {"prompt": SYSTEM * 2, "max_tokens": 2}
    with live_server(app) as base:
        usages = [httpx.post(base + "/v1/completions", json=body, timeout=60).json()["usage"] for _ in range(2)]
    assert [u["prompt_tokens_details"]["cached_tokens"] for u in usages] == [0, 0]
