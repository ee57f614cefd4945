"""Classifier-free guidance for language models (Sanchez et al. 2023), as a per-request option.

Reference: transformers' `UnbatchedClassifierFreeGuidanceLogitsProcessor` (written by the
paper's first author). A guided request owns two rows, decoded in the same batch:
  main    the conditional row: the request's prompt;
  shadow  the unconditional row, with its own KV cache: the negative prompt's token ids, or
          by default the last prompt token alone; both rows append every sampled token.
Each step, on log-softmax values (transformers' exact form and operation order):
  guided = scale * (cond - uncond) + uncond
and with `rescale` phi, the std-based rescale of Lin et al. 2023 (eq. 15-16, diffusers'
`rescale_noise_cfg`; transformers has none), on the log-probabilities:
  rescaled = guided * std(cond) / std(guided);   guided' = phi * rescaled + (1 - phi) * guided
It scales the guided log-probabilities by a positive factor (a temperature that undoes guidance's
sharpening), so greedy output is unchanged and sampling is calmer.
The guided values go to the engine's sampler, so the request's temperature / top-p / penalties
apply after guidance (transformers runs the CFG processor first too) and the reported logprobs
are the guided distribution's. Scale 1 is no guidance: like transformers, no shadow row is run
and the request decodes exactly as a plain one.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from freelunch.engine.model_info import ModelInfo
from freelunch.engine.request import GenerationRequest, Sequence
from freelunch.methods import OptionError, validate_options
from freelunch.methods.pipeline import Stage, Variant
from freelunch.methods.spec import BenchCase, MethodOptions, MethodSpec, PromptField, TokenId

DEFAULT_SCALE = 1.5
MAX_SCALE = 30.0


class GuidanceOptions(MethodOptions):
    """`guidance: {"scale": 1.5, "rescale": phi | null, "negative_prompt" | "negative_messages" | "negative_prompt_ids"}`."""

    scale: float = Field(DEFAULT_SCALE, gt=0, le=MAX_SCALE, allow_inf_nan=False, description="1 = plain decoding")
    rescale: float | None = Field(None, ge=0, le=1, description="std rescale phi (Lin et al. 2023); null = none")
    negative_prompt: str | None = Field(None, description="the unconditional branch's prompt, as text")
    negative_messages: list[dict[str, Any]] | None = Field(
        None, max_length=1024, description="the unconditional branch's prompt, as chat messages (chat only)"
    )
    negative_prompt_ids: list[TokenId] | None = Field(None, description="... as token ids; none: the last prompt token")

    @model_validator(mode="after")
    def _one_negative(self) -> GuidanceOptions:
        given = [f for f in ("negative_prompt", "negative_messages", "negative_prompt_ids") if getattr(self, f) is not None]
        if len(given) > 1:
            raise PydanticCustomError("exclusive", "give only one of {fields}", {"fields": ", ".join(given), "field": given[1]})
        return self


def parse_options(raw: Any, vocab: int, max_model_len: int) -> GuidanceOptions:
    """The engine's check of validated options against the served model. The API turns
    `negative_prompt` (text) and `negative_messages` (chat) into `negative_prompt_ids` first."""
    opts = validate_options("guidance", raw, GuidanceOptions)
    if opts.negative_prompt is not None or opts.negative_messages is not None:
        raise OptionError("guidance.negative_prompt must be tokenised by the API; pass negative_prompt_ids", "guidance")
    ids = opts.negative_prompt_ids
    if ids is not None and any(t >= vocab for t in ids):
        raise OptionError(f"guidance.negative_prompt_ids must be token ids in [0, {vocab})", "guidance.negative_prompt_ids")
    if ids is not None and len(ids) >= max_model_len:
        raise OptionError(
            f"guidance.negative_prompt has {len(ids)} tokens; this model's maximum context length is {max_model_len}",
            "guidance.negative_prompt",
        )
    return opts.model_copy(update={"negative_prompt_ids": list(ids) or None}) if ids is not None else opts


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float, rescale: float | None) -> torch.Tensor:
    """Guided log-probabilities [..., vocab] from the two rows' logits [..., vocab] (transformers'
    CFG), std-rescaled by `rescale` phi (Lin et al. 2023, eq. 15-16)."""
    cond = torch.log_softmax(cond, dim=-1)
    uncond = torch.log_softmax(uncond, dim=-1)
    guided = scale * (cond - uncond) + uncond
    if rescale:
        rescaled = guided * (cond.std(dim=-1, keepdim=True) / guided.std(dim=-1, keepdim=True))
        guided = rescale * rescaled + (1 - rescale) * guided
    return guided


class ClassifierFreeGuidance(Stage):
    """Row expansion (the unconditional row) and combination (outermost: guidance over whatever
    the rows inside it combine to, e.g. SCMoE's contrast)."""

    option = "guidance"
    order = 1
    expands = True

    def __init__(self, request: GenerationRequest, main: Sequence, model_info: ModelInfo) -> None:
        opts = parse_options(request.methods["guidance"], model_info.config.vocab_size, model_info.max_model_len)
        self.options = opts
        self._variants: list[Variant] = []
        # Scale 1 is plain decoding (transformers adds no CFG processor then); a scoring-only
        # request (max_tokens 0) samples nothing to guide. Neither runs a shadow row.
        if opts.scale != 1 and request.params.max_tokens > 0:
            uncond = opts.negative_prompt_ids or [main.token_ids[-1]]
            self._variants = [Variant(), Variant(prompt=list(uncond))]

    def variants(self) -> list[Variant]:
        return self._variants

    def combine(self, logits: list[torch.Tensor]) -> tuple[torch.Tensor, None]:
        return guide(logits[0], logits[1], self.options.scale, self.options.rescale), None

    def stats(self) -> dict[str, Any]:
        return {"scale": self.options.scale}


SPEC = MethodSpec(
    option="guidance",
    options=GuidanceOptions,
    description="classifier-free guidance (Sanchez et al. 2023): stronger adherence to the prompt",
    build=ClassifierFreeGuidance,
    stages=("row_expansion", "combination"),
    prompts={"negative_prompt": PromptField("text", "negative_prompt_ids"),
             "negative_messages": PromptField("chat", "negative_prompt_ids")},
    chat_aliases=("negative_messages",),
    engines=frozenset({"native", "vllm"}),
    docs="docs/guidance.md",
    bench=BenchCase({"scale": 1.5}),
    vllm="freelunch.methods.guidance_vllm:GUIDANCE_PAIRS",  # as paired rows
)
