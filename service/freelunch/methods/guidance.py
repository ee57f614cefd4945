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

import dataclasses
from typing import Any

import torch

from freelunch.engine.request import GenerationRequest, Sequence
from freelunch.engine.strategy import DecodingStrategy
from freelunch.methods import is_finite_number, register
from freelunch.methods.shadow_row import ShadowRowStrategy

DEFAULT_SCALE = 1.5
MAX_SCALE = 30.0
FIELDS = ("scale", "rescale", "negative_prompt_ids")


class GuidanceOptionsError(ValueError):
    pass


@dataclasses.dataclass(slots=True, frozen=True)
class GuidanceOptions:
    scale: float
    rescale: float | None
    negative_prompt_ids: list[int] | None  # None: the last prompt token alone


def parse_options(raw: Any, vocab: int, max_model_len: int) -> GuidanceOptions:
    """Validate `guidance: {"scale": 1.5, "rescale": phi | null, "negative_prompt_ids": [...] | null}`.

    The API layer turns `negative_prompt` (text) and `negative_messages` (chat) into
    `negative_prompt_ids` before the request reaches the engine.
    """
    if not isinstance(raw, dict):
        raise GuidanceOptionsError("guidance must be an object")
    for name in raw:
        if name in ("negative_prompt", "negative_messages"):
            raise GuidanceOptionsError(
                f"guidance.{name} must be tokenised by the API layer; pass guidance.negative_prompt_ids"
            )
        if name not in FIELDS:
            raise GuidanceOptionsError(
                f"guidance.{name} is not a known field "
                "(known: scale, rescale, negative_prompt, negative_messages, negative_prompt_ids)"
            )
    scale = raw.get("scale", DEFAULT_SCALE)
    if not is_finite_number(scale) or not 0 < scale <= MAX_SCALE:
        raise GuidanceOptionsError(f"guidance.scale must be a number in (0, {MAX_SCALE:g}], not {scale!r}")
    rescale = raw.get("rescale")
    if rescale is not None and (not is_finite_number(rescale) or not 0 <= rescale <= 1):
        raise GuidanceOptionsError(f"guidance.rescale must be a number in [0, 1] or null, not {rescale!r}")
    ids = raw.get("negative_prompt_ids")
    if ids is not None:
        valid = lambda t: isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab  # noqa: E731
        if not isinstance(ids, list) or not all(valid(t) for t in ids):
            raise GuidanceOptionsError(f"guidance.negative_prompt_ids must be a list of token ids in [0, {vocab})")
        if len(ids) >= max_model_len:
            raise GuidanceOptionsError(
                f"guidance.negative_prompt has {len(ids)} tokens; this model's maximum context length is {max_model_len}"
            )
        ids = list(ids) or None  # "" / [] = the default unconditional prompt
    return GuidanceOptions(float(scale), None if rescale is None else float(rescale), ids)


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float, rescale: float | None) -> torch.Tensor:
    """Guided log-probabilities [vocab] from the two rows' logits [vocab] (transformers' CFG),
    std-rescaled by `rescale` phi (Lin et al. 2023, eq. 15-16)."""
    cond = torch.log_softmax(cond, dim=-1)
    uncond = torch.log_softmax(uncond, dim=-1)
    guided = scale * (cond - uncond) + uncond
    if rescale:
        rescaled = guided * (cond.std() / guided.std())
        guided = rescale * rescaled + (1 - rescale) * guided
    return guided


class ClassifierFreeGuidance(ShadowRowStrategy):
    name = "guidance"

    def __init__(self, request: GenerationRequest, main: Sequence, model_info: Any) -> None:
        super().__init__(request, main)
        opts = parse_options(request.methods["guidance"], model_info.config.vocab_size, model_info.max_model_len)
        self.options = opts
        # Scale 1 is plain decoding (transformers adds no CFG processor then); a scoring-only
        # request (max_tokens 0) samples nothing to guide. Neither runs a shadow row.
        if opts.scale != 1 and request.params.max_tokens > 0:
            uncond = opts.negative_prompt_ids or [main.token_ids[-1]]
            self.add_shadow(Sequence(list(uncond), len(uncond)))
            # The shadow row appends every output token too: the request ends (`length`) when
            # either row would pass the context limit.
            room = model_info.max_model_len - len(uncond)
            if request.params.max_tokens > room:
                request.params = dataclasses.replace(request.params, max_tokens=room)

    def combine(self, main_logits: torch.Tensor, shadow_logits: torch.Tensor) -> torch.Tensor:
        return guide(main_logits, shadow_logits, self.options.scale, self.options.rescale)

    def stats(self) -> dict[str, Any]:
        return {"scale": self.options.scale} | self.shadow_stats()


@register("guidance")
def build(request: GenerationRequest, main: Sequence, model_info: Any) -> DecodingStrategy:
    return ClassifierFreeGuidance(request, main, model_info)
