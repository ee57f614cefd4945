"""bench/device_check.sh, the GPU check, as far as a CPU machine can take it: what it carries to the
offline GPU machine covers every dependency, and its dry run passes (every step at toy size)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import device_carry  # noqa: E402


def _wheel(folder: Path, filename: str, requires: list[str]) -> None:
    name = filename.split("-")[0]
    with zipfile.ZipFile(folder / filename, "w") as z:
        z.writestr(f"{name}-1.0.dist-info/METADATA", "Name: x\n" + "".join(f"Requires-Dist: {r}\n" for r in requires))


def test_the_carry_check_names_what_is_missing_or_built_for_another_python(tmp_path, monkeypatch):
    carry = tmp_path / ".device"
    (carry / "wheels").mkdir(parents=True)
    (carry / "tokenizer").mkdir()
    (carry / "tokenizer" / "tokenizer.json").write_text("{}")
    monkeypatch.setattr(device_carry, "CARRY", carry)
    needed = device_carry.needed()
    assert "pydantic" in needed and "xgrammar" in needed and "torch" not in needed, "the image has torch"
    for name in needed:
        _wheel(carry / "wheels", f"{name.replace('-', '_')}-1.0-py3-none-any.whl", [])
    assert device_carry.check() == 0
    # a wheel built for CPython 3.11, and a requirement of a carried wheel that nothing provides
    (carry / "wheels" / "msgspec-1.0-py3-none-any.whl").unlink()
    _wheel(carry / "wheels", "msgspec-1.0-cp311-cp311-manylinux_2_17_x86_64.whl", [])
    _wheel(carry / "wheels", "gguf-1.0-py3-none-any.whl", ["not-in-the-image>=1", "colorama; platform_system == \"Windows\""])
    assert device_carry.check() == 1
    out = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); import device_carry, pathlib; "
         f"device_carry.CARRY = pathlib.Path({str(carry)!r}); device_carry.check()"],
        capture_output=True, text=True, check=False,
    ).stdout  # fmt: skip
    assert "msgspec-1.0-cp311" in out and "not-in-the-image: needed" in out and "colorama" not in out


@pytest.mark.skipif(not (ROOT / ".device" / "wheels").is_dir(), reason="no .device/: bash bench/device_wheels.sh fetches it (CI does)")
def test_the_dry_run_passes(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path))
    proc = subprocess.run(["bash", "bench/device_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, check=False, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in summary] == ["parity", "moe", "kernels"]
    assert all(": ok: " in line and "collected" in line for line in summary)
    speed = json.loads((tmp_path / "device_speed.json").read_text())["shapes"]["toy"]
    assert speed["single"] > 0 and speed["concurrent64"] > 0 and speed["token_recycling_lossless"] is True
