"""What machine a benchmark ran on (every results file records it): the CPU's name and its
instruction-set features, as the server reports them (freelunch.cpu_features)."""

from __future__ import annotations

import os

from freelunch.cpu_features import cpu_features, cpu_name, isa_level


def machine() -> dict:
    return {"cpu": cpu_name(), "isa": isa_level(), "features": cpu_features(), "cores": os.cpu_count()}


def run_child(cmd: list[str], stdin: str | None = None, env: dict[str, str] | None = None) -> dict | None:
    """Run one measurement in its own process (`cmd` prints `RESULT <json>`; `stdin` is its input,
    `env` added to this process's environment): its result, or None after printing the end of its
    stderr."""
    import json
    import subprocess
    import sys

    proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        print(proc.stderr[-3000:], file=sys.stderr)
        return None
    return json.loads(line[7:])


def run_llama_cpp(python: str, prompts: list[list[int]], max_tokens: int) -> dict | None:
    """llama.cpp (llama-cpp-python) on the default model's GGUF, in the environment whose interpreter
    is `python` (bench/llama_cpp_child.py): each prompt decoded for `max_tokens` tokens, all cores."""
    import json
    from pathlib import Path

    from freelunch.models.loader import default_model_path

    job = {"model": str(default_model_path()), "prompts": prompts, "single": len(prompts), "max_tokens": max_tokens, "threads": os.cpu_count()}
    return run_child([python, str(Path(__file__).with_name("llama_cpp_child.py"))], json.dumps(job))
