"""PyTorch reference of the integer-activation linear (kernels/cpu/linear_int8.c), step for step.

Each row of x is quantised in blocks of 32 inputs (d = max|x| / 127, q = round(x * (1 / d)), half to
even; s = d * sum(q)); each weight group's integer dot product is exact; the float steps run in the
kernel's order, each output acc = fma(isum_g, d_b * dw_g, acc) over the groups g, then
acc = fma(m_b, s_b, acc) after each 32-input block of weights with an offset m, then + bias. An fma
here is computed in float64 and rounded to float32 once: the product is exact in float64, the sum
may round twice (rarely), so the kernel equals this to the last bit almost everywhere and within a
float32 rounding of the accumulated magnitude always (tests/test_int8_activations.py).
"""

from __future__ import annotations

import torch

BLOCK = 32


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] float32 (K a multiple of 32) -> (q int8 [M, K], d [M, K / 32], s [M, K / 32])."""
    m, k = x.shape
    blocks = x.float().view(m, k // BLOCK, BLOCK)
    d = blocks.abs().amax(-1) / 127
    inverse = torch.where(d != 0, 1 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))
    q = torch.round(blocks * inverse[..., None]).to(torch.int8)
    s = d * q.sum(-1, dtype=torch.int32).float()
    return q.view(m, k), d, s


def _fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return (a.double() * b.double() + c.double()).float()


def linear_int8_activations(
    x: torch.Tensor, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None = None, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [M, K] float32; weights w = d q (+ m): q [N, K] integers, d [N, K / G] (G = 16 or 32),
    m [N, K / 32] or None -> y [M, N] float32."""
    rows, k = x.shape
    n = q.shape[0]
    groups = d.shape[1]
    g_size = k // groups
    xq, xd, xs = quantize_activations(x)
    # exact integer sums per (row, output, group)
    isum = torch.einsum("mgk,ngk->mng", xq.view(rows, groups, g_size).long(), q.view(n, groups, g_size).long())
    acc = torch.zeros(rows, n, dtype=torch.float32)
    for g in range(groups):
        b = g * g_size // BLOCK
        acc = _fma(isum[..., g].float(), xd[:, b, None] * d[None, :, g].float(), acc)
        if m is not None and (g + 1) * g_size % BLOCK == 0:
            acc = _fma(m[None, :, b].float().expand(rows, n), xs[:, b, None].expand(rows, n), acc)
    return acc if bias is None else acc + bias.float()
