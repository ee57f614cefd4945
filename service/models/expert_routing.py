"""Which experts each token of a packed batch uses in a sparse MoE layer.

`route` is the router of transformers' MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE):
softmax over the router logits in float32, top-k, renormalised to sum 1 where the model says so.
`ExpertRouting` overrides it per token, so that rows with different routing share one forward:
a token with rank r >= 1 uses only the expert its router ranks r-th (1-based: r = 1 is the
router's first choice), with weight 1. SCMoE's weak branch is such a row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# RowPlan.extras key: the row's expert rank (0 or absent = the router's own top-k).
EXPERT_RANK = "expert_rank"


@dataclass(slots=True)
class ExpertRouting:
    """Per packed token: 0 = the router's top-k; r >= 1 = only the expert of router rank r, weight 1."""

    rank: torch.Tensor  # [T] long
    max_rank: int  # max(rank), kept on the host so that routing needs no device sync

    @classmethod
    def from_rows(cls, rows: list[tuple[int, int]], device: torch.device) -> ExpertRouting | None:
        """(rank, token count) of each row in packing order; None when every row routes by default."""
        if not any(rank for rank, _ in rows):
            return None
        rank = torch.cat([torch.full((n,), r, dtype=torch.long) for r, n in rows])
        return cls(rank.to(device), max(r for r, _ in rows))

    def select(self, keep: torch.Tensor) -> ExpertRouting:
        """The override of the tokens kept by a prefill transform."""
        return ExpertRouting(self.rank[keep], self.max_rank)


def route(
    router_logits: torch.Tensor, top_k: int, normalize: bool, routing: ExpertRouting | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (experts [T, top_k] long, weights [T, top_k] float32).

    An expert id of -1 marks a slot the token does not use (tokens routed to one expert)."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    deepest = top_k if routing is None else max(top_k, routing.max_rank)
    ranked_probs, ranked_experts = torch.topk(probs, deepest, dim=-1)
    weights, experts = ranked_probs[:, :top_k], ranked_experts[:, :top_k]
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if routing is None or routing.max_rank == 0:
        return experts, weights
    overridden = (routing.rank > 0)[:, None]
    chosen = ranked_experts.gather(1, (routing.rank - 1).clamp(min=0)[:, None])  # [T, 1]
    first_slot = torch.arange(top_k, device=experts.device) == 0
    experts = torch.where(overridden, torch.where(first_slot, chosen, -1), experts)
    weights = torch.where(overridden, first_slot.to(weights.dtype), weights)
    return experts, weights
