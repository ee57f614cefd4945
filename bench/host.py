"""What machine a benchmark ran on (every results file records it): the CPU's name and its
instruction-set features, as the server reports them (freelunch.cpu_features)."""

from __future__ import annotations

import os

from freelunch.cpu_features import cpu_features, cpu_name, isa_level


def machine() -> dict:
    return {"cpu": cpu_name(), "isa": isa_level(), "features": cpu_features(), "cores": os.cpu_count()}


def run_child(cmd: list[str], stdin: str | None = None) -> dict | None:
    """Run one measurement in its own process (`cmd` prints `RESULT <json>`; `stdin` is its input):
    its result, or None after printing the end of its stderr."""
    import json
    import subprocess
    import sys

    proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        print(proc.stderr[-3000:], file=sys.stderr)
        return None
    return json.loads(line[7:])
