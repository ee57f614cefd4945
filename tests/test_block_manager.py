"""KV block accounting and the continuous-batching scheduler, without a model."""

from __future__ import annotations

import random

import pytest
import torch
from freelunch.engine.block_manager import BlockManager, BlockNeed
from freelunch.engine.request import GenerationRequest, SamplingParams, Sequence
from freelunch.engine.scheduler import Scheduler
from freelunch.engine.strategy import DecodingStrategy

# ---- block manager -------------------------------------------------------------------------


def _check_invariants(bm: BlockManager, seqs: list[Sequence]) -> None:
    owned = [b for s in seqs for b in s.block_table]
    assert len(owned) == len(set(owned)), "a block is owned by two sequences (or twice by one)"
    assert bm.num_free + len(owned) == bm.num_blocks
    assert set(owned).isdisjoint(bm.lower.free), "a block is both free and owned"
    assert all(0 <= b < bm.num_blocks for b in owned)
    for s in seqs:
        assert all(bm.lower.holders[b] == [s.seq_id] for b in s.block_table)


def test_random_allocate_grow_truncate_free():
    rng = random.Random(1234)
    bm = BlockManager(num_blocks=97, block_size=8)
    seqs = [Sequence([0], 1) for _ in range(25)]
    sizes = {s.seq_id: 0 for s in seqs}  # tokens each sequence's table is sized for
    ooms = 0
    for _ in range(5000):
        s = rng.choice(seqs)
        op = rng.random()
        if op < 0.45:  # allocate / grow
            target = sizes[s.seq_id] + rng.randint(1, 60)
            need = bm.blocks_for(target) - len(s.block_table)
            before = list(s.block_table)
            free_before = bm.num_free
            if need > bm.num_free:
                with pytest.raises(MemoryError):
                    bm.allocate(s, target)
                # a refused allocation takes nothing
                assert s.block_table == before and bm.num_free == free_before
                ooms += 1
            else:
                bm.allocate(s, target)
                sizes[s.seq_id] = target
                assert s.block_table[: len(before)] == before, (
                    "growing must keep the existing blocks in order"
                )
                assert len(s.block_table) == bm.blocks_for(target)
                assert bm.need(s, target) == BlockNeed()
        elif op < 0.75:  # truncate
            target = rng.randint(0, sizes[s.seq_id])
            before = list(s.block_table)
            bm.truncate(s, target)
            sizes[s.seq_id] = target
            assert s.block_table == before[: bm.blocks_for(target)]
        elif op < 0.9:  # free
            bm.free(s)
            sizes[s.seq_id] = 0
            assert s.block_table == []
        else:  # release a block the sequence does not own: refused, nothing changes
            others = [o for o in seqs if o is not s and o.block_table]
            if others:
                victim = rng.choice(others)
                foreign = Sequence([0], 1, seq_id=s.seq_id, block_table=[victim.block_table[-1]])
                with pytest.raises(RuntimeError):
                    bm.free(foreign)
        _check_invariants(bm, seqs)
    assert ooms > 0, "the loop should have hit the budget at least once"
    for s in seqs:
        bm.free(s)
    bm.check_no_leaks()


def test_check_no_leaks_catches_a_leak_and_double_free():
    bm = BlockManager(4, 4)
    s = Sequence([1, 2, 3], 3)
    bm.allocate(s, 5)
    assert len(s.block_table) == 2 and bm.num_free == 2
    with pytest.raises(AssertionError):
        bm.check_no_leaks()
    table = list(s.block_table)
    bm.free(s)
    bm.check_no_leaks()
    s.block_table = table  # stale table: freeing again must be refused
    with pytest.raises(RuntimeError):
        bm.free(s)


def test_memory_error_over_budget():
    bm = BlockManager(3, 16)
    a, b = Sequence([0], 1), Sequence([0], 1)
    bm.allocate(a, 48)
    assert bm.num_free == 0 and bm.usage == 1.0
    with pytest.raises(MemoryError):
        bm.allocate(b, 1)
    bm.allocate(a, 48)  # already fits: no new block needed
    with pytest.raises(MemoryError):
        bm.allocate(a, 49)
    assert len(a.block_table) == 3
    bm.free(a)
    bm.allocate(b, 1)
    bm.free(b)
    bm.check_no_leaks()


def test_the_lowest_free_blocks_go_first():
    """The cache's memory is touched only where a block is written (engine/kv_cache.py): handing out
    the lowest free blocks keeps the touched part as large as the peak use, however long the
    server runs (a queue would walk through every block in turn)."""
    rng = random.Random(5)
    bm = BlockManager(num_blocks=64, block_size=4, cache_blocks=0)
    live, peak = [], 0
    for _ in range(400):
        if live and rng.random() < 0.5:
            bm.free(live.pop(rng.randrange(len(live))))
        else:
            s = Sequence([0], 1)
            bm.allocate(s, rng.randint(1, 12))
            live.append(s)
        held = [b for s in live for b in s.block_table]
        peak = max(peak, len(held))
        assert max(held, default=-1) < peak, "a block above the peak use was handed out"
    freed = Sequence([0], 1)
    for s in live:
        bm.free(s)
    bm.allocate(freed, 4 * 3)
    assert freed.block_table == [0, 1, 2]


def test_the_kv_cache_is_zero_and_not_resident_before_it_is_written():
    import os

    from freelunch.engine.kv_cache import KVCache

    def private_kib() -> int:
        with open(f"/proc/{os.getpid()}/smaps_rollup") as f:
            return sum(int(line.split()[1]) for line in f if line.startswith(("Private_Clean:", "Private_Dirty:")))

    if not os.path.exists(f"/proc/{os.getpid()}/smaps_rollup"):
        pytest.skip("needs Linux's /proc")
    before = private_kib()
    kv = KVCache(8, 1 << 16, 4, 64, torch.float16, torch.device("cpu"))  # 512 MiB of slots
    assert private_kib() - before < 16 << 10
    k, v = kv.layers[3]
    assert k.dtype == torch.float16 and k.shape == (1 << 16, 4, 64) and k.is_contiguous()
    k[:1024] = 1.0
    v[-16:] = 2.0
    assert private_kib() - before < 32 << 10  # the pages written, not the whole layer
    assert float(k[:2048].float().sum()) == 1024 * 4 * 64 and not v[:-16].any() and not kv.layers[7][0].any()


def test_kv_cache_dtype_resolution_and_refusals():
    from freelunch.config import EngineConfig
    from freelunch.engine.kv_cache import kv_cache_dtype

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert kv_cache_dtype("auto", torch.float32, cpu) == torch.float16  # 16 bits on CPU
    assert kv_cache_dtype("auto", torch.bfloat16, cpu) == torch.bfloat16  # a 16-bit model's own
    assert kv_cache_dtype("float32", torch.float32, cpu) == torch.float32  # the exact reference
    assert kv_cache_dtype("bfloat16", torch.float32, cpu) == torch.bfloat16
    assert kv_cache_dtype("auto", torch.bfloat16, gpu) == torch.bfloat16  # GPUs: the model's dtype
    assert kv_cache_dtype("bfloat16", torch.bfloat16, gpu) == torch.bfloat16
    with pytest.raises(ValueError, match="model's dtype"):
        kv_cache_dtype("float16", torch.bfloat16, gpu)
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        kv_cache_dtype("int8", torch.float32, cpu)
    with pytest.raises(ValueError, match="kv_cache_dtype must be"):
        EngineConfig(kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match="native engine"):
        EngineConfig(kv_cache_dtype="float16", engine="vllm")
    with pytest.raises(ValueError, match="off the CPU"):
        EngineConfig(kv_cache_dtype="float16", device="cuda", dtype="bfloat16")
    EngineConfig(kv_cache_dtype="bfloat16", device="cuda", dtype="bfloat16")
    EngineConfig(kv_cache_dtype="auto", engine="vllm")


def test_invalid_sizes():
    with pytest.raises(ValueError):
        BlockManager(0, 16)
    with pytest.raises(ValueError):
        BlockManager(4, 0)


def test_slots_mapping():
    bs = 4
    bm = BlockManager(16, bs)
    filler, s = Sequence([0], 1), Sequence([0], 1)
    # interleave allocations so the table is not contiguous
    for n in range(1, 6):
        bm.allocate(filler, n * bs)
        bm.allocate(s, n * bs - 1)
    assert s.block_table != list(range(s.block_table[0], s.block_table[0] + len(s.block_table)))
    total = len(s.block_table) * bs
    slots = bm.slots(s, 0, total)
    expected = [s.block_table[o // bs] * bs + o % bs for o in range(total)]
    assert slots.tolist() == expected
    assert len(set(slots.tolist())) == total
    # sub-ranges agree with the full mapping
    assert bm.slots(s, 3, 11).tolist() == expected[3:11]
    assert bm.slots(s, 7, 7).numel() == 0
    # no slot of s is a slot of another sequence
    other = set(bm.slots(filler, 0, len(filler.block_table) * bs).tolist())
    assert other.isdisjoint(slots.tolist())
    assert slots.dtype == torch.long


# ---- scheduler -----------------------------------------------------------------------------


class FakeRequest:
    """What the scheduler sees of a request: a strategy with rows."""

    def __init__(self, prompt_len: int, name: str = "", shadows: int = 0, prompt_logprobs=None, tenant=None) -> None:
        params = SamplingParams(max_tokens=100, temperature=0.0, prompt_logprobs=prompt_logprobs)
        self.tenant = tenant
        req = GenerationRequest(name, list(range(prompt_len)), params)
        main = Sequence(list(range(prompt_len)), prompt_len)
        self.name = name
        self.strategy = DecodingStrategy(req, main)
        for _ in range(shadows):
            self.strategy.rows.append(Sequence(list(range(prompt_len)), prompt_len))

    def __repr__(self) -> str:
        return f"FakeRequest({self.name})"


def _advance(batch) -> None:
    """What the engine does after a forward: fed tokens are computed; rows done prefilling get a token."""
    for p in batch.plans:
        p.seq.num_computed += len(p.tokens)
    for req in batch.requests:
        if req.strategy.main.pending == 0:
            req.strategy.append(7)


def _sched(num_blocks=64, block_size=4, max_num_seqs=8, budget=64, policy="fifo", chunk=256):
    """The mechanics tests run the plain order ("fifo"); the fairness tests below, "fair"."""
    bm = BlockManager(num_blocks, block_size)
    return bm, Scheduler(bm, max_num_seqs, budget, policy, chunk)


def test_admission_only_when_blocks_fit():
    bm, sched = _sched(num_blocks=6, block_size=4, budget=256)
    a, b = FakeRequest(12, "a"), FakeRequest(12, "b")
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    # a needs ceil((12+1)/4) = 4 blocks; b would need 4 more but only 3 are left
    assert batch.requests == [a]
    assert list(sched.waiting) == [b]
    assert len(a.strategy.main.block_table) == 3  # allocated for what is fed now
    _advance(batch)
    batch = sched.schedule()
    assert batch.requests == [a] and list(sched.waiting) == [b]
    sched.remove(a)
    assert bm.num_free == 6
    batch = sched.schedule()
    assert batch.requests == [b] and not sched.waiting
    sched.remove(b)
    bm.check_no_leaks()


def test_fifo_head_of_line_blocks_smaller_later_request():
    _bm, sched = _sched(num_blocks=5, block_size=4, budget=256)
    a, big, small = FakeRequest(8, "a"), FakeRequest(20, "big"), FakeRequest(2, "small")
    for r in (a, big, small):
        sched.add(r)
    batch = sched.schedule()
    assert batch.requests == [a]
    assert list(sched.waiting) == [big, small]


def test_token_budget_chunks_prefill():
    _bm, sched = _sched(num_blocks=64, block_size=4, budget=16)
    a, b = FakeRequest(40, "a"), FakeRequest(10, "b")
    sched.add(a)
    sched.add(b)
    fed = []
    chunks = []
    for _ in range(30):
        batch = sched.schedule()
        n = sum(len(p.tokens) for p in batch.plans)
        assert n <= 16, "a step must never exceed max_num_batched_tokens"
        for p in batch.plans:
            if p.seq is a.strategy.main and p.seq.num_computed < 40:
                chunks.append((p.seq.num_computed, len(p.tokens), list(p.logits_at)))
                # only the last prefill chunk asks for logits
                assert p.logits_at == (
                    [len(p.tokens) - 1] if p.seq.num_computed + len(p.tokens) == 40 else []
                )
                assert (
                    p.tokens
                    == a.strategy.main.token_ids[p.seq.num_computed : p.seq.num_computed + len(p.tokens)]
                )
        fed.append(n)
        _advance(batch)
        if len(a.strategy.main.output_ids) >= 2 and len(b.strategy.main.output_ids) >= 2:
            break
    # a's prompt went in 16-token chunks; b waited for budget (admitted once a left room)
    assert [c[:2] for c in chunks] == [(0, 16), (16, 16), (32, 8)]
    assert fed[:3] == [16, 16, 16]
    assert len(a.strategy.main.output_ids) >= 2 and len(b.strategy.main.output_ids) >= 2


def test_max_num_seqs_counts_rows():
    _bm, sched = _sched(num_blocks=64, block_size=4, max_num_seqs=3, budget=256)
    a = FakeRequest(4, "a", shadows=1)  # two rows
    b = FakeRequest(4, "b", shadows=1)
    c = FakeRequest(4, "c")
    for r in (a, b, c):
        sched.add(r)
    batch = sched.schedule()
    # a (2 rows) is admitted; b (2 more rows) would make 4 > 3 and blocks the queue (FIFO)
    assert batch.requests == [a]
    assert {p.seq.seq_id for p in batch.plans} == {s.seq_id for s in a.strategy.rows}
    assert list(sched.waiting) == [b, c]
    sched.remove(a)
    batch = sched.schedule()
    assert batch.requests == [b, c]
    assert sched.num_running == 2


def test_max_num_seqs_single_rows():
    _bm, sched = _sched(num_blocks=256, block_size=4, max_num_seqs=4, budget=1024)
    reqs = [FakeRequest(3, str(i)) for i in range(10)]
    for r in reqs:
        sched.add(r)
    for _ in range(5):
        batch = sched.schedule()
        assert sched.num_running <= 4
        assert len(batch.plans) <= 4
        _advance(batch)
    assert sched.running == reqs[:4]


def test_preemption_frees_blocks_and_requeues_at_front():
    # 7 blocks of 4; a, b, c have 7-token prompts (2 blocks each, 8 tokens incl. the first decode)
    bm, sched = _sched(num_blocks=7, block_size=4, budget=256)
    a, b, c = FakeRequest(7, "a"), FakeRequest(7, "b"), FakeRequest(7, "c")
    for r in (a, b):
        sched.add(r)
    batch = sched.schedule()
    assert batch.requests == [a, b]
    _advance(batch)
    sched.add(c)
    batch = sched.schedule()
    assert batch.requests == [a, b, c] and bm.num_free == 1
    _advance(batch)
    # a and b each need a third block now: a takes the last free one, b forces a preemption
    batch = sched.schedule()
    assert batch.preempted == 1 and sched.num_preemptions == 1
    assert batch.requests == [a, b]
    # the most recently admitted running request was preempted: back at the head of the queue
    assert list(sched.waiting) == [c] and sched.running == [a, b]
    for seq in c.strategy.rows:
        assert seq.block_table == [] and seq.num_computed == 0
    assert c.strategy.main.output_ids == [7], "generated tokens are kept, to be recomputed"
    owned = sum(len(s.block_table) for r in sched.running for s in r.strategy.rows)
    assert owned == 6 and owned + bm.num_free == bm.num_blocks
    # a newly arriving request queues behind the preempted one
    d = FakeRequest(2, "d")
    sched.add(d)
    assert list(sched.waiting) == [c, d]
    _advance(batch)
    # once the others finish, the victim is re-admitted first and recomputes prompt + output
    sched.remove(a)
    sched.remove(b)
    batch = sched.schedule()
    assert batch.requests == [c, d]
    plan = batch.plans[0]
    assert plan.seq is c.strategy.main and plan.seq.num_computed == 0
    assert plan.tokens == c.strategy.main.token_ids and len(plan.tokens) == 8
    sched.remove(c)
    sched.remove(d)
    bm.check_no_leaks()


def test_preemption_of_self_when_alone_does_not_run():
    # a single request whose next step needs a block when none is free gets preempted itself
    bm, sched = _sched(num_blocks=2, block_size=4, budget=256)
    a = FakeRequest(7, "a")
    sched.add(a)
    _advance(sched.schedule())  # prefill: 7 computed, 8 tokens
    _advance(sched.schedule())  # decode: 8 computed (2 blocks full), 9 tokens
    batch = sched.schedule()  # the 9th token needs a third block
    assert batch.preempted == 1 and batch.plans == []
    assert list(sched.waiting) == [a] and bm.num_free == 2
    assert a.strategy.main.block_table == []


def test_remove_waiting_request():
    bm, sched = _sched(num_blocks=2, block_size=4, budget=256)
    a, b = FakeRequest(6, "a"), FakeRequest(6, "b")
    sched.add(a)
    sched.add(b)
    sched.schedule()
    assert list(sched.waiting) == [b]
    sched.remove(b)
    assert not sched.waiting
    sched.remove(a)
    bm.check_no_leaks()


# ---- a cache split at a layer: two pools, packed upper tables (FastV) ------------------------


def test_split_cache_pools_and_packed_upper_tables():
    bm = BlockManager(num_blocks=8, block_size=4, upper_blocks=4, layer_split=(1, 4))
    plain = Sequence(list(range(6)), 6)
    bm.allocate(plain, 6)
    assert (len(plain.block_table), len(plain.upper_table)) == (2, 2)
    # a prune to 3 of its 12 prompt tokens will run below the split: the upper table is sized for 3
    pruned = Sequence(list(range(12)), 12)
    pruned.reserve_packed(3, 12)
    assert bm.need(pruned, 12) == BlockNeed(3, 1)
    bm.allocate(pruned, 12)
    pruned.drop_tokens(1, torch.tensor([0, 4, 11]), 12, packed=True)
    assert pruned.upper_order(14).tolist() == [0, 4, 11, 12, 13]
    assert pruned.dropped_offsets().tolist() == [1, 2, 3, 5, 6, 7, 8, 9, 10]
    # growing: offset 12 is the 4th upper entry, offset 13 the 5th (a second upper block)
    assert bm.need(pruned, 14) == BlockNeed(1, 1)
    bm.allocate(pruned, 14)
    assert bm.upper_slots(pruned, torch.tensor([4])).item() == pruned.upper_table[1] * 4
    # bytes held: lower blocks hold 1 layer, upper blocks 3
    assert bm.usage == pytest.approx((6 * 1 + 4 * 3) / (8 * 1 + 4 * 3))
    assert not bm.has_room(BlockNeed(0, 1)) and bm.has_room(BlockNeed(2, 0))
    assert bm.could_ever_hold(BlockNeed(8, 4)) and not bm.could_ever_hold(BlockNeed(1, 5))
    with pytest.raises(MemoryError):
        bm.allocate(Sequence([0] * 4, 4), 4)  # the upper pool is full: nothing is taken
    assert bm.num_free == 2
    bm.free(plain)
    bm.free(pruned)
    bm.check_no_leaks()
    with pytest.raises(ValueError):
        BlockManager(8, 4, upper_blocks=4)  # upper blocks without a split


# ---- the fair policy ---------------------------------------------------------------------------


def test_fair_running_requests_take_the_budget_in_turns():
    """Three decoding requests, a budget of two tokens a step: under fifo the first two run every
    step and the third never does; under fair each runs two steps in three."""
    runs = {}
    for policy in ("fifo", "fair"):
        bm, sched = _sched(num_blocks=64, budget=3, policy=policy)
        reqs = [FakeRequest(1, name) for name in "abc"]
        for r in reqs:
            sched.add(r)
        _advance(sched.schedule())  # three 1-token prompts in one step
        sched.max_num_batched_tokens = 2
        count = {r.name: 0 for r in reqs}
        for _ in range(6):
            batch = sched.schedule()
            for r in batch.requests:
                count[r.name] += 1
            _advance(batch)
        runs[policy] = count
    assert runs["fifo"] == {"a": 6, "b": 6, "c": 0}
    assert runs["fair"] == {"a": 4, "b": 4, "c": 4}


def test_fair_a_long_prompt_is_prefilled_in_chunks_beside_decoding_requests():
    bm, sched = _sched(num_blocks=256, budget=512, policy="fair", chunk=32)
    small = FakeRequest(3, "small")
    sched.add(small)
    _advance(sched.schedule())  # small is decoding now
    long = FakeRequest(300, "long")
    sched.add(long)
    fed = []
    for _ in range(3):
        batch = sched.schedule()
        assert small in batch.requests  # the decoding request runs every step
        fed.append(sum(len(p.tokens) for p in batch.plans if p.seq is long.strategy.main))
        _advance(batch)
    assert fed == [32, 32, 32]
    alone_bm, alone = _sched(num_blocks=256, budget=512, policy="fair", chunk=32)
    solo = FakeRequest(300, "solo")
    alone.add(solo)
    batch = alone.schedule()
    assert sum(len(p.tokens) for p in batch.plans) == 300  # alone: the whole budget


def test_fair_admission_takes_api_keys_in_turns():
    """Key A queued three requests before key B's one; with room for two at a time, B's request
    is admitted second, not after all of A's (fifo)."""
    order = {}
    for policy in ("fifo", "fair"):
        bm, sched = _sched(num_blocks=64, max_num_seqs=2, budget=64, policy=policy)
        reqs = [FakeRequest(2, f"a{i}", tenant="A") for i in range(3)] + [FakeRequest(2, "b0", tenant="B")]
        for r in reqs:
            sched.add(r)
        batch = sched.schedule()
        order[policy] = [r.name for r in batch.requests]
    assert order["fifo"] == ["a0", "a1"]
    assert order["fair"] == ["a0", "b0"]
