"""Visual token pruning as a per-request option: `visual_pruning: {"method": "fastv" | "cls", "keep": 0.5, "layer": K}`.

fastv (Chen et al. 2024; reference pkunlp-icler/FastV). The whole prompt is prefilled in one
forward; at decoder layer K - 1 the last prompt token's attention, averaged over heads, scores
the image tokens; from layer K on only the top round(N * keep) of them remain, with every text
token, at their original positions, in the hidden states and in what later layers see of the
KV cache. The image tokens of all the prompt's images compete together. A recompute after
preemption keeps the same tokens. Defaults K = 2, keep = 0.5. In a KV cache split at layer S >= K
(block_manager; S = 2 by default for vision models) the layers from S on hold only the kept tokens,
so the request is admitted, and holds blocks, for those; with S < K they are hidden, not freed.

cls (VTC-CLS; reference THU-MIG/VTC-CLS). Each image's features are scored by the vision tower's
[CLS] attention (mean over heads) summed over its layers from `layer` to the last feature layer;
the top round(T * keep) of each image stay in their original order, the rest never reach the
projector nor the language model (the prompt loses their placeholders, so positions close up, as
in the reference). Default band start: two thirds into the tower (16 of CLIP ViT-L's 24 layers).

keep = 1 prunes nothing: the request decodes exactly as a plain one.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from freelunch.engine.model_info import ModelInfo
from freelunch.engine.request import GenerationRequest, Sequence
from freelunch.engine.strategy import ImageEncoder, RowPlan
from freelunch.methods import OptionError, validate_options
from freelunch.methods.pipeline import Pipeline, Stage
from freelunch.methods.spec import BenchCase, MethodMetric, MethodOptions, MethodSpec

DEFAULT_KEEP = 0.5
DEFAULT_FASTV_LAYER = 2


class PruningOptions(MethodOptions):
    """`visual_pruning: {"method": "fastv" | "cls", "keep": 0.5, "layer": K}`."""

    method: Literal["fastv", "cls"] = Field(description="fastv: in the language model; cls: before the projector")
    keep: float = Field(DEFAULT_KEEP, gt=0, le=1, allow_inf_nan=False, description="fraction of image tokens kept")
    layer: int | None = Field(
        None, ge=0, le=1 << 16, description="fastv: decoder layer K (2); cls: first vision layer of the [CLS] band"
    )


def parse_options(raw: Any, model_info: ModelInfo) -> PruningOptions:
    """Validated options, checked against the served model (the layer filled in)."""
    vision: ImageEncoder | None = model_info.vision
    if vision is None:
        raise OptionError(f"visual_pruning needs a vision-language model; `{model_info.name}` takes no images", "visual_pruning")
    opts = validate_options("visual_pruning", raw, PruningOptions)
    if opts.method == "fastv":
        low, high = 1, model_info.config.num_layers - 1
        default = min(DEFAULT_FASTV_LAYER, high)
        what = "decoder layer"
    else:
        if not vision.has_cls_token:
            raise OptionError("visual_pruning.method cls needs a vision tower with a [CLS] token (this one has none)", "visual_pruning.method")
        low, high = 0, vision.cls_band_end - 1
        default = min(round(vision.num_vision_layers * 2 / 3), high)
        what = "vision layer"
    layer = default if opts.layer is None else opts.layer
    if not low <= layer <= high:
        raise OptionError(
            f"visual_pruning.layer ({what}) must be an integer in [{low}, {high}] for this model, not {layer}", "visual_pruning.layer"
        )
    return opts.model_copy(update={"layer": layer})


def _unpruned(encoder: ImageEncoder, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    return list(encoder.project(encoder.encode_images(pixel_values)[0]))


class VisualPruning(Stage):
    """A prefill transform of the main row."""

    option = "visual_pruning"

    def __init__(self, request: GenerationRequest, main: Sequence, options: PruningOptions) -> None:
        self.main = main
        self.options = options
        self.image_tokens = 0
        self.kept_image_tokens = 0

    def token_counts(self) -> tuple[int, int]:
        """(image tokens of the prompt, image tokens the language model kept)."""
        return self.image_tokens, self.kept_image_tokens

    def stats(self) -> dict[str, Any]:
        image_tokens, kept = self.token_counts()
        return {
            "method": self.options.method,
            "keep": self.options.keep,
            "layer": self.options.layer,
            "image_tokens": image_tokens,
            "kept_image_tokens": kept,
        }


class ClsPruning(VisualPruning):
    """VTC-CLS: the language model only ever sees the kept features."""

    def image_features(self, encoder: ImageEncoder, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        count, per_image = pixel_values.shape[0], encoder.tokens_per_image
        kept = round(per_image * self.options.keep)
        self.image_tokens += count * per_image
        self.kept_image_tokens += count * kept
        if kept == per_image:
            return _unpruned(encoder, pixel_values)
        features, scores = encoder.encode_images(pixel_values, cls_attention_from=self.options.layer)
        top = scores.topk(kept, dim=1).indices.sort(dim=1).values  # [N, kept], original order
        selected = features.gather(1, top[..., None].expand(-1, -1, features.shape[-1]))
        return list(encoder.project(selected))


class FastV(VisualPruning):
    """FastV: the prune is decided inside the prefill forward (`RowPlan.keep_select`)."""

    def __init__(
        self, request: GenerationRequest, main: Sequence, options: PruningOptions, max_batch_tokens: int, kv_split: int | None
    ) -> None:
        super().__init__(request, main, options)
        # pruned at or below the cache's split, the upper layers only ever hold the kept tokens
        self.packs_upper = options.keep < 1 and kv_split is not None and options.layer <= kv_split
        if options.keep < 1 and main.num_prompt > max_batch_tokens:
            raise ValueError(
                f"visual_pruning fastv prefills the whole prompt ({main.num_prompt} tokens) in one forward; "
                f"this server runs at most {max_batch_tokens} tokens per forward (use method cls)"
            )
        self.kept_offsets: torch.Tensor | None = None  # prompt offsets kept from layer K on, once chosen

    def _image_offsets(self) -> torch.Tensor:
        embeds = self.main.input_embeds
        return embeds.offsets if embeds is not None else torch.empty(0, dtype=torch.long)

    def image_features(self, encoder: ImageEncoder, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        features = _unpruned(encoder, pixel_values)
        if self.packs_upper:  # admitted with upper blocks for the kept tokens only
            self.main.reserve_packed(self._kept_count(sum(f.shape[0] for f in features)), self.main.num_prompt)
        return features

    def _kept_count(self, image_tokens: int) -> int:
        """Prompt tokens the prune keeps: every text token and round(N * keep) image tokens."""
        return self.main.num_prompt - image_tokens + round(image_tokens * self.options.keep)

    def main_plan(self, pipeline: Pipeline, token_budget: int) -> list[RowPlan] | None:
        main = self.main
        if self.options.keep == 1 or main.num_computed > 0 or self._image_offsets().numel() == 0:
            return None
        if token_budget < main.num_tokens:
            return []  # wait for a step with room for the whole prompt
        # from offset 0: the prompt, and after a preemption the generated tokens too
        plan = pipeline.plain_plan(main, token_budget)
        plan.drop_layer = self.options.layer
        if self.kept_offsets is None:
            plan.keep_select = self._select
        else:  # a recompute after preemption: the same tokens again, and the generated ones
            plan.keep_offsets = torch.cat([self.kept_offsets, torch.arange(main.num_prompt, len(plan.tokens))])
        if self.packs_upper:  # (again, after a preemption reset the cache state)
            kept = self._kept_count(self._image_offsets().numel()) + len(plan.tokens) - main.num_prompt
            main.reserve_packed(kept, len(plan.tokens))
        return [plan]

    def caches(self, pipeline: Pipeline, seq: Sequence) -> bool:
        # the prune is chosen from the whole prompt's attention in one forward: a pruned row
        # computes its prompt itself (a cached prefix has no attention to choose from)
        return seq is not self.main or self.options.keep == 1 or self._image_offsets().numel() == 0

    def _select(self, attention: torch.Tensor) -> torch.Tensor:
        """The last prompt token's attention over the prompt [n] -> offsets to keep (FastV's top-k)."""
        image = self._image_offsets().to(attention.device)
        self.kept_image_tokens = round(image.numel() * self.options.keep)
        keep = torch.ones(attention.numel(), dtype=torch.bool, device=attention.device)
        keep[image] = False
        keep[image[attention[image].topk(self.kept_image_tokens).indices]] = True
        self.kept_offsets = keep.nonzero().flatten().cpu()
        return self.kept_offsets

    def token_counts(self) -> tuple[int, int]:
        image_tokens = self._image_offsets().numel()
        pruned = self.kept_offsets is not None  # not when keep = 1 or without images
        return image_tokens, self.kept_image_tokens if pruned else image_tokens


def build(request: GenerationRequest, main: Sequence, model_info: ModelInfo) -> VisualPruning:
    options = parse_options(request.methods["visual_pruning"], model_info)
    if options.method == "cls":
        return ClsPruning(request, main, options)
    return FastV(request, main, options, model_info.max_num_batched_tokens, model_info.kv_split_layer)


SPEC = MethodSpec(
    option="visual_pruning",
    options=PruningOptions,
    description="FastV / [CLS] visual token pruning for vision-language models",
    build=build,
    stages=("prefill_transform",),
    requires=("vision",),
    metrics=(
        MethodMetric(
            "freelunch_visual_pruning_pruned_tokens",
            "Image tokens that visual token pruning kept from the language model",
            lambda stats: [((stats.get("method", ""),), stats.get("image_tokens", 0) - stats.get("kept_image_tokens", 0))],
            labels=("method",),
        ),
    ),
    docs="docs/visual_pruning.md",
    bench=BenchCase(None, skip="needs image inputs on a vision-language model; not measured by this benchmark"),
    # FastV's layer for a model that takes images: the KV cache splits there (engine/block_manager.py)
    kv_split_hint=lambda takes_images, layers: min(DEFAULT_FASTV_LAYER, layers - 1) if takes_images else None,
)
