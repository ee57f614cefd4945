"""A method lives in one place: outside its own module, the package names no method option.

Each option name (from the installed specs) is looked for in every module of the package, a
method's own modules allowed to name their own option only, but the spec registry (methods/__init__.py, spec.py, pipeline.py: the interface) and
the modules listed in KNOWN (none now: it names any that a change cannot move at once, with why).
A new mention elsewhere fails; a module that no longer names an option must leave KNOWN.
"""

from __future__ import annotations

import re
from pathlib import Path

from freelunch.methods import method_specs

PACKAGE = Path(__import__("freelunch").__file__).parent
INTERFACE = {"methods/__init__.py", "methods/spec.py", "methods/pipeline.py"}
# modules still holding a method's knowledge, by option
KNOWN: dict[str, set[str]] = {}


def _mentions() -> dict[str, set[str]]:
    """Module -> the options it names that are not its own."""
    specs = method_specs()
    owner: dict[str, str] = {}  # module -> the option it belongs to
    for option, spec in specs.items():
        for module in [spec.build.__module__] + ([spec.vllm.split(":")[0]] if spec.vllm else []):  # and its vLLM side
            owner[Path(module.replace(".", "/") + ".py").relative_to("freelunch").as_posix()] = option
    found: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in INTERFACE:
            continue
        mine = owner.get(rel) or ("speculative" if rel.startswith("methods/tree_") else None)  # Token Recycling's helpers
        text = path.read_text()
        hits = {o for o in specs if o != mine and re.search(rf"\b{o}\b", text)}
        if hits:
            found[rel] = hits
    return found


def test_no_module_outside_a_method_names_its_option():
    found = _mentions()
    new = {m: hits - KNOWN.get(m, set()) for m, hits in found.items() if hits - KNOWN.get(m, set())}
    assert not new, f"method options named outside their modules: {new}"
    moved = {m: names - found.get(m, set()) for m, names in KNOWN.items() if names - found.get(m, set())}
    assert not moved, f"no longer named there, take them out of KNOWN: {moved}"
