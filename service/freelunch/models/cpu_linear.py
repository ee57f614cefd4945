"""Linear layers with pre-packed weights, for float32 on CPUs.

PyTorch's default CPU path (MKL sgemm) is slow for the small row counts of decoding: on the
2-core dev machine a full SmolLM2 forward spends 39 ms in matmuls at 1 row and 77 ms at 4,
against 23 ms and 30 ms with weights reordered once for oneDNN (the same op inductor uses
after freezing). Our own AVX2 kernel (freelunch.kernels.cpu_kernels) goes further where a step
has few rows, as in decoding and in verifying a draft tree: a whole SmolLM2 forward after a
100-token context takes 30 / 32 / 36 / 40 ms at 1 / 4 / 8 / 12 tokens, against 40 / 50 / 57 /
63 ms with oneDNN, and the same at 128-512 (`python bench/bench_cpu_linear.py`,
bench/results/cpu_linear.json). It is used where it builds; oneDNN otherwise. Results differ
from F.linear by float32 rounding (~1e-5 on logits).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch
from torch import nn

from freelunch.config import kernel_switch
from freelunch.kernels import cpu_kernels

# Row-count hint for the packed layout; 16 measured best from 1 to 300 rows on AVX2.
_PACK_HINT = 16


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class PackedLinear(nn.Module):
    """y = x W^T + b with W held in oneDNN's blocked layout (float32, CPU, 2-D inputs)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().contiguous(), _PACK_HINT)
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")


class PanelLinear(nn.Module):
    """y = x W^T + b with W packed in 8-column panels for freelunch.kernels.cpu_kernels (float32, CPU)."""

    def __init__(self, linear: nn.Linear, library: ctypes.CDLL) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.library = library
        weight = linear.weight.detach()
        # a bfloat16 checkpoint's weights (exactly bfloat16 values) are kept in half the bytes and
        # widened exactly in the kernel: the same products, half the memory a step reads
        exact = torch.equal(weight.to(torch.bfloat16).float(), weight)
        self.packed = cpu_kernels.pack(weight, torch.bfloat16 if exact else torch.float32)
        self.bias = None if linear.bias is None else linear.bias.detach().contiguous().clone()

    def kernel_matrix(self) -> cpu_kernels.KernelMatrix:
        kind = "bf16" if self.packed.dtype == torch.bfloat16 else "f32"
        return cpu_kernels.KernelMatrix(kind, self.packed, None, self.out_features, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).contiguous()
        y = cpu_kernels.linear(self.library, rows, self.packed, self.out_features, self.bias)
        return y.view(*x.shape[:-1], self.out_features)


def _panel_library() -> ctypes.CDLL | None:
    """Our kernel's library where float32 linears run in it (PanelLinear, which also reads bfloat16
    weights as stored): FREELUNCH_CPU_LINEAR is `panel` (the default) and the kernel builds."""
    return cpu_kernels.load() if kernel_switch("FREELUNCH_CPU_LINEAR") == "panel" else None


def panel_kernels() -> bool:
    return _panel_library() is not None


def _packer() -> Callable[[nn.Linear], nn.Module] | None:
    """PanelLinear where our kernel builds, else oneDNN's PackedLinear. FREELUNCH_CPU_LINEAR
    chooses: `panel` (default), `onednn`, or `torch` (plain nn.Linear)."""
    library = _panel_library()
    if library is not None:
        return lambda linear: PanelLinear(linear, library)
    if kernel_switch("FREELUNCH_CPU_LINEAR") != "torch" and onednn_available():
        return PackedLinear
    return None


def pack_linears(model: nn.Module) -> int:
    """Replace every float32 CPU nn.Linear by a packed one (PanelLinear or PackedLinear);
    returns how many were packed."""
    packer = _packer()
    if packer is None:
        return 0
    count = 0
    for parent in list(model.modules()):
        if isinstance(parent, nn.MultiheadAttention):  # reads its out_proj's .weight directly (SigLIP's pooling head)
            continue
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.weight.dtype == torch.float32 and child.weight.device.type == "cpu":
                setattr(parent, name, packer(child))
                count += 1
    return count
