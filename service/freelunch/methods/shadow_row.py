"""Paired-row methods (CFG, SCMoE): a request's main row plus one shadow row, combined before sampling.

The shadow row has its own KV cache and rides in the same batch as everything else; both rows
append every sampled token. Each step the two rows' logits for their current last token are
combined (`combine`) into the values the engine samples from.
"""

from __future__ import annotations

from typing import Any

import torch

from freelunch.engine.request import GenerationRequest, Sequence
from freelunch.engine.strategy import DecodingStrategy, RowPlan, StepContext


class ShadowRowStrategy(DecodingStrategy):
    """Base class: subclasses call `add_shadow` (or not: then the request decodes as a plain one)
    and implement `combine`."""

    def __init__(self, request: GenerationRequest, main: Sequence) -> None:
        super().__init__(request, main)
        self.shadow: Sequence | None = None
        # Chunked prefill (or a tight token budget) may give one row its last-token logits a
        # step before the other. Rather than holding a row back in `plan`, each row's logits for
        # its current last token are kept here until the other row's arrive; appending the
        # sampled token (which both rows get) empties it. A row recomputed after preemption has
        # the same tokens, so a kept entry stays valid (and is overwritten when it comes again).
        self._last: dict[int, torch.Tensor] = {}  # seq_id -> logits [vocab]
        self._shadow_planned = 0
        self.extra_tokens = 0  # tokens the shadow row ran through the model

    def add_shadow(self, shadow: Sequence) -> None:
        self.shadow = shadow
        self.rows.append(shadow)

    def combine(self, main_logits: torch.Tensor, shadow_logits: torch.Tensor) -> torch.Tensor:
        """The values [vocab] to sample from, given both rows' logits [vocab] for their last token."""
        raise NotImplementedError

    def plan(self, token_budget: int) -> list[RowPlan]:
        plans = super().plan(token_budget)
        # counted when the step runs (on_logits): a plan dropped by preemption never ran
        self._shadow_planned = sum(len(p.tokens) for p in plans if p.seq is self.shadow)
        return plans

    def on_logits(self, logits: dict[int, torch.Tensor], ctx: StepContext) -> torch.Tensor | None:
        if self.shadow is None:
            return super().on_logits(logits, ctx)
        self.extra_tokens += self._shadow_planned
        self._shadow_planned = 0
        for seq in self.rows:
            out = logits.get(seq.seq_id)
            if out is not None and seq.pending == 0:  # this step fed the row's last token
                self._last[seq.seq_id] = out[-1]
        if any(seq.pending > 0 or seq.seq_id not in self._last for seq in self.rows):
            return None  # a row is still prefilling
        main_logits = self._last.pop(self.main.seq_id)
        shadow_logits = self._last.pop(self.shadow.seq_id)
        return self.combine(main_logits, shadow_logits)

    def append(self, token_id: int) -> None:
        self._last.clear()
        super().append(token_id)

    def shadow_stats(self) -> dict[str, Any]:
        """The shadow row's cost, for `usage.method_stats`."""
        return {
            "extra_rows": len(self.rows) - 1,
            "extra_prompt_tokens": self.shadow.num_prompt if self.shadow is not None else 0,
            "extra_tokens": self.extra_tokens,
        }
