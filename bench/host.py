"""What machine a benchmark ran on (every results file records it): the CPU's name and its
instruction-set features, as the server reports them (freelunch.cpu_features)."""

from __future__ import annotations

import os

from freelunch.cpu_features import cpu_features, cpu_name, isa_level


def machine() -> dict:
    return {"cpu": cpu_name(), "isa": isa_level(), "features": cpu_features(), "cores": os.cpu_count()}


def run_child(cmd: list[str], stdin: str | None = None, env: dict[str, str] | None = None, memory: bool = False) -> dict | None:
    """Run one measurement in its own process (`cmd` prints `RESULT <json>`; `stdin` is its input,
    `env` added to this process's environment): its result, or None after printing the end of its
    stderr. With `memory`, the result also holds the process's peak memory in bytes, both read
    from /proc every 0.25 s while it runs (what it reaches in its last 0.25 s can be missed):
    `peak_rss_bytes` (the kernel's high-water mark, VmHWM; not wait4's ru_maxrss, which counts the
    parent's memory at the fork) and `peak_uss_bytes` (its private memory, /proc/PID/smaps_rollup)."""
    import json
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    if memory:
        out, err, peaks = _run_measured(cmd, stdin, env)
    else:
        proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, env=env)
        out, err, peaks = proc.stdout, proc.stderr, {}
    line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        print(err[-3000:], file=sys.stderr)
        return None
    return json.loads(line[7:]) | peaks


def _memory(pid: int) -> tuple[int, int]:
    """(VmHWM, USS) of a running process in bytes, zeros once it has exited."""
    try:
        with open(f"/proc/{pid}/status") as f:
            hwm = next((int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:")), 0)
        with open(f"/proc/{pid}/smaps_rollup") as f:
            fields = dict(ln.split(":", 1) for ln in f.read().splitlines() if ":" in ln and not ln[0].isdigit())
    except OSError:
        return 0, 0
    uss = sum(int(fields.get(k, "0 kB").split()[0]) for k in ("Private_Clean", "Private_Dirty", "Private_Hugetlb"))
    return hwm * 1024, uss * 1024


def _run_measured(cmd: list[str], stdin: str | None, env: dict[str, str]) -> tuple[str, str, dict]:
    """(stdout, stderr, {"peak_rss_bytes", "peak_uss_bytes"}) of a command run to its end."""
    import subprocess
    import tempfile
    import threading

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=err, text=True, env=env)
        peaks, done = [0, 0], threading.Event()

        def sample() -> None:
            while not done.wait(0.25):
                peaks[:] = [max(a, b) for a, b in zip(peaks, _memory(proc.pid))]

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        if stdin:
            proc.stdin.write(stdin)
        proc.stdin.close()
        proc.wait()
        done.set()
        sampler.join()
        out.seek(0)
        err.seek(0)
        return out.read(), err.read(), {"peak_rss_bytes": peaks[0], "peak_uss_bytes": peaks[1]}


def run_llama_cpp(
    python: str, prompts: list[list[int]], max_tokens: int, model: str | None = None, single: int | None = None,
    concurrency: int = 0, memory: bool = False, long_prompts: list[list[int]] | None = None,
) -> dict | None:
    """llama.cpp (llama-cpp-python) on the default model's GGUF (or `model`, a .gguf file), in the
    environment whose interpreter is `python` (bench/llama_cpp_child.py), all cores: the first
    `single` prompts (default: all) decoded one after another for `max_tokens` tokens each; with
    `concurrency`, then the first `concurrency` prompts decoded together (one context, a sequence
    each, as llama-server's parallel slots); `memory`: run_child's peak memory."""
    import json
    from pathlib import Path

    from freelunch.models.loader import default_model_path

    job = {"model": str(model or default_model_path()), "prompts": prompts, "single": single or len(prompts), "max_tokens": max_tokens, "threads": os.cpu_count()}
    if concurrency:
        job["concurrency"] = concurrency
    if long_prompts:
        job["long_prompts"] = long_prompts
    return run_child([python, str(Path(__file__).with_name("llama_cpp_child.py"))], json.dumps(job), memory=memory)
