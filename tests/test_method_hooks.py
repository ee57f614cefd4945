"""The method interface (engine/strategy.py) driven by test-only strategies.

Each shape a decoding method needs is exercised end to end through the real engine and
checked against an independent computation:
- extra rows: a shadow sequence with its own prompt and KV cache;
- draft and verify: a token tree with a custom mask, `commit_kv` compaction, several tokens per step;
- prefill transform: tokens dropped before a layer (`drop_layer` / `keep_offsets`).
Strategies are registered (a `MethodSpec` in `freelunch.methods.METHODS`) only for the test that uses them.
"""

from __future__ import annotations

import pytest
import torch
from freelunch.config import EngineConfig
from freelunch.engine.engine import Engine, EngineError
from freelunch.engine.kv_cache import KVCache, kv_cache_dtype
from freelunch.engine.request import GenerationRequest, SamplingParams, Sequence
from freelunch.engine.strategy import DecodingStrategy, RowPlan, Sampled
from freelunch.engine import plugins
from freelunch.methods import METHODS
from freelunch.methods.spec import MethodOptions, MethodSpec
from pydantic import ConfigDict
from freelunch.models.loader import load_model, resolve_source

PROMPT_A = "Once upon a time, in a land far, far away, there lived a small dragon"
PROMPT_B = "The capital of France is a city where"


# ---- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tiny_llama):
    folder, hf = tiny_llama
    loaded = load_model(resolve_source(str(folder)), "float32")
    return folder, hf, loaded


@pytest.fixture(autouse=True)
def _registry_is_restored():
    before, engine_before = dict(METHODS), dict(plugins.STRATEGIES)
    yield
    assert METHODS == before and plugins.STRATEGIES == engine_before, "a test left a strategy registered"


class AnyOptions(MethodOptions):
    """A test method's options: whatever the test passes."""

    model_config = ConfigDict(extra="allow")


def _register(monkeypatch, option, factory):
    spec = MethodSpec(option, AnyOptions, "a test method", factory)
    monkeypatch.setitem(METHODS, option, spec)
    monkeypatch.setitem(plugins.STRATEGIES, option, spec)


def make_engine(setup, kv_blocks=None, **config) -> Engine:
    folder, _, loaded = setup
    if kv_blocks is not None:
        cfg = loaded.model.config
        stored = kv_cache_dtype(config.get("kv_cache_dtype", "auto"), torch.float32, torch.device("cpu"))
        per_token = KVCache.bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, stored)
        config["kv_cache_gib"] = kv_blocks * 16 * per_token / (1 << 30)
    config.setdefault("kv_cache_gib", 0.02)
    return Engine(loaded, EngineConfig(model=str(folder), **config))


def ids_of(setup, text):
    return setup[2].tokenizer(text)["input_ids"]


def request(rid, ids, n, methods=None, **params):
    params.setdefault("ignore_eos", True)
    params.setdefault("temperature", 0.0)
    return GenerationRequest(rid, list(ids), SamplingParams(max_tokens=n, **params), methods=methods or {})


def run(engine, requests, joins=None):
    """Step until idle; returns {request_id: (tokens, finish_reason, method_stats)}."""
    joins = dict(joins or {})
    for r in requests:
        engine.add_request(r)
    tokens, finish, stats = {}, {}, {}
    step = 0
    while engine.has_work() or joins:
        for r in joins.pop(step, []):
            engine.add_request(r)
        assert step < 2000
        for o in engine.step():
            tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finished:
                finish[o.request_id] = o.finish_reason
                stats[o.request_id] = o.method_stats
        step += 1
    return {k: (tokens.get(k, []), finish.get(k), stats.get(k)) for k in finish}


def hf_greedy(hf, ids, n):
    out = hf.generate(
        torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    return out[0, len(ids) :].tolist()


# ---- (a) extra rows: a shadow sequence ------------------------------------------------------------


class ShadowStrategy(DecodingStrategy):
    """Carries a second row with its own prompt; samples from the shadow's logits, or the mean of both."""

    name = "test_shadow"

    def __init__(self, request, main, info, prompt, mode):
        super().__init__(request, main)
        self.shadow = Sequence(list(prompt), len(prompt))
        self.rows.append(self.shadow)
        self.mode = mode
        self.last: dict[int, torch.Tensor] = {}
        self.decisions = 0

    def on_logits(self, logits, ctx):
        for seq in self.rows:
            if seq.seq_id in logits:
                self.last[seq.seq_id] = logits[seq.seq_id][-1]
        if any(seq.pending > 0 for seq in self.rows):
            return None  # a row is still prefilling
        main, shadow = self.last[self.main.seq_id], self.last[self.shadow.seq_id]
        self.decisions += 1
        if self.mode == "shadow":
            return shadow
        if self.mode == "main":
            return main
        return (main + shadow) / 2

    def stats(self):
        return {"decisions": self.decisions}


def _register_shadow(monkeypatch):
    def factory(req, main, info):
        opts = req.methods["test_shadow"]
        return ShadowStrategy(req, main, info, opts["prompt"], opts["mode"])

    _register(monkeypatch, "test_shadow", factory)


@pytest.mark.parametrize("chunk", [1024, 16])
def test_shadow_row_logits_decode_the_shadow_prompt(setup, monkeypatch, chunk):
    _register_shadow(monkeypatch)
    hf = setup[1]
    a, b = ids_of(setup, PROMPT_A), ids_of(setup, PROMPT_B)
    assert len(a) != len(b)
    ref_a, ref_b = hf_greedy(hf, a, 16), hf_greedy(hf, b, 16)
    assert ref_a != ref_b
    engine = make_engine(setup, max_num_batched_tokens=chunk)
    shadow = request("shadow", a, 16, {"test_shadow": {"prompt": b, "mode": "shadow"}})
    main_only = request("main", a, 16, {"test_shadow": {"prompt": b, "mode": "main"}})
    plain = request("plain", b, 12)
    res = run(engine, [shadow], joins={1: [plain], 3: [main_only]})
    # the main row's prompt is A, yet every token came from the shadow row: greedy decoding of B
    assert res["shadow"][0] == ref_b
    assert res["shadow"][1] == "length"
    assert res["shadow"][2] == {"test_shadow": {"decisions": 16}}  # method stats reach the final output
    # the main row, decoded beside its shadow, is plain decoding of A
    assert res["main"][0] == ref_a
    assert res["plain"][0] == ref_b[:12]
    assert res["plain"][2] is None
    engine.check_no_leaks()


def test_identical_shadow_averaged_equals_plain(setup, monkeypatch):
    _register_shadow(monkeypatch)
    a = ids_of(setup, PROMPT_A)
    engine = make_engine(setup)
    res = run(engine, [request("avg", a, 20, {"test_shadow": {"prompt": a, "mode": "avg"}})])
    assert res["avg"][0] == hf_greedy(setup[1], a, 20)
    engine.check_no_leaks()


def test_averaged_shadow_matches_manual_two_prompt_decoding(setup, monkeypatch):
    """Mean of two rows' logits each step (a CFG-like method) against transformers with two caches."""
    _register_shadow(monkeypatch)
    hf = setup[1]
    a, b = ids_of(setup, PROMPT_A), ids_of(setup, PROMPT_B)
    n = 14
    with torch.no_grad():
        out_a = hf(torch.tensor([a]), use_cache=True)
        out_b = hf(torch.tensor([b]), use_cache=True)
        ref = []
        for _ in range(n):
            tok = int(torch.argmax((out_a.logits[0, -1] + out_b.logits[0, -1]) / 2))
            ref.append(tok)
            out_a = hf(torch.tensor([[tok]]), past_key_values=out_a.past_key_values, use_cache=True)
            out_b = hf(torch.tensor([[tok]]), past_key_values=out_b.past_key_values, use_cache=True)
    assert ref != hf_greedy(hf, a, n) and ref != hf_greedy(hf, b, n)
    # under a tiny KV budget beside a plain request, so the two-row request is preempted too
    engine = make_engine(setup, kv_blocks=6, max_num_batched_tokens=16)
    other = request("other", ids_of(setup, PROMPT_B + " and " + PROMPT_A), 30)
    res = run(
        engine, [other], joins={2: [request("avg", a, n, {"test_shadow": {"prompt": b, "mode": "avg"}})]}
    )
    assert engine.stats["preemptions"] > 0
    assert res["avg"][0] == ref
    assert res["other"][0] == hf_greedy(hf, other.prompt_token_ids, 30)
    engine.check_no_leaks()


def test_shadow_rows_count_against_admission(setup, monkeypatch):
    _register_shadow(monkeypatch)
    a = ids_of(setup, PROMPT_A)
    engine = make_engine(setup, kv_blocks=2)  # 32 slots: the prompt fits once, not twice
    assert len(a) + 1 <= 32 < 2 * (len(a) + 1)
    with pytest.raises(EngineError):
        engine.add_request(request("x", a, 4, {"test_shadow": {"prompt": a, "mode": "avg"}}))
    engine.check_no_leaks()


def test_unregistered_method_is_rejected(setup):
    engine = make_engine(setup)
    with pytest.raises(EngineError):
        engine.add_request(request("x", [1, 2, 3], 4, {"test_shadow": {}}))


# ---- (b) draft and verify ------------------------------------------------------------------------


class DraftVerifyStrategy(DecodingStrategy):
    """Knows the true greedy continuation; each step feeds a token tree mixing right and wrong drafts.

    Tree for depth 3 (node order alternates between steps so accepted nodes are not contiguous):
        root (last token) -> c1 | w1;  c1 -> c2 | w2;  c2 -> c3 | w3
    Some steps corrupt the chain at one depth, so acceptance lengths vary from 1 to depth + 1.
    """

    name = "test_draft"

    def __init__(self, request, main, info, truth, depth, vocab):
        super().__init__(request, main)
        self.truth = truth
        self.depth = depth
        self.vocab = vocab
        self.tree = None
        self.steps = 0
        self.accepted: list[int] = []
        self.moved = 0

    def tokens_needed(self) -> int:
        return 1 + 2 * self.depth

    def _true(self, i: int) -> int:
        return self.truth[i] if i < len(self.truth) else 0

    def plan(self, token_budget):
        main = self.main
        self.tree = None
        if main.pending != 1 or not main.output_ids:
            return super().plan(token_budget)  # prefill (or recompute after preemption)
        n = 1 + 2 * self.depth
        if token_budget < n:
            return []
        g = len(main.output_ids)
        chain = [self._true(g + i) for i in range(self.depth)]
        wrong_at = self.steps % (self.depth + 1)  # == depth: the whole chain is right
        if wrong_at < self.depth:
            chain[wrong_at] = (chain[wrong_at] + 1) % self.vocab
        siblings = [(self._true(g + i) + 1 + 7 * (i + 1)) % self.vocab for i in range(self.depth)]
        tokens, parents = [main.token_ids[-1]], [-1]
        parent = 0
        for i in range(self.depth):
            pair = [(chain[i], True), (siblings[i], False)]
            if self.steps % 2:
                pair.reverse()
            for tok, on_chain in pair:
                tokens.append(tok)
                parents.append(parent)
                if on_chain:
                    chain_node = len(tokens) - 1
            parent = chain_node
        start = main.num_computed
        mask = torch.zeros(n, start + n, dtype=torch.bool)
        mask[:, :start] = True
        depths = []
        for i in range(n):
            j, d = i, 0
            while j >= 0:
                mask[i, start + j] = True
                j = parents[j]
                d += 1
            depths.append(d - 1)
        self.tree = (tokens, parents, start)
        self.steps += 1
        return [
            RowPlan(
                main,
                tokens,
                logits_at=list(range(n)),
                positions=[start + d for d in depths],
                mask=mask,
                advance=False,
            )
        ]

    def on_logits(self, logits, ctx):
        if self.tree is None:
            return super().on_logits(logits, ctx)
        tokens, parents, start = self.tree
        rows = logits[self.main.seq_id]
        assert rows.shape[0] == len(tokens)
        node, path, out = 0, [0], []
        while True:
            pred = int(torch.argmax(rows[node]))
            out.append(pred)
            child = next((c for c in range(len(tokens)) if parents[c] == node and tokens[c] == pred), None)
            if child is None:
                break
            path.append(child)
            node = child
        kept = [start + i for i in path]
        self.moved += sum(1 for k, o in enumerate(kept) if o != start + k)
        ctx.commit_kv(self.main, kept)
        self.accepted.append(len(out))
        return [Sampled(t) for t in out]

    def stats(self):
        return {"accepted": list(self.accepted)}


def _register_draft(monkeypatch, truth, depth=3):
    def factory(req, main, info):
        return DraftVerifyStrategy(req, main, info, truth, depth, info.config.vocab_size)

    _register(monkeypatch, "test_draft", factory)


def test_draft_and_verify_equals_plain_greedy(setup, monkeypatch):
    hf = setup[1]
    a = ids_of(setup, PROMPT_A)
    n = 30
    truth = hf_greedy(hf, a, n + 8)
    _register_draft(monkeypatch, truth)
    engine = make_engine(setup)
    other_ids = ids_of(setup, PROMPT_B)
    res = run(
        engine,
        [request("draft", a, n, {"test_draft": {}})],
        joins={2: [request("plain", other_ids, 20)]},  # decode rows of another request share the steps
    )
    tokens, finish, stats = res["draft"]
    assert tokens == truth[:n]
    assert finish == "length"
    accepted = stats["test_draft"]["accepted"]
    # every acceptance length from 1 (first draft token wrong) to depth + 1 (all right) occurred
    assert set(accepted) == {1, 2, 3, 4}
    assert len(accepted) < n - 1, "several tokens per step"
    assert res["plain"][0] == hf_greedy(hf, other_ids, 20)
    engine.check_no_leaks()


def _run_until_computed(engine, rid, at_least):
    """Step until request `rid` has K/V for at least `at_least` tokens; returns its main row."""
    for _ in range(200):
        engine.step()
        seq = engine.requests[rid].strategy.main
        if seq.num_computed >= at_least:
            return seq
    raise AssertionError("did not get there")


def test_draft_commit_kv_matches_plain_cache(setup, monkeypatch):
    hf = setup[1]
    a = ids_of(setup, PROMPT_A)
    truth = hf_greedy(hf, a, 60)
    _register_draft(monkeypatch, truth)
    draft_engine = make_engine(setup, block_size=4)  # small blocks: compaction crosses block borders
    draft_engine.add_request(request("d", a, 50, {"test_draft": {}}))
    strategy = draft_engine.requests["d"].strategy
    seq_d = _run_until_computed(draft_engine, "d", len(a) + 20)
    assert strategy.moved > 0, "compaction should have moved entries"
    k = seq_d.num_computed
    assert seq_d.token_ids[:k] == a + truth[: k - len(a)]
    # the block table holds no more than the committed tokens need (rejected drafts' blocks given back)
    assert len(seq_d.block_table) == draft_engine.blocks.blocks_for(seq_d.num_tokens)

    plain_engine = make_engine(setup, block_size=4)
    plain_engine.add_request(request("p", a, 50))
    seq_p = _run_until_computed(plain_engine, "p", k)
    slots_d = draft_engine.blocks.slots(seq_d, 0, k)
    slots_p = plain_engine.blocks.slots(seq_p, 0, k)
    for layer, ((kd, vd), (kp, vp)) in enumerate(zip(draft_engine.kv.layers, plain_engine.kv.layers)):
        torch.testing.assert_close(kd[slots_d], kp[slots_p], atol=1e-5, rtol=1e-4, msg=f"keys, layer {layer}")
        torch.testing.assert_close(
            vd[slots_d], vp[slots_p], atol=1e-5, rtol=1e-4, msg=f"values, layer {layer}"
        )
    # the comparison can tell a wrong entry apart: neighbouring tokens' keys differ clearly
    kd = draft_engine.kv.layers[-1][0]
    assert (kd[slots_d[1:]] - kd[slots_d[:-1]]).abs().amax() > 1e-2
    for eng, rid in ((draft_engine, "d"), (plain_engine, "p")):
        eng.abort(rid)
        eng.step()
        eng.check_no_leaks()


def test_draft_under_preemption(setup, monkeypatch):
    hf = setup[1]
    a = ids_of(setup, PROMPT_A)
    truth = hf_greedy(hf, a, 48)
    _register_draft(monkeypatch, truth)
    engine = make_engine(setup, kv_blocks=6)
    other_ids = ids_of(setup, PROMPT_B + " " + PROMPT_A)
    res = run(
        engine, [request("plain", other_ids, 40)], joins={1: [request("draft", a, 40, {"test_draft": {}})]}
    )
    assert engine.stats["preemptions"] > 0
    assert res["draft"][0] == truth[:40]
    assert res["plain"][0] == hf_greedy(hf, other_ids, 40)
    engine.check_no_leaks()


# ---- (c) prefill transform ------------------------------------------------------------------------


class PruneStrategy(DecodingStrategy):
    """Prefills the prompt in one step, dropping some tokens before layer `layer`."""

    name = "test_prune"

    def __init__(self, request, main, info, layer, keep):
        super().__init__(request, main)
        self.layer = layer
        self.keep = keep
        self.pruned = False

    def plan(self, token_budget):
        plans = super().plan(token_budget)
        if not self.pruned and self.keep is not None:
            (p,) = plans
            assert p.seq.num_computed == 0 and len(p.tokens) == self.main.num_prompt, (
                "whole prompt in one step"
            )
            p.drop_layer = self.layer
            p.keep_offsets = torch.tensor(self.keep)
            self.pruned = True
        return plans

    def cache_extras(self, seq):
        # a pruned prompt's KV is its own (and the prune needs the whole prompt in one step)
        return None if self.keep is not None else {}


def _register_prune(monkeypatch):
    def factory(req, main, info):
        opts = req.methods["test_prune"]
        return PruneStrategy(req, main, info, opts["layer"], opts["keep"])

    _register(monkeypatch, "test_prune", factory)


def _reference_pruned(hf, ids, keep, layer, n):
    """Greedy decoding where layers < `layer` see every prompt token and layers >= `layer` only `keep`
    (plus everything generated), at the original positions. Recomputes the whole forward each step
    with explicit masks, layer by layer over transformers' own modules."""
    m = hf.model
    dropped = sorted(set(range(len(ids))) - set(keep))
    out = []
    with torch.no_grad():
        for _ in range(n):
            seq = ids + out
            pos = torch.arange(len(seq))
            h = m.embed_tokens(torch.tensor([seq]))
            alive = torch.ones(len(seq), dtype=torch.bool)
            for i, block in enumerate(m.layers):
                if i == layer:
                    alive[dropped] = False
                    h = h[:, alive]
                p = pos[alive] if i >= layer else pos
                t = p.numel()
                mask = torch.full((1, 1, t, t), torch.finfo(h.dtype).min).triu(1)
                cos_sin = m.rotary_emb(h, p[None])
                h = block(h, attention_mask=mask, position_embeddings=cos_sin, position_ids=p[None])
            logits = hf.lm_head(m.norm(h))[0, -1]
            out.append(int(torch.argmax(logits)))
    return out


def _hf_dropped_tokens(hf, ids, keep, n):
    """Layer-0 pruning is transformers run on the kept tokens only, at their original positions."""
    kept_ids = [ids[i] for i in keep]
    with torch.no_grad():
        o = hf(
            torch.tensor([kept_ids]),
            position_ids=torch.tensor([keep]),
            attention_mask=torch.ones(1, len(keep), dtype=torch.long),
            use_cache=True,
        )
        out, past, pos, length = [], o.past_key_values, len(ids), len(keep)
        for _ in range(n):
            tok = int(torch.argmax(o.logits[0, -1]))
            out.append(tok)
            length += 1
            o = hf(
                torch.tensor([[tok]]),
                position_ids=torch.tensor([[pos]]),
                attention_mask=torch.ones(1, length, dtype=torch.long),
                past_key_values=past,
                use_cache=True,
            )
            past, pos = o.past_key_values, pos + 1
    return out


def test_prune_reference_is_sound(setup):
    """The manual reference reproduces plain decoding when nothing is dropped, and transformers'
    dropped-token run at layer 0."""
    hf = setup[1]
    a = ids_of(setup, PROMPT_A)
    keep = [i for i in range(len(a)) if not 4 <= i < 10]
    assert _reference_pruned(hf, a, list(range(len(a))), 1, 8) == hf_greedy(hf, a, 8)
    assert _reference_pruned(hf, a, keep, 0, 8) == _hf_dropped_tokens(hf, a, keep, 8)


def test_prefill_transform(setup, monkeypatch):
    _register_prune(monkeypatch)
    hf = setup[1]
    a = ids_of(setup, PROMPT_A)
    n = 12
    keep = [i for i in range(len(a)) if not 4 <= i < 10]  # drop six middle prompt tokens
    plain = hf_greedy(hf, a, n)
    engine = make_engine(setup)

    def prune(rid, layer, keep_):
        return request(rid, a, n, {"test_prune": {"layer": layer, "keep": keep_}}, logprobs=3)

    reqs = [
        prune("none", 0, None),
        prune("all0", 0, list(range(len(a)))),
        prune("all2", 2, list(range(len(a)))),
        prune("L0", 0, keep),
        prune("L1", 1, keep),
        prune("L2", 2, keep),
    ]
    res = {}
    # each alone (one pruning layer per step), then all but the layer-0 one side by side with a plain row
    for r in reqs:
        res.update(run(engine, [r]))
    assert res["none"][0] == plain
    assert res["all0"][0] == plain and res["all2"][0] == plain  # keeping every token changes nothing
    assert res["L0"][0] == _hf_dropped_tokens(hf, a, keep, n)
    for layer in (0, 1, 2):
        got = res[f"L{layer}"][0]
        assert got == _reference_pruned(hf, a, keep, layer, n), layer
    assert res["L0"][0] != plain and res["L1"][0] != plain
    assert len({tuple(res[f"L{i}"][0]) for i in range(3)}) > 1, "the pruning layer matters"

    # batched beside plain decoding rows of another request: same tokens
    other_ids = ids_of(setup, PROMPT_B)
    batch = run(engine, [request("other", other_ids, 10)], joins={2: [prune("L1b", 1, keep)]})
    assert batch["L1b"][0] == res["L1"][0]
    assert batch["other"][0] == hf_greedy(hf, other_ids, 10)
    engine.check_no_leaks()
