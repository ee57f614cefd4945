"""Linear layers with weights pre-packed for oneDNN, for float32 on CPUs.

PyTorch's default CPU path (MKL sgemm) is slow for the small row counts of decoding: on the
2-core dev machine a full SmolLM2 forward spends 39 ms in matmuls at 1 row and 77 ms at 4,
against 23 ms and 30 ms with weights reordered once for oneDNN (the same op inductor uses
after freezing). Results differ from F.linear by float32 rounding (~1e-4 on logits).
"""

from __future__ import annotations

import os

import torch
from torch import nn

# Row-count hint for the packed layout; 16 measured best from 1 to 300 rows on AVX2.
_PACK_HINT = 16


def onednn_available() -> bool:
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and os.environ.get("FREELUNCH_ONEDNN", "1") != "0"
    )


class PackedLinear(nn.Module):
    """y = x W^T + b with W held in oneDNN's blocked layout (float32, CPU, 2-D inputs)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().contiguous(), _PACK_HINT)
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")


def pack_linears(model: nn.Module) -> int:
    """Replace every float32 CPU nn.Linear by a PackedLinear; returns how many were packed."""
    if not onednn_available():
        return 0
    count = 0
    for parent in list(model.modules()):
        if isinstance(parent, nn.MultiheadAttention):  # reads its out_proj's .weight directly (SigLIP's pooling head)
            continue
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.weight.dtype == torch.float32 and child.weight.device.type == "cpu":
                setattr(parent, name, PackedLinear(child))
                count += 1
    return count
