"""SCMoE self-contrast decoding for Mixture-of-Experts models (Shi et al. 2024), as a per-request option.

Reference: DavidFanzz/SCMoE, `decodingmethod/moe_utils.py` (docs/moe_contrast.md). A request owns two
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

from freelunch.engine.model_info import ModelInfo
from freelunch.engine.request import GenerationRequest, Sequence
from freelunch.methods import OptionError, validate_options
from freelunch.methods.pipeline import Stage, Variant
from freelunch.methods.spec import BenchCase, MethodOptions, MethodSpec
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


def parse_options(raw: Any, model_info: ModelInfo) -> MoeContrastOptions:
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


def contrast(strong: torch.Tensor, weak: torch.Tensor, beta: float, alpha: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SCMoE scores [..., vocab] from the strong and weak rows' logits, and the implausible tokens
    (True; None when alpha is 0: every token is plausible). The strong argmax is always plausible."""
    s = torch.log_softmax(strong, dim=-1)
    w = torch.log_softmax(weak, dim=-1)
    scores = (1 + beta) * s - beta * w
    if alpha <= 0:
        return scores, None
    return scores, s < s.max(dim=-1, keepdim=True).values + math.log(alpha)


class MoeContrast(Stage):
    """Row expansion (the weak row: same prompt, weak routing) and combination (innermost)."""

    option = "moe_contrast"
    order = 0
    expands = True

    def __init__(self, request: GenerationRequest, main: Sequence, model_info: ModelInfo) -> None:
        self.options = opts = parse_options(request.methods["moe_contrast"], model_info)
        # The strong branch's routing (the model's own, or `strong_top_k` experts), on every row
        # that is not weak; the weak row's prompt is routed weakly too: its KV cache is the weak
        # model's (never shareable with the main row's, although the tokens are the same).
        strong = Variant(extras={EXPERT_TOP_K: opts.strong_top_k} if opts.strong_top_k is not None else {})
        self._variants = [strong] if strong.extras else []
        # beta 0 is plain decoding; a scoring-only request (max_tokens 0) samples nothing
        if opts.beta != 0 and request.params.max_tokens > 0:
            self._variants = [strong, Variant(extras={EXPERT_RANK: opts.weak_rank})]

    def variants(self) -> list[Variant]:
        return self._variants

    def combine(self, logits: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if len(logits) == 1:  # only the strong routing changed: no contrast
            return logits[0], None
        return contrast(logits[0], logits[1], self.options.beta, self.options.alpha)

    def stats(self) -> dict[str, Any]:
        opts = self.options
        stats = {"beta": opts.beta, "alpha": opts.alpha, "weak_rank": opts.weak_rank}
        return stats | ({"strong_top_k": opts.strong_top_k} if opts.strong_top_k is not None else {})


SPEC = MethodSpec(
    option="moe_contrast",
    options=MoeContrastOptions,
    description="SCMoE self-contrast (Shi et al. 2024) for Mixture-of-Experts models",
    build=MoeContrast,
    stages=("row_expansion", "combination"),
    requires=("moe",),
    docs="docs/moe_contrast.md",
    bench=BenchCase({"beta": 0.5}),
)
