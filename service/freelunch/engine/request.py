"""Engine-side request records: sequences (rows) and their inputs; the wire types (engine/messages.py) under the names the engine has always used."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch

from freelunch.engine.messages import (  # noqa: F401 - the engine's names for the wire types
    PIXEL_DTYPES,
    ConstraintSpec,
    FinishReason,
    GenerationRequest,
    ImageInput,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
)

_seq_ids = itertools.count()


def image_tensor(image: ImageInput) -> torch.Tensor:
    """An image's pixel values; ValueError when the bytes do not match the declared shape and dtype."""
    itemsize = PIXEL_DTYPES.get(image.dtype)
    if itemsize is None or not image.shape or any(d <= 0 for d in image.shape):
        raise ValueError(f"bad image tensor: dtype {image.dtype!r}, shape {image.shape}")
    if math.prod(image.shape) * itemsize != len(image.pixel_values):
        raise ValueError(f"image tensor of shape {image.shape} ({image.dtype}) has {len(image.pixel_values)} bytes")
    return torch.frombuffer(bytearray(image.pixel_values), dtype=getattr(torch, image.dtype)).view(image.shape)

@dataclass(slots=True)
class InputEmbeds:
    """Embeddings that replace a row's token embeddings at some offsets (image features at their
    placeholder tokens). Kept on the row, so a recompute after preemption feeds them again."""

    offsets: torch.Tensor  # [k] ascending token offsets
    values: torch.Tensor  # [k, hidden]

    def between(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(offsets - start, values) of the entries in [start, end)."""
        lo, hi = torch.searchsorted(self.offsets, torch.tensor([start, end])).tolist()
        return self.offsets[lo:hi] - start, self.values[lo:hi]



@dataclass(slots=True)
class Sequence:
    """One row of the batch: tokens, how many have K/V in the cache, and its blocks."""

    token_ids: list[int]
    num_prompt: int
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    num_computed: int = 0  # tokens whose K/V is in the cache
    block_table: list[int] = field(default_factory=list)  # the layers below the cache's split (all without one)
    upper_table: list[int] = field(default_factory=list)  # the layers from the split on
    # Tokens dropped at prefill (a prefill transform): from layer `dropped_from` on, only the offsets below
    # `drop_base` in `drop_kept` remain (and every offset from `drop_base` on). When the
    # cache's split is at or above that layer, the upper table holds just those ("packed").
    dropped_from: int | None = None
    drop_kept: torch.Tensor | None = None
    drop_base: int = 0
    upper_packed: bool = False
    upper_reserved: int = 0  # packed upper entries held for a drop not yet run (its kept count)
    input_embeds: InputEmbeds | None = None
    # prefix caching (block_manager.py): what besides its tokens changes this row's KV (None: never
    # cached), the names of its full blocks, how many are registered, and the tokens found cached
    cache_key: bytes | None = None
    block_keys: list[bytes] = field(default_factory=list)
    hashed_blocks: int = 0
    num_cached: int | None = None  # tokens found cached when the row first started
    prefix_wait: bool = False  # another row is computing this row's first block: wait, then reuse it

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt :]

    @property
    def pending(self) -> int:
        return len(self.token_ids) - self.num_computed

    def reset_cache_state(self) -> None:
        """After preemption: everything must be recomputed."""
        self.num_computed = self.hashed_blocks = 0
        self.block_table, self.upper_table = [], []
        self.dropped_from = self.drop_kept = None
        self.drop_base, self.upper_packed, self.upper_reserved = 0, False, 0

    def reserve_packed(self, count: int, base: int) -> None:
        """A drop of offsets [0, base) down to `count` will run below the cache's split: size the
        upper table for that many from the start (it never holds the rest)."""
        self.upper_packed, self.upper_reserved, self.drop_base = True, count, base

    def drop_tokens(self, layer: int, kept: torch.Tensor, base: int, packed: bool) -> None:
        """From `layer` on, offsets below `base` other than `kept` (ascending) are gone."""
        self.dropped_from, self.drop_kept, self.drop_base, self.upper_packed = layer, kept, base, packed

    def dropped_offsets(self) -> torch.Tensor:
        """The offsets that layers from `dropped_from` on no longer see."""
        gone = torch.ones(self.drop_base, dtype=torch.bool)
        gone[self.drop_kept] = False
        return gone.nonzero().flatten()

    def upper_order(self, end: int) -> torch.Tensor:
        """Offsets in [0, end) in the order the upper table holds them."""
        if not self.upper_packed:
            return torch.arange(end)
        return torch.cat([self.drop_kept, torch.arange(self.drop_base, end)])

    def upper_count(self, end: int) -> int:
        """How many of the offsets in [0, end) the upper table holds."""
        if not self.upper_packed:
            return end
        kept = self.drop_kept.numel() if self.drop_kept is not None else self.upper_reserved
        return kept + max(0, end - self.drop_base)
