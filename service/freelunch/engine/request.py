"""Engine-side request records: sampling parameters, sequences (rows), outputs."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # top-k logprobs per generated token (0 = only the chosen token)
    prompt_logprobs: int | None = None  # same for prompt tokens (completions `echo`)
    include_stop_str_in_output: bool = False

    @property
    def greedy(self) -> bool:
        # As vLLM: below 1e-5 the temperature-scaled logits overflow, and the argmax is the limit anyway.
        return self.temperature < 1e-5 or self.top_k == 1

    @property
    def penalised(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0


class FinishReason(str, enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"


_seq_ids = itertools.count()

# dtypes an image's pixel values may arrive in (what image processors return)
_PIXEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(slots=True)
class ImageInput:
    """One image as the checkpoint's image processor left it: pixel values [C, H, W], carried as
    raw bytes so that a request crosses the worker pipe as msgpack (no tensors, no pickle)."""

    pixel_values: bytes
    shape: list[int]
    dtype: str = "float32"

    @classmethod
    def from_tensor(cls, pixels: torch.Tensor) -> ImageInput:
        dtype = str(pixels.dtype).removeprefix("torch.")
        if dtype not in _PIXEL_DTYPES:
            raise ValueError(f"pixel values must be one of {sorted(_PIXEL_DTYPES)}, not {dtype}")
        flat = pixels.detach().cpu().contiguous().view(-1).view(torch.uint8)
        return cls(flat.numpy().tobytes(), list(pixels.shape), dtype)

    def tensor(self) -> torch.Tensor:
        """The pixel values; ValueError when the bytes do not match the declared shape and dtype."""
        dtype = _PIXEL_DTYPES.get(self.dtype)
        if dtype is None or not self.shape or any(d <= 0 for d in self.shape):
            raise ValueError(f"bad image tensor: dtype {self.dtype!r}, shape {self.shape}")
        count = 1
        for d in self.shape:
            count *= d
        if count * dtype.itemsize != len(self.pixel_values):
            raise ValueError(f"image tensor of shape {self.shape} ({self.dtype}) has {len(self.pixel_values)} bytes")
        return torch.frombuffer(bytearray(self.pixel_values), dtype=dtype).view(self.shape)


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
    # Tokens pruned at prefill (FastV): from layer `pruned_from` on, only the offsets below
    # `pruned_base` in `pruned_kept` remain (and every offset from `pruned_base` on). When the
    # cache's split is at or above that layer, the upper table holds just those ("packed").
    pruned_from: int | None = None
    pruned_kept: torch.Tensor | None = None
    pruned_base: int = 0
    upper_packed: bool = False
    upper_reserved: int = 0  # packed upper entries held for a prune not yet run (its kept count)
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
        self.pruned_from = self.pruned_kept = None
        self.pruned_base, self.upper_packed, self.upper_reserved = 0, False, 0

    def reserve_packed(self, count: int, base: int) -> None:
        """A prune of offsets [0, base) down to `count` will run below the cache's split: size the
        upper table for that many from the start (it never holds the rest)."""
        self.upper_packed, self.upper_reserved, self.pruned_base = True, count, base

    def prune(self, layer: int, kept: torch.Tensor, base: int, packed: bool) -> None:
        """From `layer` on, offsets below `base` other than `kept` (ascending) are gone."""
        self.pruned_from, self.pruned_kept, self.pruned_base, self.upper_packed = layer, kept, base, packed

    def pruned_offsets(self) -> torch.Tensor:
        """The offsets that layers from `pruned_from` on no longer see."""
        gone = torch.ones(self.pruned_base, dtype=torch.bool)
        gone[self.pruned_kept] = False
        return gone.nonzero().flatten()

    def upper_order(self, end: int) -> torch.Tensor:
        """Offsets in [0, end) in the order the upper table holds them."""
        if not self.upper_packed:
            return torch.arange(end)
        return torch.cat([self.pruned_kept, torch.arange(self.pruned_base, end)])

    def upper_count(self, end: int) -> int:
        """How many of the offsets in [0, end) the upper table holds."""
        if not self.upper_packed:
            return end
        kept = self.pruned_kept.numel() if self.pruned_kept is not None else self.upper_reserved
        return kept + max(0, end - self.pruned_base)


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), best first


@dataclass(slots=True)
class ConstraintSpec:
    """What the next tokens must follow, as the API validated it: `kind` is json_schema (value:
    the schema's JSON), json_object, regex, choice (value: a JSON list of strings), grammar
    (EBNF or Lark) or structural_tag (value: its JSON). Compiled where it runs (constraints/)."""

    kind: str
    value: str = ""
    # JSON: the whitespace between tokens (constraints/json_layout.py: single, compact or any)
    whitespace: str = "single"
    # JSON: characters a string may run to before only its closing quote may follow (0: no bound);
    # enforced on the output's text, not in the grammar (constraints/__init__.py StringBound)
    max_string: int = 0


@dataclass(slots=True)
class GenerationRequest:
    """What the API hands the pool: one choice of one user request."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    methods: dict[str, Any] = field(default_factory=dict)  # option name -> validated options
    arrival_time: float = field(default_factory=time.monotonic)
    model: str | None = None
    images: list[ImageInput] = field(default_factory=list)  # in the order of their placeholders
    # who sent it (the API key's id, None without keys): state kept across requests (draft tables,
    # cached prefixes) is never shared between tenants
    tenant: str | None = None
    # constraints on the selected tokens: a grammar, and OpenAI's logit_bias (token id -> bias)
    constraint: ConstraintSpec | None = None
    logit_bias: dict[int, float] | None = None


@dataclass(slots=True)
class RequestOutput:
    """A delta of one request's generation: new tokens and text since the previous output."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    method_stats: dict[str, Any] | None = None
    error: str | None = None  # the engine gave up on the request: the worker fails it with this message
