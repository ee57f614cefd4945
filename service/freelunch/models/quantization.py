"""Weight-only quantised linears (`--quantization`), on PyTorch's packed-weight CPU matmuls.

Decoding reads every weight once per step, so on a CPU a step costs about the bytes of its
weights: 4 bits a weight read as such instead of 32 is the largest speed-up there is. PyTorch
ships the kernels (`aten._weight_int4pack_mm_for_cpu`, `aten._weight_int8pack_mm`), with
activations in float32 or bfloat16; this module only packs weights for them and keeps, beside
each layer, the reference it must equal (`dequantized()`: the same weights in float32).

- `int8`: per output channel, symmetric: w = s[n] * q, q in [-127, 127]. Any checkpoint.
- `int4`: groups of 32 inputs, asymmetric: w = d[n, g] * q + m[n, g], q in [0, 15], d and m from
  each group's min and max. This is GGUF's Q4_1 scheme: for weights dequantised from a Q4_1 file
  every group holds its q = 0 and q = 15 (llama.cpp's quantiser puts the group's min and max
  there), so the min and max give back the file's d and m, and the layer computes with the
  file's own numbers (to float32 rounding).
- `gguf`: `int4` for the layers whose weights are exactly Q4_1 numbers (checked per layer:
  re-quantising must give the same weights back), float for the others (a Q8_0 embedding and its
  tied output layer stay float32); only for a model loaded from a .gguf file.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from freelunch.kernels import cpu_kernels

log = logging.getLogger(__name__)

MODES = ("none", "int8", "int4", "gguf")
GROUP = 32  # inputs per int4 group (GGUF's block)
# a layer's weights are "the file's numbers" when re-quantising reproduces them to this (relative)
EXACT = 1e-6


def int8_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (q int8 [N, K], scales float32 [N]): w ~ scales[:, None] * q."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def int4_quantize(weight: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, K] float -> (q int32 [N, K] in [0, 15], d [N, K / group], m [N, K / group]):
    w ~ d * q + m per group of `group` inputs (Q4_1's scheme)."""
    n, k = weight.shape
    w = weight.detach().float().view(n, k // group, group)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    d = (high - low) / 15
    safe = torch.where(d > 0, d, torch.ones_like(d))
    q = torch.round((w - low[..., None]) / safe[..., None]).clamp(0, 15).to(torch.int32)
    return q.view(n, k), d, low


def int4_dequantize(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    n, k = q.shape
    return (q.view(n, k // group, group).float() * d[..., None] + m[..., None]).view(n, k)


class _QuantizedLinear(nn.Module):
    """Float32 activations run in our AVX2 kernels (kernels/cpu_kernels.c: the weights widened in
    registers, one pass over them per step); bfloat16 / float16 ones, or a CPU without AVX2, in
    PyTorch's (which only have fast paths for 16-bit activations)."""

    kind = ""  # the C kernel's: "q8" or "q4"

    def __init__(self, linear: nn.Linear, use_c_kernel: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = None if linear.bias is None else linear.bias.detach().float().clone()
        # the kernels take 4 inputs a step (int4 layers: groups of 32)
        self.library = cpu_kernels.load() if use_c_kernel and linear.in_features % 4 == 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).contiguous()
        if self.library is not None and rows.dtype == torch.float32:
            y = cpu_kernels.linear_quantized(self.library, self.kind, rows, self.c_packed, self.c_scales, self.out_features, self.bias)
        else:
            y = self.torch_matmul(rows)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)


class Int8Linear(_QuantizedLinear):
    """y = x (s * q)^T + b, per output channel."""

    kind = "q8"

    def __init__(self, linear: nn.Linear, use_c_kernel: bool = True) -> None:
        super().__init__(linear, use_c_kernel)
        self.q, self.scales = int8_quantize(linear.weight)
        if self.library is not None:
            self.c_packed, self.c_scales = cpu_kernels.pack_q8(self.q, self.scales)

    def dequantized(self) -> torch.Tensor:
        return self.q.float() * self.scales[:, None]

    def torch_matmul(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(rows, self.q, self.scales.to(rows.dtype))


class Int4Linear(_QuantizedLinear):
    """y = x (d * q + m)^T + b, groups of 32 inputs."""

    kind = "q4"

    def __init__(
        self, linear: nn.Linear, quantized: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, use_c_kernel: bool = True
    ) -> None:
        super().__init__(linear, use_c_kernel)
        q, self.d, self.m = quantized if quantized is not None else int4_quantize(linear.weight)
        if self.library is not None:
            self.c_packed, self.c_scales = cpu_kernels.pack_q4(q, self.d, self.m)
        else:
            self._q = q.to(torch.uint8)  # PyTorch's packing cannot be read back: kept for dequantized()
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
            # PyTorch's kernel computes (q - 8) * scale + zero: zero = m + 8 d; [K / 32, N, 2]
            self.scale_zero = torch.stack([self.d, self.m + 8 * self.d], dim=-1).transpose(0, 1).contiguous()

    def dequantized(self) -> torch.Tensor:
        q = cpu_kernels.unpack_q4(self.c_packed, self.out_features) if self.library is not None else self._q
        return int4_dequantize(q, self.d, self.m)

    def torch_matmul(self, rows: torch.Tensor) -> torch.Tensor:
        if self.library is not None:  # packed for ours: 16-bit activations widened to float32
            return cpu_kernels.linear_quantized(self.library, "q4", rows.float(), self.c_packed, self.c_scales, self.out_features, None).to(rows.dtype)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, GROUP, self.scale_zero.to(rows.dtype))


def _int4_fits(linear: nn.Linear) -> bool:
    return linear.in_features % GROUP == 0 and linear.out_features % 8 == 0


def _exact_int4(linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The layer's int4 form when its weights are exactly int4 (Q4_1) numbers, else None."""
    if not _int4_fits(linear):
        return None
    quantized = int4_quantize(linear.weight)
    w = linear.weight.detach().float()
    error = (int4_dequantize(*quantized) - w).abs().max()
    return quantized if error <= EXACT * max(w.abs().max().item(), 1e-30) else None


def quantize_linears(model: nn.Module, mode: str) -> dict[str, int]:
    """Replace the model's CPU nn.Linear layers by quantised ones; returns counts by kind
    ({"int4": 210, "float": 1})."""
    if mode not in MODES:
        raise ValueError(f"quantization must be one of {MODES}, not {mode!r}")
    counts: dict[str, int] = {}
    if mode == "none":
        return counts
    for parent in list(model.modules()):
        if isinstance(parent, nn.MultiheadAttention):  # reads its out_proj's .weight directly (SigLIP's pooling head)
            continue
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or child.weight.device.type != "cpu":
                continue
            if mode == "int8":
                layer: nn.Module | None = Int8Linear(child)
            elif mode == "int4":
                layer = Int4Linear(child) if _int4_fits(child) else None
            else:
                exact = _exact_int4(child)
                layer = Int4Linear(child, exact) if exact is not None else None
            kind = mode if mode != "gguf" else "int4"
            if layer is None:
                kind = "float"
            else:
                setattr(parent, name, layer)
            counts[kind] = counts.get(kind, 0) + 1
    log.info("quantization %s: %s", mode, ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    return counts
