"""Decoding methods, each a `DecodingStrategy` registered under its request option name.

The engine asks this registry for a request's strategy; it never imports a method itself.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from freelunch.engine.request import GenerationRequest, Sequence
from freelunch.engine.strategy import DecodingStrategy

# option name -> factory(request, main_row, model_info) -> strategy
STRATEGIES: dict[str, Callable[[GenerationRequest, Sequence, Any], DecodingStrategy]] = {}


def is_finite_number(value: Any) -> bool:
    """An int or float option value that is finite (JSON `true` is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def register(option: str):
    def wrap(factory):
        STRATEGIES[option] = factory
        return factory

    return wrap


def load_builtin_methods() -> None:
    """Import the methods shipped with freelunch so that they register themselves."""
    from freelunch.methods import guidance, moe_contrast, token_recycling, visual_pruning  # noqa: F401


def build_strategy(request: GenerationRequest, main: Sequence, model_info: Any) -> DecodingStrategy:
    load_builtin_methods()
    chosen = [name for name in request.methods if name in STRATEGIES]
    unknown = [name for name in request.methods if name not in STRATEGIES]
    if unknown:
        raise ValueError(f"method option(s) not available on this engine: {', '.join(sorted(unknown))}")
    if len(chosen) > 1:
        raise ValueError(f"these options cannot be combined yet: {', '.join(sorted(chosen))}")
    if chosen:
        return STRATEGIES[chosen[0]](request, main, model_info)
    return DecodingStrategy(request, main)
