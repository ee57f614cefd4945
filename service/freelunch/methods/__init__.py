"""Decoding methods: each declares itself once, in its own module, with a `MethodSpec` (spec.py).

Methods are found through the entry-point group `freelunch.methods` (name: the option, value:
`module:SPEC`). The shipped four are declared in pyproject.toml like any third party's, and
`load_methods()` reads the group once, explicitly, where a process builds its API or engine:
nothing registers as a side effect of an import, and two methods with one option name are an error,
not a silent replacement. This registry imports no torch (the API process reads it); a process that
builds engines also hands the methods to the engine (pipeline.py `install_methods()`).
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points
from typing import Any

from pydantic import ValidationError

from freelunch.engine.errors import OptionError
from freelunch.engine.messages import GenerationRequest
from freelunch.methods.spec import MethodOptions, MethodSpec

__all__ = ["ENTRY_POINT_GROUP", "METHODS", "OptionError", "fallbacks", "load_methods", "method_specs", "validate_options"]

ENTRY_POINT_GROUP = "freelunch.methods"
METHODS: dict[str, MethodSpec] = {}  # option name -> spec
_loaded = False
log = logging.getLogger("freelunch.methods")


def load_methods() -> dict[str, MethodSpec]:
    """The installed methods (once a process): each entry point of the group must name a
    MethodSpec whose option is the entry point's name."""
    global _loaded
    if _loaded:
        return METHODS
    found: dict[str, str] = {}
    for point in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda p: (p.name, p.value)):
        if point.name in found:
            raise RuntimeError(
                f"two installed methods declare the option {point.name!r}: {found[point.name]} and {point.value} "
                f"(entry-point group {ENTRY_POINT_GROUP}); uninstall one"
            )
        spec = point.load()
        if not isinstance(spec, MethodSpec) or spec.option != point.name:
            raise RuntimeError(f"entry point {point.name} = {point.value} ({ENTRY_POINT_GROUP}) is not the MethodSpec of option {point.name!r}")
        found[point.name] = point.value
        METHODS[spec.option] = spec
    if not found:
        log.warning("no decoding methods are installed (entry-point group %s): is freelunch installed?", ENTRY_POINT_GROUP)
    _loaded = True
    return METHODS


def method_specs() -> dict[str, MethodSpec]:
    return load_methods()


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
