"""Kernels: Triton attention kernels and the PyTorch references they must match, and the C
kernels that CPU runs use (the top-level kernels/cpu/, built by cpu_kernels.py: linears with float or int8 activations,
paged attention for few queries, the elementwise steps, a whole decoder stack in one call).

`triton_kernels_enabled` settles whether the native engine runs the Triton ones.

Installed as `freelunch.kernels`: never a top-level `kernels` package, which transformers
would take for the PyPI `kernels` hub package.
"""

from __future__ import annotations

import importlib.util
import logging

log = logging.getLogger("freelunch.kernels")


def triton_kernels_enabled(setting: str, device_type: str) -> bool:
    """--triton-kernels: auto = on CUDA devices where Triton is installed; on = wherever it is
    (raises without it); off = the PyTorch paths."""
    if setting == "off" or (setting == "auto" and device_type != "cuda"):
        return False
    if importlib.util.find_spec("triton") is None:
        if setting == "on":
            raise ValueError("--triton-kernels on needs Triton (pip install 'freelunch[triton]')")
        log.warning("Triton is not installed: attention and MoE experts run on PyTorch's kernels")
        return False
    return True
