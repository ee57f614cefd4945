"""Continuous batching: which requests run this step, within a token budget and the KV budget.

Running requests go first (decode rows are cheap and latency-bound), then waiting ones are
admitted FIFO while their whole prompt fits in free KV blocks. A request's rows (main and
shadows) are scheduled together or not at all. When KV runs out, the most recently admitted
running request is preempted (blocks freed, recomputed later).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Protocol

from freelunch.engine.block_manager import BlockManager, BlockNeed
from freelunch.engine.strategy import DecodingStrategy, RowPlan


class Schedulable(Protocol):
    strategy: DecodingStrategy


@dataclass(slots=True)
class ScheduledBatch:
    plans: list[RowPlan]
    requests: list  # the Schedulable objects that run this step
    preempted: int = 0


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque = deque()
        self.running: list = []
        self.num_preemptions = 0

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

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        plans: list[RowPlan] = []
        scheduled: list = []
        preempted = 0
        for req in list(self.running):
            if req not in self.running:  # preempted by an earlier request of this loop
                continue
            if budget <= 0:
                break
            req_plans = req.strategy.plan(budget)
            if not req_plans:
                continue
            while not self.blocks.has_room(self._blocks_needed(req_plans)):
                victim = self.running[-1]
                self._preempt(victim)
                preempted += 1
                if victim is req:
                    break
            if req not in self.running:
                continue
            self._allocate(req_plans)
            plans.extend(req_plans)
            scheduled.append(req)
            budget -= sum(len(p.tokens) for p in req_plans)
        rows = self._rows_in_use()
        while self.waiting and budget > 0 and not preempted:
            req = self.waiting[0]
            if rows + len(req.strategy.rows) > self.max_num_seqs:
                break
            # admit only if the whole prompt (plus the first decode step) of every row fits
            whole = sum(
                (self.blocks.need(seq, seq.num_tokens + req.strategy.tokens_needed()) for seq in req.strategy.rows),
                BlockNeed(),
            )
            if not self.blocks.has_room(whole):
                break
            req_plans = req.strategy.plan(budget)
            self.waiting.popleft()
            self.running.append(req)
            rows += len(req.strategy.rows)
            if not req_plans:
                continue
            self._allocate(req_plans)
            plans.extend(req_plans)
            scheduled.append(req)
            budget -= sum(len(p.tokens) for p in req_plans)
        return ScheduledBatch(plans, scheduled, preempted)
