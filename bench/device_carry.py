"""What bench/device_check.sh carries to the lent GPU machine, and the check that it is enough.

    python bench/device_carry.py requirements   # name==version lines for device_wheels.sh
    python bench/device_carry.py check          # the carried wheels cover every dependency

That machine (/work/.library/device/KINDS.md, package list read 2026-11-17) has Python 3.12, torch
2.11 (CUDA 13), Triton 3.6, transformers 5.17 and the packages in IMAGE; nothing can be installed
there from the network. The project installs there with --no-deps; what it needs beyond IMAGE
travels as wheels. `check` follows every carried wheel's own requirements too, and fails on a
missing one, a wheel built for another Python or platform, or more than the call may carry.
"""

from __future__ import annotations

import re
import sys
import zipfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
CARRY = ROOT / ".device"
LIMIT_MIB = 48  # of the 64 MiB a call carries: the working tree takes the rest

# the GPU image's packages (KINDS.md), normalised names
IMAGE = set(
    """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-ml-py onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax
opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy
portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson
six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision
tqdm transformers treescope triton typer typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt
xarray xxhash yarl zipp
""".split()  # noqa: SIM905
)
# carried although the image has one: pydantic 2.14 needs a newer typing-extensions than may be there
ALWAYS = {"typing-extensions"}
PY312 = re.compile(r"-(cp312|py3|py2\.py3)-(cp312|abi3|none)-(manylinux\w*_x86_64(\.manylinux\w*_x86_64)*|any)\.whl$")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(lines: list[str]) -> list[str]:
    """Names of unconditional requirements, and of those whose marker holds on Linux x86-64 CPython 3.12."""
    names = []
    for line in lines:
        spec, _, marker = line.partition(";")
        if "extra ==" in marker or "platform_system == \"Windows\"" in marker or "sys_platform == \"darwin\"" in marker:
            continue
        if "python_version >= \"3.13\"" in marker or "python_version >= '3.13'" in marker:
            continue
        name = re.match(r"\s*([A-Za-z0-9_.\-]+)", spec)
        if name:
            names.append(norm(name.group(1)))
    return names


def project_requirements() -> list[str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return requirement_names(deps)


def walk(requires: Callable[[str], list[str] | None]) -> tuple[list[str], list[str]]:
    """From the project's dependencies through theirs, the names the image lacks (or that are
    carried anyway, ALWAYS): (found, missing). `requires(name)` gives a name's requirement lines, or
    None where it cannot (nothing installed or carried by that name)."""
    todo, seen, found, missing = project_requirements(), set(), [], []
    while todo:
        name = todo.pop()
        if name in seen or (name in IMAGE and name not in ALWAYS):
            continue
        seen.add(name)
        lines = requires(name)
        if lines is None:
            missing.append(name)
        else:
            found.append(name)
            todo.extend(requirement_names(lines))
    return sorted(found), missing


def needed() -> list[str]:
    """The project's dependencies, and theirs, that the image lacks: resolved with this machine's installs."""
    return walk(lambda name: metadata.requires(name) or [])[0]


def requirements() -> None:
    for name in needed():
        print(f"{name}=={metadata.version(name)}")


def check() -> int:
    wheels = sorted((CARRY / "wheels").glob("*.whl"))
    problems = []
    carried = {}
    for w in wheels:
        if not PY312.search(w.name):
            problems.append(f"{w.name}: not a CPython 3.12 manylinux x86-64 (or pure) wheel")
        carried[norm(w.name.split("-")[0])] = w
    # every carried wheel's requirements, and the project's, are carried or in the image
    def wheel_requires(name: str) -> list[str] | None:
        if name not in carried:
            return None
        with zipfile.ZipFile(carried[name]) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            return [ln[len("Requires-Dist:"):].strip() for ln in z.read(meta).decode().splitlines() if ln.startswith("Requires-Dist:")]

    problems += [f"{name}: needed, neither in the GPU image nor carried" for name in walk(wheel_requires)[1]]
    if not (CARRY / "tokenizer" / "tokenizer.json").is_file():
        problems.append("no .device/tokenizer/tokenizer.json (bash bench/device_wheels.sh)")
    size = sum(f.stat().st_size for f in CARRY.rglob("*") if f.is_file()) / 2**20
    if size > LIMIT_MIB:
        problems.append(f".device holds {size:.1f} MiB; at most {LIMIT_MIB} travel beside the working tree")
    for p in problems:
        print("device carry:", p)
    print(f"device carry: {len(wheels)} wheels, tokenizer, {size:.1f} MiB: {'ok' if not problems else 'NOT ENOUGH'}")
    return 1 if problems else 0


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else "check"
    if command == "requirements":
        requirements()
    else:
        sys.exit(check())
