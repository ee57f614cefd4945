"""Weight-only quantised linears (`--quantization`), on our CPU kernels or PyTorch's.

Decoding reads every weight once per step, so on a CPU a step costs about the bytes of its
weights: 4 bits a weight read as such instead of 32 is the largest speed-up there is. Each layer
keeps, beside its packed weights, the reference it must equal (`dequantized()`: the same weights
in float32).

- `int8`: per output channel, symmetric: w = s[n] * q, q in [-127, 127]. Any checkpoint.
- `int4`: groups of 32 inputs, asymmetric: w = d[n, g] * q + m[n, g], q in [0, 15], d and m from
  each group's min and max (GGUF's Q4_1 scheme). Any checkpoint.
- `gguf`: the blocks of a .gguf file as stored (models/gguf_blocks.py): Q4_0, Q4_1 and Q4_K
  layers run as int4, Q8_0, Q6_K and Q5_0 ones as int8 with a scale per group of 32 or 16 inputs,
  Q5_1 and Q5_K as 5-bit (integer activations only), on the file's own numbers; other types stay float.

Activations (`--activations`) are a second, named choice of numerics:
- `float`: each layer's input stays float32 and meets its weights widened to float32 (equal to
  transformers on the dequantised weights up to float32 summation order);
- `int8`: each row of the input is quantised in blocks of 32 and multiplied in integer units
  (kernels/cpu/linear_int8.c, as llama.cpp computes GGUF models): several times the multiply-adds
  per instruction, so a step of a few rows (a draft tree) costs little more than one. A row's
  result depends on that row alone, so verifying a draft stays lossless.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from freelunch.kernels import cpu_kernels
from freelunch.models.gguf_blocks import QuantizedRows, StoredTensor, decode, row_keys

log = logging.getLogger(__name__)

MODES = ("none", "int8", "int4", "gguf")
ACTIVATIONS = ("float", "int8")
GROUP = 32  # inputs per int4 group (GGUF's block)
# a layer serves a file's blocks when they give back its weights to this (relative to the largest)
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
    """Runs in our AVX2 kernels (kernels/cpu/linear.c: the weights widened in registers, one pass
    over them per step; 16-bit activations widened to float32), or in PyTorch's on a CPU without
    AVX2 (their fast paths are for 16-bit activations only: float32 ones were 5-70x slower than
    F.linear on an AVX2 CPU)."""

    kind = ""  # the C kernel's: "q8" or "q4"

    def __init__(self, linear: nn.Linear, use_c_kernel: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = None if linear.bias is None else linear.bias.detach().float().clone()
        # the kernels take 4 inputs a step (int4 layers: groups of 32)
        self.library = cpu_kernels.load() if use_c_kernel and linear.in_features % 4 == 0 else None

    def kernel_matrix(self) -> cpu_kernels.KernelMatrix | None:
        """The weights as our matmul kernel reads them (None where PyTorch's kernels run)."""
        if self.library is None:
            return None
        group = self.in_features // self.c_scales.shape[1] if self.kind == "q8" else 0
        return cpu_kernels.KernelMatrix(self.kind, self.c_packed, self.c_scales, self.out_features, self.bias, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).contiguous()
        if self.library is not None:  # 16-bit activations widened to float32, and the result narrowed back
            y = cpu_kernels.matrix_apply(self.library, self.kernel_matrix(), rows.float()).to(rows.dtype)
        else:
            y = self.torch_matmul(rows)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)


class Int8Linear(_QuantizedLinear):
    """y = x (s * q)^T + b: one scale per output channel, or per group of inputs (GGUF's Q8_0, Q6_K)."""

    kind = "q8"

    def __init__(
        self, linear: nn.Linear, quantized: tuple[torch.Tensor, torch.Tensor] | None = None, use_c_kernel: bool = True
    ) -> None:
        super().__init__(linear, use_c_kernel)
        q, scales = quantized if quantized is not None else int8_quantize(linear.weight)
        if self.library is not None:
            self.c_packed, self.c_scales = cpu_kernels.pack_q8(q, scales)
        elif scales.dim() == 1:
            self.q, self.scales = q, scales
        else:
            raise ValueError("int8 weights with grouped scales need our CPU kernels (AVX2)")

    def dequantized(self) -> torch.Tensor:
        if self.library is None:
            return QuantizedRows(self.q, self.scales[:, None], None, self.in_features).dequantize()
        scales = cpu_kernels.from_panels(self.c_scales, self.out_features)
        q = cpu_kernels.from_panels(self.c_packed, self.out_features)
        return QuantizedRows(q, scales, None, self.in_features // scales.shape[1]).dequantize()

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
        return torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, GROUP, self.scale_zero.to(rows.dtype))


class Int8ActivationLinear(_QuantizedLinear):
    """y = x (d q (+ m))^T + b with x quantised to int8 per row in blocks of 32 (`--activations int8`):
    int8 weights (scales per 16 or 32 inputs, or per channel), int4 or 5-bit ones with an offset,
    in kernels/cpu/linear_int8.c (the variant CPUID chose). Built only where the kernels load
    (`fits` and quantize_linears see to it)."""

    def __init__(self, linear: nn.Linear, rows: QuantizedRows) -> None:
        super().__init__(linear, use_c_kernel=True)
        bits = int(rows.kind[3:])
        self.matrix = cpu_kernels.pack_int8_activations(rows.q, rows.d, rows.m, self.out_features, self.bias, bits)

    @staticmethod
    def fits(linear: nn.Linear, rows: QuantizedRows) -> bool:
        """Whether the kernel takes these weights: inputs in blocks of 32, scale groups of 16 or 32
        (or one a row)."""
        k = linear.in_features
        return k % 32 == 0 and rows.group in (16, 32, k) and (rows.m is None or rows.group == 32)

    def kernel_matrix(self) -> cpu_kernels.KernelMatrix:
        return self.matrix

    def dequantized(self) -> torch.Tensor:
        return cpu_kernels.dequantize_kernel_matrix(self.matrix, self.in_features)


def _int4_fits(linear: nn.Linear) -> bool:
    return linear.in_features % GROUP == 0 and linear.out_features % 8 == 0


def _from_file(linear: nn.Linear, index: dict[int, tuple[str, int]], stored: dict[str, StoredTensor], decoded: dict) -> QuantizedRows | None:
    """The file's blocks for every row of `linear` (rows found by key, all of one kind, giving the
    layer's weights back), else None."""
    weight = linear.weight.detach().float()
    found = [index.get(key) for key in row_keys(weight).tolist()]
    if any(f is None for f in found):
        return None
    parts, start = [], 0
    while start < len(found):  # runs of consecutive rows from one stored tensor
        name = found[start][0]
        end = start + 1
        while end < len(found) and found[end][0] == name:
            end += 1
        if name not in decoded:
            decoded[name] = decode(stored[name].blocks, stored[name].qtype)
        parts.append(decoded[name].select(torch.tensor([row for _, row in found[start:end]])))
        start = end
    if len({p.kind for p in parts}) != 1:
        return None  # e.g. q/k in Q4_K, v in Q6_K in one fused layer: stays float
    rows = QuantizedRows.concat(parts)
    error = (rows.dequantize() - weight).abs().max()
    return rows if error <= EXACT * max(weight.abs().max().item(), 1e-30) else None


def _linears(model: nn.Module):
    """(parent, attribute name, layer) for each CPU nn.Linear that may be replaced."""
    for parent in list(model.modules()):
        if isinstance(parent, nn.MultiheadAttention):  # reads its out_proj's .weight directly (SigLIP's pooling head)
            continue
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.weight.device.type == "cpu":
                yield parent, name, child


def _rows(linear: nn.Linear, mode: str) -> QuantizedRows | None:
    """The layer's weights quantised by `mode` (int8 or int4) in the form gguf_blocks decodes to."""
    if mode == "int8":
        q, scales = int8_quantize(linear.weight)
        return QuantizedRows(q, scales[:, None], None, linear.in_features, 8)
    if not _int4_fits(linear):
        return None
    q, d, m = int4_quantize(linear.weight)
    return QuantizedRows(q.to(torch.uint8), d, m, GROUP, 4)


def quantize_linears(
    model: nn.Module, mode: str, stored: dict[str, StoredTensor] | None = None, activations: str = "float"
) -> dict[str, int]:
    """Replace the model's CPU nn.Linear layers by quantised ones; returns counts by kind
    ({"int4": 210, "int8": 1}). `gguf` serves `stored` (gguf_blocks.read_gguf / load). With
    `activations` int8, layers run in the integer-activation kernels where they take the weights
    (see Int8ActivationLinear.fits), else as with float activations."""
    if mode not in MODES:
        raise ValueError(f"quantization must be one of {MODES}, not {mode!r}")
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {ACTIVATIONS}, not {activations!r}")
    counts: dict[str, int] = {}
    if mode == "none":
        return counts
    index = {key: (name, row) for name, t in (stored or {}).items() for row, key in enumerate(t.keys.tolist())}
    decoded: dict[str, QuantizedRows] = {}
    library = cpu_kernels.load()  # grouped int8 and integer activations run only there
    integer = activations == "int8" and library is not None
    if activations == "int8" and library is None:
        log.warning("--activations int8 needs our CPU kernels (not built here): float activations instead")
    for parent, name, child in _linears(model):
        layer: nn.Module | None = None
        rows = _from_file(child, index, stored or {}, decoded) if mode == "gguf" else _rows(child, mode)
        if rows is None:
            pass
        elif integer and Int8ActivationLinear.fits(child, rows):
            layer = Int8ActivationLinear(child, rows)
        elif rows.kind == "int4" and (library is not None or _int4_fits(child)):
            layer = Int4Linear(child, (rows.q, rows.d, rows.m))
        elif rows.kind == "int8" and (library is not None or rows.group == child.in_features):
            layer = Int8Linear(child, (rows.q, rows.d.reshape(-1) if rows.group == child.in_features else rows.d))
        kind = "float" if layer is None else rows.kind
        if layer is not None:
            setattr(parent, name, layer)
        counts[kind] = counts.get(kind, 0) + 1
    log.info("quantization %s, %s activations: %s", mode, activations if integer else "float",
             ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    return counts
