"""A method lives in one place: outside its own module, the package names no method option.

Each option name (from the installed specs) is looked for in every module of the package but the
method's own, the spec registry (methods/__init__.py, spec.py, pipeline.py: the interface) and
the modules listed in KNOWN, the ownership that has not moved yet (issue 30), each with why. A
new mention elsewhere fails; a module that no longer names an option must leave KNOWN.
"""

from __future__ import annotations

import re
from pathlib import Path

from freelunch.methods import method_specs

PACKAGE = Path(__import__("freelunch").__file__).parent
INTERFACE = {"methods/__init__.py", "methods/spec.py", "methods/pipeline.py"}
# modules still holding a method's knowledge, by option
KNOWN = {
    "backends/vllm_engine.py": {"guidance"},  # vLLM's paired rows: no vLLM hook in the spec yet
    "backends/vllm_guidance.py": {"guidance", "speculative"},  # the same, and "vLLM speculative decoding" (vLLM's)
}


def _mentions() -> dict[str, set[str]]:
    options = set(method_specs())
    owners = {Path(spec.build.__module__.replace(".", "/") + ".py").relative_to("freelunch").as_posix() for spec in method_specs().values()}
    found: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in INTERFACE or rel in owners or rel.startswith("methods/tree_"):  # the Token Recycling module's own helpers
            continue
        text = path.read_text()
        hits = {o for o in options if re.search(rf"\b{o}\b", text)}
        if hits:
            found[rel] = hits
    return found


def test_no_module_outside_a_method_names_its_option():
    found = _mentions()
    new = {m: hits - KNOWN.get(m, set()) for m, hits in found.items() if hits - KNOWN.get(m, set())}
    assert not new, f"method options named outside their modules: {new}"
    moved = {m: names - found.get(m, set()) for m, names in KNOWN.items() if names - found.get(m, set())}
    assert not moved, f"no longer named there, take them out of KNOWN: {moved}"
