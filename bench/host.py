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
    stderr. With `memory`, the result also holds the process's peak memory in bytes:
    `peak_rss_bytes` (the kernel's high-water mark, from wait4) and `peak_uss_bytes` (its private
    memory, sampled every 0.5 s from /proc/PID/smaps_rollup: a lower bound of the peak)."""
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


def _uss(pid: int) -> int:
    """Private (unshared) bytes of a process, 0 when it cannot be read (it has exited)."""
    try:
        text = open(f"/proc/{pid}/smaps_rollup").read()
    except OSError:
        return 0
    fields = dict(ln.split(":", 1) for ln in text.splitlines() if ":" in ln and not ln[0].isdigit())
    return sum(int(fields.get(k, "0 kB").split()[0]) for k in ("Private_Clean", "Private_Dirty", "Private_Hugetlb")) * 1024


def _run_measured(cmd: list[str], stdin: str | None, env: dict[str, str]) -> tuple[str, str, dict]:
    """(stdout, stderr, {"peak_rss_bytes", "peak_uss_bytes"}) of a command run to its end."""
    import subprocess
    import tempfile
    import threading

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=err, text=True, env=env)
        peak_uss, done = [0], threading.Event()

        def sample() -> None:
            while not done.wait(0.5):
                peak_uss[0] = max(peak_uss[0], _uss(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        if stdin:
            proc.stdin.write(stdin)
        proc.stdin.close()
        _, status, usage = os.wait4(proc.pid, 0)  # rusage of this child alone
        proc.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        sampler.join()
        out.seek(0)
        err.seek(0)
        return out.read(), err.read(), {"peak_rss_bytes": usage.ru_maxrss * 1024, "peak_uss_bytes": peak_uss[0]}


def run_llama_cpp(
    python: str, prompts: list[list[int]], max_tokens: int, model: str | None = None, single: int | None = None,
    concurrency: int = 0, memory: bool = False,
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
    return run_child([python, str(Path(__file__).with_name("llama_cpp_child.py"))], json.dumps(job), memory=memory)
