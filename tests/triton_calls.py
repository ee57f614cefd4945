"""A pytest plugin (`-p triton_calls`) for tests/test_triton_path.py's inner run: counts the calls
of the Triton kernels and writes them to $FREELUNCH_TRITON_CALLS at the end of the session."""

from __future__ import annotations

import json
import os

from freelunch.kernels import moe_triton, tree_attention_triton

CALLS = {"tree_attention": 0, "grouped_expert_mlp": 0}


def _counted(module, name: str) -> None:
    kernel = getattr(module, name)

    def call(*args, **kwargs):
        CALLS[name] += 1
        return kernel(*args, **kwargs)

    setattr(module, name, call)  # the engine imports them at call time: it gets these


_counted(tree_attention_triton, "tree_attention")
_counted(moe_triton, "grouped_expert_mlp")


def pytest_sessionfinish(session, exitstatus) -> None:
    with open(os.environ["FREELUNCH_TRITON_CALLS"], "w") as f:
        json.dump(CALLS, f)
