"""SCMoE self-contrast decoding for Mixture-of-Experts models (Shi et al. 2024), as a per-request option.

Reference: DavidFanzz/SCMoE, `decodingmethod/moe_utils.py` (see METHODS.md). A request owns two
rows of the same prompt, decoded in the same batch, each with its own KV cache:
  main    the strong branch: the model's own routing (top-2 for Mixtral), or `strong_top_k`
          experts per token (the router's top choices, renormalised as the model does);
  shadow  the weak branch: in every MoE layer each token uses only the expert its router ranks
          `weak_rank`-th (1-based, so the paper's k = 2 is the second choice), with weight 1.
          A shared expert (Qwen2-MoE) stays on: it is not routed.
Each step, with s and w the two rows' log-softmax values (temperature 1):
  d = (1 + beta) * s - beta * w   on the plausible tokens {x : s(x) >= log(alpha) + max s}, -inf elsewhere.
d goes to the engine's sampler, so greedy picks its argmax and sampling parameters apply after the
contrast (reported logprobs are d's distribution). EOS is never blocked (the reference code blocks
it; a server must let a request end). beta = 0 is plain decoding: no shadow row is run.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field

from freelunch.engine.request import GenerationRequest, Sequence
from freelunch.engine.strategy import RowPlan
from freelunch.methods import OptionError, register, validate_options
from freelunch.methods.shadow_row import ShadowRowStrategy
from freelunch.methods.spec import MethodOptions, MethodSpec
from freelunch.models.expert_routing import EXPERT_RANK, EXPERT_TOP_K

DEFAULT_BETA = 0.5
DEFAULT_ALPHA = 0.1
DEFAULT_WEAK_RANK = 2
MAX_BETA = 10.0


class MoeContrastOptions(MethodOptions):
    """`moe_contrast: {"beta": 0.5, "alpha": 0.1, "weak_rank": 2, "strong_top_k": null}`."""

    beta: float = Field(DEFAULT_BETA, ge=0, le=MAX_BETA, allow_inf_nan=False, description="0 = plain decoding")
    alpha: float = Field(DEFAULT_ALPHA, ge=0, le=1, allow_inf_nan=False, description="plausibility cut-off")
    weak_rank: int = Field(DEFAULT_WEAK_RANK, ge=1, le=1 << 16, description="the weak branch's expert: router rank, 1-based")
    strong_top_k: int | None = Field(None, ge=1, le=1 << 16, description="experts per token of the strong branch; null: the model's")


def parse_options(raw: Any, model_info: Any) -> MoeContrastOptions:
    """Validated options, checked against the served model."""
    moe = model_info.config.moe
    if moe is None:
        raise OptionError(f"moe_contrast needs a Mixture-of-Experts model; the model `{model_info.name}` is dense", "moe_contrast")
    opts = validate_options("moe_contrast", raw, MoeContrastOptions)
    if opts.weak_rank > moe.num_experts:
        raise OptionError(
            f"moe_contrast.weak_rank must be in [1, {moe.num_experts}] (this model has {moe.num_experts} experts), "
            f"not {opts.weak_rank}",
            "moe_contrast.weak_rank",
        )
    if opts.strong_top_k is not None and opts.strong_top_k > moe.num_experts:
        raise OptionError(
            f"moe_contrast.strong_top_k must be null or in [1, {moe.num_experts}], not {opts.strong_top_k}",
            "moe_contrast.strong_top_k",
        )
    return opts.model_copy(update={"strong_top_k": None if opts.strong_top_k == moe.top_k else opts.strong_top_k})


# With a constraint on top (a grammar), implausible tokens are pushed this far down instead of to
# -inf: the same selection whenever the grammar allows a plausible token (exp(-1e4) is 0 in float32),
# and the grammar's best implausible token, by contrast score, when it allows none.
SOFT_MASK = 1e4


def contrast(strong: torch.Tensor, weak: torch.Tensor, beta: float, alpha: float, soft: bool = False) -> torch.Tensor:
    """SCMoE scores [vocab] from the strong and weak rows' logits [vocab]; implausible tokens -inf
    (`soft`: SOFT_MASK below their score).

    alpha = 0 keeps every token plausible. The strong argmax is always plausible."""
    s = torch.log_softmax(strong, dim=-1)
    w = torch.log_softmax(weak, dim=-1)
    scores = (1 + beta) * s - beta * w
    if alpha > 0:
        implausible = s < s.max() + math.log(alpha)
        scores = torch.where(implausible, scores - SOFT_MASK, scores) if soft else scores.masked_fill(implausible, -math.inf)
    return scores


class MoeContrast(ShadowRowStrategy):
    name = "moe_contrast"

    def __init__(self, request: GenerationRequest, main: Sequence, model_info: Any) -> None:
        super().__init__(request, main)
        self.options = parse_options(request.methods["moe_contrast"], model_info)
        # beta 0 is plain decoding; a scoring-only request (max_tokens 0) samples nothing.
        # The weak row has the main row's length, so it needs no room of its own.
        if self.options.beta != 0 and request.params.max_tokens > 0:
            self.add_shadow(Sequence(list(main.token_ids), main.num_prompt))

    def plain_plan(self, seq: Sequence, token_budget: int) -> RowPlan | None:
        plan = super().plain_plan(seq, token_budget)
        # The weak row's prompt is routed weakly too: its KV cache is the weak model's (never
        # shareable with the main row's, although the tokens are the same).
        if plan is not None and seq is self.shadow:
            plan.extras[EXPERT_RANK] = self.options.weak_rank
        elif plan is not None and self.options.strong_top_k is not None:
            plan.extras[EXPERT_TOP_K] = self.options.strong_top_k
        return plan

    def combine(self, main_logits: torch.Tensor, shadow_logits: torch.Tensor) -> torch.Tensor:
        soft = self.constraint is not None  # the grammar must keep a token to choose
        return contrast(main_logits, shadow_logits, self.options.beta, self.options.alpha, soft)

    def stats(self) -> dict[str, Any]:
        opts = self.options
        stats = {"beta": opts.beta, "alpha": opts.alpha, "weak_rank": opts.weak_rank} | self.shadow_stats()
        return stats | ({"strong_top_k": opts.strong_top_k} if opts.strong_top_k is not None else {})


SPEC = register(
    MethodSpec(
        option="moe_contrast",
        options=MoeContrastOptions,
        description="SCMoE self-contrast (Shi et al. 2024) for Mixture-of-Experts models",
        build=MoeContrast,
    )
)
