"""How long `freelunch serve` takes to serve: from the command to `/ready` answering 200, and from a
worker's death (SIGKILL) to its replacement serving again (`/ready` back from "degraded").

    python bench/bench_startup.py [--rounds 3] [--server-args "..."] [--out bench/results/startup.json]

The embedded model, already converted from its GGUF (the first start ever converts it: about
30 s more, once). Run it on an idle machine. Writes JSON and prints a table (medians).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from freelunch.benchmark import start_server, stop_server


def ready_state(base: str) -> str | None:
    try:
        r = httpx.get(base + "/ready", timeout=2)
    except httpx.HTTPError:
        return None
    return r.json().get("status") if r.status_code == 200 else None


def restart_seconds(base: str) -> float:
    """SIGKILL the first worker; seconds until /ready says "ready" (all workers serving) again."""
    children = [int(p) for p in os.popen(f"pgrep -P {os.getpid()}").read().split()]
    grandchildren = [int(p) for c in children for p in os.popen(f"pgrep -P {c}").read().split()]
    workers = [p for p in grandchildren if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text()]
    start = time.perf_counter()
    os.kill(workers[0], signal.SIGKILL)
    while ready_state(base) == "ready":  # until the pool notices
        time.sleep(0.05)
    while ready_state(base) != "ready":
        time.sleep(0.1)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--server-args", default="")
    parser.add_argument("--out", default="bench/results/startup.json")
    args = parser.parse_args()
    if os.getloadavg()[0] > 0.5:
        print(f"warning: load average {os.getloadavg()[0]:.2f}; benchmark on an idle machine")
    starts, restarts = [], []
    for i in range(args.rounds):
        with tempfile.TemporaryFile() as log:
            began = time.perf_counter()
            proc, base = start_server(shlex.split(args.server_args), log)
            starts.append(time.perf_counter() - began)
            try:
                restarts.append(restart_seconds(base))
            finally:
                stop_server(proc)
        print(f"round {i + 1}: start to /ready {starts[-1]:.1f} s, worker restart {restarts[-1]:.1f} s", flush=True)
    result = {
        "command": f"python bench/bench_startup.py --rounds {args.rounds}" + (f" --server-args {shlex.quote(args.server_args)}" if args.server_args else ""),
        "start_to_ready_s": starts,
        "worker_restart_to_ready_s": restarts,
        "median_start_to_ready_s": statistics.median(starts),
        "median_worker_restart_s": statistics.median(restarts),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d")},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("| measure | median | runs |\n| --- | ---: | --- |")
    print(f"| `freelunch serve` to /ready | {result['median_start_to_ready_s']:.1f} s | {', '.join(f'{s:.1f}' for s in starts)} |")
    print(f"| worker SIGKILL to /ready \"ready\" | {result['median_worker_restart_s']:.1f} s | {', '.join(f'{s:.1f}' for s in restarts)} |")


if __name__ == "__main__":
    main()
