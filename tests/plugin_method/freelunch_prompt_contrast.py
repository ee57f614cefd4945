"""`prompt_contrast`: the next token's log-probabilities contrasted against those of a null prompt
(the prompt's first token alone), `(1 + alpha) * log p(x | prompt) - alpha * log p(x | null)`.

A third party's method in one file: a row-expanding pipeline stage (the null row) with its
combination, its options, a server flag, a metric and the engines it runs on, all in its spec.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from freelunch.methods.pipeline import Stage, Variant
from freelunch.methods.spec import BenchCase, MethodMetric, MethodOptions, MethodSpec, ServerFlag


class PromptContrastOptions(MethodOptions):
    alpha: float = Field(0.5, ge=0, le=5, description="how far from the null prompt's distribution")


class PromptContrast(Stage):
    option = "prompt_contrast"
    order = 0
    expands = True

    def __init__(self, request: Any, main: Any, model_info: Any) -> None:
        self.alpha = PromptContrastOptions.model_validate(request.methods["prompt_contrast"]).alpha
        self.steps = 0
        self._variants = [Variant(), Variant(prompt=[main.token_ids[0]])] if request.params.max_tokens > 0 else []

    def variants(self) -> list[Variant]:
        return self._variants

    def combine(self, logits: list[torch.Tensor]) -> tuple[torch.Tensor, None]:
        self.steps += 1
        cond, null = torch.log_softmax(logits[0], -1), torch.log_softmax(logits[1], -1)
        return (1 + self.alpha) * cond - self.alpha * null, None

    def stats(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "contrasted_steps": self.steps}


SPEC = MethodSpec(
    option="prompt_contrast",
    options=PromptContrastOptions,
    description="contrast against a null prompt (a test plugin)",
    build=PromptContrast,
    stages=("row_expansion", "combination"),
    flags=(
        ServerFlag(
            "--prompt-contrast", "contrast every request against a null prompt (alpha 0.5)", ("off", "on"), "off",
            lambda value: {"alpha": 0.5} if value == "on" else None,
        ),
    ),
    metrics=(
        MethodMetric(
            "freelunch_prompt_contrast_steps", "Steps whose distribution was contrasted against a null prompt",
            lambda stats: [((), stats.get("contrasted_steps", 0))],
        ),
    ),
    engines=frozenset({"native"}),
    bench=BenchCase({"alpha": 0.5}),  # `freelunch bench` measures it beside plain decoding
)
