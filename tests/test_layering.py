"""The layering contracts of pyproject.toml ([tool.importlinter]) hold, and would catch a back-edge."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def lint_imports(package_root: Path, config: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())", "--config", str(config)]
    return subprocess.run(cmd, cwd=package_root, capture_output=True, text=True, env={"PYTHONPATH": str(package_root), "PATH": ""})


def test_the_layering_contracts_hold():
    done = lint_imports(ROOT / "service", ROOT / "pyproject.toml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_a_back_edge_breaks_them(tmp_path):
    """The engine importing a method (or the kernels a model) is refused."""
    shutil.copytree(ROOT / "service" / "freelunch", tmp_path / "freelunch", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "freelunch" / "engine" / "shortcut.py").write_text("from freelunch.methods import guidance  # a back-edge\n")
    done = lint_imports(tmp_path, ROOT / "pyproject.toml")
    assert done.returncode != 0 and "BROKEN" in done.stdout
    assert "freelunch.engine.shortcut -> freelunch.methods" in done.stdout.replace("\n", " ") or "shortcut" in done.stdout
