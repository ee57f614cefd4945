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
# option name -> why a request with these parameters decodes without the method (None: it does not)
FALLBACKS: dict[str, Callable[[GenerationRequest], str | None]] = {}


def is_finite_number(value: Any) -> bool:
    """An int or float option value that is finite (JSON `true` is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def register(option: str, fallback: Callable[[GenerationRequest], str | None] | None = None):
    def wrap(factory):
        STRATEGIES[option] = factory
        if fallback is not None:
            FALLBACKS[option] = fallback
        return factory

    return wrap


def fallbacks(request: GenerationRequest) -> dict[str, str]:
    """The request's options that will not run as asked, and why (known before it runs, so that the
    API can say so in a response header as well as in `usage.method_stats`)."""
    load_builtin_methods()
    reasons = {name: FALLBACKS[name](request) for name in request.methods if name in FALLBACKS}
    return {name: reason for name, reason in reasons.items() if reason}


def load_builtin_methods() -> None:
    """Import the methods shipped with freelunch so that they register themselves."""
    from freelunch.methods import guidance, moe_contrast, token_recycling, visual_pruning  # noqa: F401


class OptionError(ValueError):
    """A method option the request cannot have; `param` names it (the API's `error.param`)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def build_strategy(request: GenerationRequest, main: Sequence, model_info: Any) -> DecodingStrategy:
    load_builtin_methods()
    chosen = [name for name in request.methods if name in STRATEGIES]
    unknown = sorted(name for name in request.methods if name not in STRATEGIES)
    if unknown:
        raise OptionError(f"method option(s) not available on this engine: {', '.join(unknown)}", unknown[0])
    if len(chosen) > 1:
        raise OptionError(f"these options cannot be combined yet: {', '.join(sorted(chosen))}", sorted(chosen)[1])
    if chosen:
        try:
            return STRATEGIES[chosen[0]](request, main, model_info)
        except OptionError:
            raise
        except ValueError as e:
            raise OptionError(str(e), chosen[0]) from e
    return DecodingStrategy(request, main)
