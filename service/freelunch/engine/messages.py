"""What crosses the process boundary between the API and an engine worker: a request's choice in
(`GenerationRequest` with its `SamplingParams`, images, constraint), its deltas out
(`RequestOutput`). Torch-free (pyproject.toml's import contract), so the API's request building and
the worker pipe's codec (pool/wire.py) need no tensor library; the engine's own state is in
engine/request.py.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any


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


# dtypes an image's pixel values may arrive in (what image processors return)
PIXEL_DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}  # name -> bytes an element


@dataclass(slots=True)
class ImageInput:
    """One image as the checkpoint's image processor left it: pixel values [C, H, W], carried as
    raw bytes so that a request crosses the worker pipe as msgpack (no tensors, no pickle); made
    by the API (api/images.py `image_input`), read by the engine (engine/request.py `image_tensor`)."""

    pixel_values: bytes
    shape: list[int]
    dtype: str = "float32"


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
    # enforced on the output's text, not in the grammar (constraints/masks.py StringBound)
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
