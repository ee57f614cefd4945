"""Decoding methods: each declares itself once, in its own module, with a `MethodSpec` (spec.py).

Importing this package registers the shipped methods, here (the API builds its request schema
from `method_specs()`) and in the engine's plugin registry (engine/plugins.py); neither imports a
method itself.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from freelunch.engine import plugins
from freelunch.engine.errors import OptionError
from freelunch.engine.request import GenerationRequest
from freelunch.methods.spec import MethodOptions, MethodSpec

__all__ = ["METHODS", "OptionError", "fallbacks", "method_specs", "register", "validate_options"]

METHODS: dict[str, MethodSpec] = {}  # option name -> spec


def register(spec: MethodSpec) -> MethodSpec:
    METHODS[spec.option] = spec
    plugins.STRATEGIES[spec.option] = spec
    return spec


def method_specs() -> dict[str, MethodSpec]:
    return METHODS


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




def _compose(request: GenerationRequest, main: Any, model_info: Any, stages: list[Any]) -> Any:
    from freelunch.methods.pipeline import Pipeline

    return Pipeline(request, main, model_info, stages)


plugins.COMPOSERS.append(_compose)

# The shipped methods register themselves (after `register` exists: they import it).
from freelunch.methods import guidance, moe_contrast, token_recycling, visual_pruning  # noqa: E402, F401
