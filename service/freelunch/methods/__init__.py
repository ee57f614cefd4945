"""Decoding methods: each declares itself once, in its own module, with a `MethodSpec` (spec.py).

The API builds its request schema from `method_specs()`, the engine asks `build_strategy` for a
request's strategy; neither imports a method itself.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from freelunch.engine.request import GenerationRequest, Sequence
from freelunch.engine.strategy import DecodingStrategy
from freelunch.methods.spec import MethodOptions, MethodSpec

METHODS: dict[str, MethodSpec] = {}  # option name -> spec


def register(spec: MethodSpec) -> MethodSpec:
    METHODS[spec.option] = spec
    return spec


def load_builtin_methods() -> None:
    """Import the methods shipped with freelunch so that they register themselves."""
    from freelunch.methods import guidance, moe_contrast, token_recycling, visual_pruning  # noqa: F401


def method_specs() -> dict[str, MethodSpec]:
    load_builtin_methods()
    return METHODS


class OptionError(ValueError):
    """A method option the request cannot have; `param` names it (the API's `error.param`)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def validate_options(option: str, raw: Any, model: type[MethodOptions] | None = None) -> MethodOptions:
    """`raw` (a request's option value) as the method's options model; OptionError naming the field."""
    model = model or method_specs()[option].options
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        # a check across fields names the field it refuses in its context
        loc = first.get("loc") or ((first.get("ctx") or {}).get("field"),)
        where = ".".join(str(p) for p in (option, *loc) if p is not None)
        raise OptionError(f"{where}: {first.get('msg', 'invalid value')}", where) from None


def fallbacks(request: GenerationRequest) -> dict[str, str]:
    """The request's options that will not run as asked, and why."""
    specs = method_specs()
    reasons = {name: specs[name].fallback(request) for name in request.methods if name in specs and specs[name].fallback}
    return {name: reason for name, reason in reasons.items() if reason}


def build_strategy(request: GenerationRequest, main: Sequence, model_info: Any) -> DecodingStrategy:
    specs = method_specs()
    chosen = [name for name in request.methods if name in specs and not specs[name].off(request.methods[name])]
    unknown = sorted(name for name in request.methods if name not in specs)
    if unknown:
        raise OptionError(f"method option(s) not available on this engine: {', '.join(unknown)}", unknown[0])
    if len(chosen) > 1:
        raise OptionError(f"these options cannot be combined yet: {', '.join(sorted(chosen))}", sorted(chosen)[1])
    if chosen:
        try:
            return specs[chosen[0]].build(request, main, model_info)
        except OptionError:
            raise
        except ValueError as e:
            raise OptionError(str(e), chosen[0]) from e
    return DecodingStrategy(request, main)
