"""What methods may know of the served model and the engine serving it: `ModelInfo`, handed to
every method's stage as it is built (engine/plugins.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from freelunch.engine.strategy import ImageEncoder


@dataclass(slots=True)
class ModelInfo:
    """What methods may know about the served model."""

    name: str
    config: object  # DecoderConfig
    hf_config: object
    tokenizer: object
    eos_token_ids: tuple[int, ...]
    max_model_len: int
    device: str
    shared_state: dict = field(default_factory=dict)  # per-model method state (e.g. draft tables)
    vision: ImageEncoder | None = None  # a vision-language model's image side
    max_num_batched_tokens: int = 0  # tokens one forward may take (a prefill transform needs the whole prompt)
    # seconds per forward of T tokens after a short context, by T (what a step of T rows costs)
    forward_cost: Callable[..., dict[int, float]] | None = None
    kv_split_layer: int | None = None  # the KV cache's layer split (see block_manager), if any
    # a request's rows may make a step cost at most this many one-token decode steps
    max_step_cost: float = float("inf")
