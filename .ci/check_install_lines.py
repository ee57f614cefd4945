"""Resolve the README's install lines as a machine with only the package indexes would.

Every README line that installs torch (`pip install torch==...`) is split at `&&`; its `pip install`
commands are resolved together by `pip install --isolated --dry-run --ignore-installed`, which
ignores this machine's pip environment (its local wheel folder). The check fails on a resolver
conflict, and on the wrong torch build: a line that names PyTorch's CPU index must resolve torch
to its `+cpu` build, a line without it (the CUDA line) to PyPI's CUDA build. It also fails when
`.ci/run` does not run the README's test line (but for `-q`).

Where PyTorch's CPU index cannot be reached (no internet but PyPI), it is emulated with a local
index holding the same `torch==X+cpu` wheel, found in pip's find-links folders.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def install_lines(readme: str) -> list[str]:
    return [line.strip() for line in readme.splitlines() if re.match(r"^\s*pip install .*torch==", line)]


def pip_commands(line: str) -> list[list[str]]:
    """The argument lists of the line's `pip install` commands (without `pip install`)."""
    commands = []
    for part in line.split("&&"):
        words = shlex.split(part)
        if words[:2] == ["pip", "install"]:
            commands.append(words[2:])
    return commands


def reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/torch/", timeout=10):
            return True
    except OSError:
        return False


def emulated_cpu_index(torch_spec: str, folder: Path) -> str:
    """A PEP 503 index with the local `+cpu` wheel of `torch_spec` (torch==X), as a file: URL."""
    version = torch_spec.split("==", 1)[1]
    links = [p for p in os.environ.get("PIP_FIND_LINKS", "").split() if p]
    links += subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", "global.find-links"], capture_output=True, text=True
    ).stdout.split()
    found = {w.name: w for d in dict.fromkeys(links) if Path(d).is_dir() for w in Path(d).glob(f"torch-{version}+cpu-*.whl")}
    wheels = list(found.values())
    if not wheels:
        sys.exit(f"{CPU_INDEX} is unreachable and no local torch-{version}+cpu wheel is in {links}: cannot check")
    (folder / "torch").mkdir(parents=True)
    for wheel in wheels:
        (folder / "torch" / wheel.name).symlink_to(wheel)
    anchors = "".join(f'<a href="{w.name.replace("+", "%2B")}">{w.name}</a>' for w in wheels)
    (folder / "torch" / "index.html").write_text(f"<!DOCTYPE html><html><body>{anchors}</body></html>")
    print(f"{CPU_INDEX} is unreachable here: emulated with {', '.join(str(w) for w in wheels)}")
    return folder.as_uri()


def resolve(line: str, cpu_index: str) -> str | None:
    """None when the line resolves with the right torch build, else what went wrong."""
    commands = pip_commands(line)
    with_deps = [args for args in commands if "--no-deps" not in args]
    args = [a.replace(CPU_INDEX, cpu_index) for cmd in with_deps for a in cmd]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        pip = [sys.executable, "-m", "pip", "install", "--isolated", "--dry-run", "--ignore-installed", "--quiet"]
        done = subprocess.run([*pip, "--report", str(report), *args], cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            return f"pip could not resolve it:\n{done.stderr[-3000:]}"
        for cmd in commands:  # the --no-deps commands: their package must exist
            if "--no-deps" in cmd:
                alone = subprocess.run([*pip, *cmd], cwd=ROOT, capture_output=True, text=True)
                if alone.returncode != 0:
                    return f"pip install {' '.join(cmd)} failed:\n{alone.stderr[-2000:]}"
        installed = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    torch = installed.get("torch", "")
    wants_cpu = CPU_INDEX in line
    cuda = sorted(name for name in installed if name.startswith("nvidia-"))
    if wants_cpu and (not torch.endswith("+cpu") or cuda):
        return f"the CPU line resolves torch {torch} with {len(cuda)} nvidia-* packages"
    if not wants_cpu and (torch.endswith("+cpu") or not cuda):
        return f"the CUDA line resolves torch {torch} without CUDA libraries"
    print(f"ok ({'CPU' if wants_cpu else 'CUDA'}: torch {torch}, {len(installed)} packages): {line}")
    return None


def cpu_install(lines: list[str]) -> str:
    """The README's CPU serve line without its last command (`freelunch serve`, which would block)."""
    line = next(line for line in lines if CPU_INDEX in line and "pytest" not in line)
    return " && ".join(part.strip() for part in line.split("&&") if not part.strip().startswith("freelunch "))


def main() -> int:
    readme = (ROOT / "README.md").read_text()
    lines = install_lines(readme)
    if sys.argv[1:] == ["--print-cpu-install"]:  # for .ci/run's plain-install job
        print(cpu_install(lines))
        return 0
    if len(lines) < 4:
        print(f"expected CPU and CUDA lines to serve and to test in README.md, found {len(lines)} install lines")
        return 1
    failures = []
    quiet = lambda line: " ".join(w for w in shlex.split(line) if w != "-q")  # noqa: E731 (CI adds -q)
    ci = [quiet(line) for line in (ROOT / ".ci" / "run").read_text().splitlines() if not line.startswith("#")]
    test_lines = [line for line in lines if "pytest" in line]
    if not any(quiet(line) in ci for line in test_lines):
        failures.append(".ci/run does not run the README's test line (its -q flags aside)")
    with tempfile.TemporaryDirectory() as tmp:
        torch_spec = next(w for line in lines for w in shlex.split(line) if w.startswith("torch=="))
        cpu_index = CPU_INDEX if reachable(CPU_INDEX) else emulated_cpu_index(torch_spec, Path(tmp) / "index")
        with ThreadPoolExecutor(len(lines)) as pool:  # the resolver waits on the network: in parallel
            results = list(pool.map(lambda line: resolve(line, cpu_index), lines))
    failures += [f"{line}\n  {error}" for line, error in zip(lines, results) if error]
    for failure in failures:
        print(f"FAIL: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
