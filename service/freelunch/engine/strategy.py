"""The narrow interface through which a decoding method plugs into the engine.

A request is driven by one `DecodingStrategy`. Each step the engine asks it for the rows to
run (`plan`), runs them in the shared batch, and hands back the logits it asked for
(`on_logits`). The strategy answers with either logits to sample one token from (the engine
samples all such requests together) or the tokens it decided itself (draft-and-verify).

The shapes every method needs are expressible here:
- extra rows: `rows` may hold shadow sequences with their own prompt and KV cache (a method's variants);
- draft and verify: a `RowPlan` may feed tokens that are not (yet) part of the sequence, with
  a custom attention mask and positions; `StepContext.commit_kv` then keeps the accepted ones;
- prefill transform: a `RowPlan` may ask to drop some of its tokens from a layer on, chosen
  beforehand or from the attention of the layer before;
- image inputs: `image_features` turns a request's images into embeddings for its placeholder
  tokens, and may keep fewer of them (pruning before the language model).
The engine never imports a concrete method: they are built from `freelunch.methods` registries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any, Protocol

import torch

from freelunch.engine.request import GenerationRequest, Sequence, TokenLogprob


@dataclass(slots=True)
class RowPlan:
    """What one row feeds into this step's forward."""

    seq: Sequence
    tokens: list[int]  # written to the cache at offsets [num_computed, num_computed + len)
    logits_at: list[int]  # indices into `tokens` whose logits the strategy needs
    positions: list[int] | None = None  # default: num_computed + i
    mask: torch.Tensor | None = None  # [n, num_computed + n] bool; None = causal
    advance: bool = True  # False: the strategy moves num_computed itself (after verification)
    # Prefill transform: from layer `drop_layer` on, only the token offsets (into `tokens`) in
    # `keep_offsets` remain; the dropped tokens' KV stays invisible to later layers afterwards.
    drop_layer: int | None = None
    keep_offsets: torch.Tensor | None = None
    # ... or decided in the forward itself: called with the attention of the row's last token
    # at layer `drop_layer - 1` (probabilities over the row's tokens, mean over heads, [n]), it
    # returns the offsets to keep. Whole prompt in one step, drop_layer >= 1.
    keep_select: Callable[[torch.Tensor], torch.Tensor] | None = None
    # Extra per-row model inputs a model may understand: `expert_rank` r >= 1 (models/expert_routing.py)
    # routes the row's tokens in every MoE layer to the expert its router ranks r-th, alone.
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Sampled:
    token_id: int
    logprob: TokenLogprob | None = None


class ImageEncoder(Protocol):
    """What a vision-language model offers methods: its vision tower and projector, apart."""

    image_token_id: int
    tokens_per_image: int  # placeholder tokens (= features) per image
    has_cls_token: bool  # the vision tower prepends a [CLS] token
    num_vision_layers: int
    cls_band_end: int  # vision layers before this one produce the features

    def encode_images(
        self, pixel_values: torch.Tensor, cls_attention_from: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """pixel_values [N, C, H, W] -> vision features [N, tokens_per_image, D] before the projector,
        and with `cls_attention_from` = s each feature's [CLS] attention (mean over heads) summed over
        the tower's layers [s, cls_band_end) ([N, tokens_per_image]; +inf for a [CLS] feature)."""
        ...

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Vision features [..., D] -> language-model embeddings [..., hidden]."""
        ...


class StepContext(Protocol):
    """Engine services a strategy may call while it handles a step's logits."""

    def commit_kv(self, seq: Sequence, kept_offsets: list[int]) -> None:
        """Keep the cache entries at these offsets (ascending, >= num_computed), compacted to follow
        the committed prefix; num_computed grows by len(kept_offsets); later blocks are freed."""


class DecodingStrategy:
    """Base class: plain decoding of one row. Methods subclass and override what they change."""

    # Name reported in `usage.method_stats` (None for plain decoding).
    name: str | None = None

    def __init__(self, request: GenerationRequest, main: Sequence) -> None:
        self.request = request
        self.main = main
        self.rows: list[Sequence] = [main]  # main row first; shadow rows after it
        # The request's constraint (set by the engine; None without one). The engine applies it to
        # logits returned for sampling; a strategy that decides tokens itself applies it too.
        self.constraint: Any = None

    # ---- planning ------------------------------------------------------------------------
    def plan(self, token_budget: int) -> list[RowPlan]:
        """Rows to feed this step. Default: each row's uncomputed tokens, the last chunk asking for logits."""
        plans = []
        for seq in self.rows:
            plan = self.plain_plan(seq, token_budget)
            if plan is not None:
                plans.append(plan)
                token_budget -= len(plan.tokens)
        return plans

    def plain_plan(self, seq: Sequence, token_budget: int) -> RowPlan | None:
        if seq.prefix_wait:  # another row is computing its prefix (scheduler.py)
            return None
        n = min(seq.pending, token_budget)
        if n <= 0:
            return None
        start = seq.num_computed
        tokens = seq.token_ids[start : start + n]
        logits_at = [n - 1] if start + n == seq.num_tokens else []
        if seq is self.main and self.request.params.prompt_logprobs is not None and start < seq.num_prompt:
            # every prompt position in this chunk (the logits at i score token i + 1)
            logits_at = sorted(set(range(min(n, seq.num_prompt - start))) | set(logits_at))
        return RowPlan(seq, tokens, logits_at)

    def image_features(self, encoder: ImageEncoder, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Language-model embeddings of the request's images ([k, hidden] each, k <= tokens_per_image).

        A method may keep fewer than `tokens_per_image` (pruning before the projector); the engine
        then drops that many of the image's placeholder tokens from the prompt."""
        return list(encoder.project(encoder.encode_images(pixel_values)[0]))

    def tokens_needed(self) -> int:
        """KV slots to reserve per row at admission beyond the prompt (drafts need more)."""
        return 1

    def cache_extras(self, seq: Sequence) -> dict[str, Any] | None:
        """What besides its tokens (and images) changes `seq`'s KV, for the prefix cache's key: the
        row's model inputs (a routing override). None: the row's KV is its own (never cached)."""
        return {}

    # ---- results -------------------------------------------------------------------------
    def on_logits(self, logits: dict[int, torch.Tensor], ctx: StepContext) -> torch.Tensor | list[Sampled] | None:
        """Logits per seq_id ([len(logits_at), vocab], float32) for rows that produced any.

        Return logits [vocab] to sample the next token from, the tokens decided here, or None.
        """
        out = logits.get(self.main.seq_id)
        if out is None or self.main.pending > 0:
            return None  # still prefilling
        return out[-1]

    def append(self, token_id: int) -> None:
        """A token was accepted: every row that decodes alongside the main one gets it too."""
        for seq in self.rows:
            seq.token_ids.append(token_id)

    def stats(self) -> dict[str, Any] | None:
        return None

    def method_stats(self) -> dict[str, dict[str, Any]] | None:
        """`usage.method_stats`: stats by option name (a composed strategy reports several)."""
        stats = self.stats()
        return {self.name: stats} if stats is not None and self.name else None

