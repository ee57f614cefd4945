"""Which experts each token of a packed batch uses in a sparse MoE layer.

`route` is the router of transformers' MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE):
softmax over the router logits in float32, top-k, renormalised to sum 1 where the model says so.
`ExpertRouting` overrides it per token, so that rows with different routing share one forward:
a token with rank r >= 1 uses only the expert its router ranks r-th (1-based: r = 1 is the
router's first choice), with weight 1 (a method's weak row is such a row); a token may also
have its own top-k (a method's strong routing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# RowPlan.extras keys: the row's expert rank (0 or absent = the router's own top-k), and its own
# top-k (0 or absent = the model's).
EXPERT_RANK = "expert_rank"
EXPERT_TOP_K = "expert_top_k"


@dataclass(slots=True)
class ExpertRouting:
    """Per packed token: rank 0 = the router's top-k (the token's own `top_k` if > 0, else the
    model's); rank r >= 1 = only the expert of router rank r, weight 1."""

    rank: torch.Tensor  # [T] long
    top_k: torch.Tensor  # [T] long, 0 = the model's top-k
    max_rank: int  # max(rank), kept on the host so that routing needs no device sync
    max_top_k: int  # max(top_k), likewise

    @classmethod
    def from_rows(cls, rows: list[tuple[int, int, int]], device: torch.device) -> ExpertRouting | None:
        """(rank, top_k, token count) of each row in packing order; None when every row routes by default."""
        if not any(rank or top_k for rank, top_k, _ in rows):
            return None
        rank = torch.cat([torch.full((n,), r, dtype=torch.long) for r, _, n in rows])
        top_k = torch.cat([torch.full((n,), k, dtype=torch.long) for _, k, n in rows])
        return cls(rank.to(device), top_k.to(device), max(r for r, _, _ in rows), max(k for _, k, _ in rows))

    def select(self, keep: torch.Tensor) -> ExpertRouting:
        """The override of the tokens kept by a prefill transform."""
        return ExpertRouting(self.rank[keep], self.top_k[keep], self.max_rank, self.max_top_k)


def route(
    router_logits: torch.Tensor, top_k: int, normalize: bool, routing: ExpertRouting | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (experts [T, k] long, weights [T, k] float32), k = the largest top-k.

    An expert id of -1 marks a slot the token does not use (tokens routed to fewer experts)."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    if routing is None:
        weights, experts = torch.topk(probs, top_k, dim=-1)
        if normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return experts, weights
    slots = max(top_k, routing.max_top_k)
    ranked_probs, ranked_experts = torch.topk(probs, max(slots, routing.max_rank), dim=-1)
    # each token's own top-k: slots past it are unused
    k = torch.where(routing.top_k > 0, routing.top_k, top_k)[:, None]
    used = torch.arange(slots, device=probs.device) < k  # [T, slots]
    weights = torch.where(used, ranked_probs[:, :slots], 0.0)
    experts = torch.where(used, ranked_experts[:, :slots], -1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if routing.max_rank == 0:
        return experts, weights
    overridden = (routing.rank > 0)[:, None]
    chosen = ranked_experts.gather(1, (routing.rank - 1).clamp(min=0)[:, None])  # [T, 1]
    first_slot = torch.arange(slots, device=experts.device) == 0
    experts = torch.where(overridden, torch.where(first_slot, chosen, -1), experts)
    weights = torch.where(overridden, first_slot.to(weights.dtype), weights)
    return experts, weights
