"""Continuous batching: which requests run this step, within a token budget and the KV budget.

Running requests go first (decode rows are cheap and latency-bound), then waiting ones are
admitted while their whole prompt fits in free KV blocks. A request's rows (main and shadows)
are scheduled together or not at all. When KV runs out, the most recently admitted running
request is preempted (blocks freed, recomputed later).

Fairness (policy "fair", the default), so that a heavy request cannot starve light ones:
- the running requests take the step's token budget in turns (the order rotates every step; decoding
  requests first, then prompts, the shortest first);
- while some requests decode, prompts are prefilled at most `prefill_chunk` tokens a step in all,
  so that long prompts cost the requests decoding beside them a bounded stall per step, not a whole
  1k-token forward (a prompt that can only run whole, its tokens dropped in one forward, still runs whole);
- waiting requests are admitted tenant by tenant: the next is the oldest of the tenant (API key)
  with the fewest requests running, FIFO within a tenant.
Policy "fifo" is the plain order: admission order, whole budget, FIFO admission.

Prefix caching: a row that starts from nothing first takes the longest cached chain of its
blocks (block_manager.py). A row whose first missing block another row is computing right now
(the other choices of `n` > 1, a method's extra rows sharing a system prompt, a burst of requests with
one few-shot prefix) waits until that row has computed it and then takes it, instead of computing
the same prefix beside it.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass
from typing import Protocol

from freelunch.engine.block_manager import BlockManager, BlockNeed
from freelunch.engine.strategy import DecodingStrategy, RowPlan


class Schedulable(Protocol):
    strategy: DecodingStrategy
    tenant: str | None  # requests of one API key share admission turns


POLICIES = ("fair", "fifo")


@dataclass(slots=True)
class ScheduledBatch:
    plans: list[RowPlan]
    requests: list  # the Schedulable objects that run this step
    preempted: int = 0


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        policy: str = "fair",
        prefill_chunk: int = 256,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"scheduling policy must be one of {POLICIES}, not {policy!r}")
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.fair = policy == "fair"
        self.prefill_chunk = prefill_chunk
        self.waiting: deque = deque()
        self.running: list = []
        self.num_preemptions = 0
        self._turn = 0

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def add(self, req: Schedulable) -> None:
        self.waiting.append(req)

    def remove(self, req: Schedulable) -> None:
        """Forget a finished or aborted request and free its blocks."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        for seq in req.strategy.rows:
            self.blocks.free(seq)

    def _rows_in_use(self) -> int:
        return sum(len(r.strategy.rows) for r in self.running)

    def _blocks_needed(self, plans: list[RowPlan]) -> BlockNeed:
        return sum((self.blocks.need(p.seq, p.seq.num_computed + len(p.tokens)) for p in plans), BlockNeed())

    def _allocate(self, plans: list[RowPlan]) -> None:
        for p in plans:
            self.blocks.allocate(p.seq, p.seq.num_computed + len(p.tokens))

    def _preempt(self, req: Schedulable) -> None:
        self.running.remove(req)
        for seq in req.strategy.rows:
            self.blocks.free(seq)
            seq.reset_cache_state()
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    def _computing(self) -> dict[bytes, object]:
        """The names of the blocks rows are computing now -> the row."""
        computing: dict[bytes, object] = {}
        for req in self.running:
            for seq in req.strategy.rows:
                if seq.num_computed > 0 and seq.pending > 1:
                    for key in self.blocks.computing(seq):
                        computing.setdefault(key, seq)
        return computing

    def _attach(self, req: Schedulable, computing: dict[bytes, object]) -> None:
        """The rows of `req` that start from nothing take their cached prefix, or wait while
        another row computes the first block they miss (and then take it too)."""
        for seq in req.strategy.rows:
            if seq.num_computed or seq.block_table:
                continue
            missing = self.blocks.first_missing(seq)
            seq.prefix_wait = missing is not None and computing.get(missing, seq) is not seq
            if seq.prefix_wait:
                continue
            self.blocks.attach_prefix(seq)
            for key in self.blocks.computing(seq):
                computing.setdefault(key, seq)

    def _detach(self, req: Schedulable) -> None:
        """Undo `_attach` for a request that is not admitted after all."""
        for seq in req.strategy.rows:
            self.blocks.free(seq)
            seq.reset_cache_state()
            seq.num_cached = None

    def _in_turn(self) -> list:
        """The running requests in this step's order. Fair: the decoding ones first, in an order
        that rotates every step, then the prefilling ones, the fewest prompt tokens left first
        (a short prompt beside a long one is not held up by it)."""
        if not self.fair or not self.running:
            return list(self.running)
        start = self._turn % len(self.running)
        self._turn += 1
        rotated = self.running[start:] + self.running[:start]
        decoding = [r for r in rotated if not _prefilling(r)]
        prefilling = sorted((r for r in rotated if _prefilling(r)), key=_tokens_left)
        return decoding + prefilling

    def _plan(self, req: Schedulable, budget: int, prefill_left: int | None):
        """The request's plans within `budget`; a prefill gets at most `prefill_left` tokens (None:
        no such bound), unless it can only run whole (a prompt whose tokens are dropped in one forward)."""
        if prefill_left is not None and _prefilling(req):
            if prefill_left <= 0:
                return []
            plans = req.strategy.plan(min(budget, prefill_left))
            if plans or prefill_left >= budget:
                return plans
        return req.strategy.plan(budget)

    def _next_waiting(self) -> Schedulable:
        """The oldest waiting request of the tenant with the fewest running (fair), or the oldest."""
        if not self.fair:
            return self.waiting[0]
        running = Counter(getattr(r, "tenant", None) for r in self.running)
        return min(self.waiting, key=lambda r: running[getattr(r, "tenant", None)])  # min keeps the first of equals

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        plans: list[RowPlan] = []
        scheduled: list = []
        preempted = 0
        # while requests decode, prompts share `prefill_chunk` tokens a step (fair policy)
        prefill_left = self.prefill_chunk if self.fair and any(not _prefilling(r) for r in self.running) else None
        computing = self._computing() if self.blocks.caching else {}
        for req in self._in_turn():
            if req not in self.running:  # preempted by an earlier request of this loop
                continue
            if budget <= 0:
                break
            if self.blocks.caching:
                self._attach(req, computing)
            req_plans = self._plan(req, budget, prefill_left)
            if not req_plans:
                continue
            while not self.blocks.has_room(self._blocks_needed(req_plans)):
                # the most recently admitted request not already in this step's batch (or this one)
                victim = next(r for r in reversed(self.running) if r is req or not any(r is s for s in scheduled))
                self._preempt(victim)
                preempted += 1
                if victim is req:
                    break
            if req not in self.running:
                continue
            self._allocate(req_plans)
            plans.extend(req_plans)
            scheduled.append(req)
            used = sum(len(p.tokens) for p in req_plans)
            budget -= used
            if prefill_left is not None and _prefilling(req):
                prefill_left -= used
        rows = self._rows_in_use()
        while self.waiting and budget > 0 and not preempted:
            req = self._next_waiting()
            if rows + len(req.strategy.rows) > self.max_num_seqs:
                break
            if self.blocks.caching:
                self._attach(req, computing)
            # admit only if the whole prompt (plus the first decode step) of every row fits
            whole = sum(
                (self.blocks.need(seq, seq.num_tokens + req.strategy.tokens_needed()) for seq in req.strategy.rows),
                BlockNeed(),
            )
            if not self.blocks.has_room(whole):
                self._detach(req)
                break
            req_plans = self._plan(req, budget, prefill_left)
            self.waiting.remove(req)
            self.running.append(req)
            rows += len(req.strategy.rows)
            if not req_plans:
                continue
            self._allocate(req_plans)
            plans.extend(req_plans)
            scheduled.append(req)
            used = sum(len(p.tokens) for p in req_plans)
            budget -= used
            if prefill_left is not None:
                prefill_left -= used
        return ScheduledBatch(plans, scheduled, preempted)


def _tokens_left(req: Schedulable) -> int:
    return sum(seq.pending for seq in req.strategy.rows)


def _prefilling(req: Schedulable) -> bool:
    """A row of the request has more than one token to feed (its prompt, or a recompute)."""
    return any(seq.pending > 1 for seq in req.strategy.rows)
