"""Triton kernels: a sparse MoE layer's experts as two grouped matmuls (the `fused_moe` layout).

The K routing slots of T tokens are sorted by expert and each expert's run is padded to a multiple
of BLOCK_M, so that every block of BLOCK_M slots belongs to one expert (`align_slots`). Then:
  1. `_gate_up_kernel`: per block, h = silu(x_rows @ gate[e]^T) * (x_rows @ up[e]^T)  -> [slots, I]
     (gate and up are the two halves of one [E, 2I, H] weight, as models/llama.py's MLP holds them)
  2. `_down_kernel`:    per block, y = (h_rows @ down[e]^T) * weight(slot)           -> [T * K, H]
and each token sums its K slot rows. A token's x is gathered by slot (no copy of x per slot), and
an expert's weight tiles are loaded once per block of its tokens instead of once per token.
Unused slots (-1) go nowhere and add zero. Matmuls accumulate in float32; h is rounded to the
weights' dtype between the two kernels (as vLLM's fused_moe does). Computes exactly
`moe_ref.grouped_expert_mlp_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _block_of_slots(slots_ptr, block_expert_ptr, num_slots, BLOCK_M: tl.constexpr):
    """This program's block: its rows of the sorted slots, their slot ids, which are real (not
    padding), and the block's expert."""
    pid_m = tl.program_id(0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(slots_ptr + rows)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    return rows, slot, slot < num_slots, expert


@triton.jit
def _gate_up_kernel(
    x_ptr, w_ptr, h_ptr, slots_ptr, block_expert_ptr,
    sx_t, sx_h,  # x [T, H]
    sw_e, sw_i, sw_h,  # gate_up [E, 2I, H]: rows [0, I) gate, [I, 2I) up
    sh_s, sh_i,  # h [padded slots, I]
    num_slots, top_k, hidden, inter,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,  # tl.dot input precision: "ieee" keeps float32 exact (no TF32)
    UPCAST: tl.constexpr,  # interpreter: it has no bf16 arithmetic, so dot in float32
):  # fmt: skip
    if tl.load(slots_ptr + tl.program_id(0) * BLOCK_M) >= num_slots:
        return  # a block past the used ones (align_slots): only sentinels
    rows, slot, valid, expert = _block_of_slots(slots_ptr, block_expert_ptr, num_slots, BLOCK_M)
    pid_n = tl.program_id(1)
    token = tl.where(valid, slot // top_k, 0)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # intermediate features
    col_ok = cols < inter
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < hidden
        a = tl.load(x_ptr + token[:, None] * sx_t + ks[None, :] * sx_h, mask=valid[:, None] & k_ok[None, :], other=0.0)
        w_off = expert * sw_e + cols[None, :] * sw_i + ks[:, None] * sw_h  # [BLOCK_K, BLOCK_N]: W[e]^T tile
        w_mask = k_ok[:, None] & col_ok[None, :]
        wg = tl.load(w_ptr + w_off, mask=w_mask, other=0.0)
        wu = tl.load(w_ptr + inter * sw_i + w_off, mask=w_mask, other=0.0)
        if UPCAST:
            a, wg, wu = a.to(tl.float32), wg.to(tl.float32), wu.to(tl.float32)
        acc_g = tl.dot(a, wg, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(a, wu, acc_u, input_precision=PRECISION)
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    tl.store(
        h_ptr + rows[:, None] * sh_s + cols[None, :] * sh_i,
        h.to(h_ptr.dtype.element_ty),
        mask=valid[:, None] & col_ok[None, :],
    )


@triton.jit
def _down_kernel(
    h_ptr, wd_ptr, weights_ptr, y_ptr, slots_ptr, block_expert_ptr,
    sh_s, sh_i,  # h [padded slots, I]
    sw_e, sw_h, sw_i,  # down [E, H, I]
    sy_s, sy_h,  # y [T * K, H]
    num_slots, hidden, inter,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    if tl.load(slots_ptr + tl.program_id(0) * BLOCK_M) >= num_slots:
        return
    rows, slot, valid, expert = _block_of_slots(slots_ptr, block_expert_ptr, num_slots, BLOCK_M)
    pid_n = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # hidden features
    col_ok = cols < hidden
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < inter
        a = tl.load(h_ptr + rows[:, None] * sh_s + ks[None, :] * sh_i, mask=valid[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(
            wd_ptr + expert * sw_e + cols[None, :] * sw_h + ks[:, None] * sw_i,
            mask=k_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    weight = tl.load(weights_ptr + tl.where(valid, slot, 0), mask=valid, other=0.0)
    acc = acc * weight[:, None]
    tl.store(y_ptr + slot[:, None] * sy_s + cols[None, :] * sy_h, acc, mask=valid[:, None] & col_ok[None, :])


# Triton set TRITON_INTERPRET=1 at import: the kernels are interpreted (tests on CPU)
INTERPRETED = not isinstance(_gate_up_kernel, triton.runtime.JITFunction)


def align_slots(experts: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot ids (t * K + j) sorted by expert, each expert's run padded to a multiple of `block_m`
    with the sentinel T * K; and the expert of each block. Unused slots (-1) are left out.

    No host sync (a GPU step would otherwise wait here twice a layer): the arrays have a capacity
    known from the shapes alone, the most any routing can need (every expert's run padded by
    block_m - 1); blocks past the used ones hold only sentinels and their programs exit at once."""
    flat = experts.flatten()
    num_slots = flat.numel()
    key = torch.where(flat >= 0, flat, num_experts)  # unused slots sort last
    order = torch.argsort(key, stable=True)
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device).scatter_add_(0, key, torch.ones_like(key))
    counts = counts[:num_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    start = torch.cumsum(counts, 0) - counts
    padded_start = torch.cumsum(padded, 0) - padded
    capacity = -(-(num_slots + num_experts * (block_m - 1)) // block_m) * block_m
    sorted_key = key[order]
    expert = sorted_key.clamp(max=num_experts - 1)
    rank = torch.arange(num_slots, device=flat.device) - start[expert]  # place in its expert's run
    dest = torch.where(sorted_key < num_experts, padded_start[expert] + rank, capacity)  # unused: past the end
    slots = torch.full((capacity + 1,), num_slots, dtype=torch.int32, device=flat.device)
    slots.scatter_(0, dest, order.to(torch.int32))
    block_starts = torch.arange(0, capacity, block_m, device=flat.device)
    block_expert = torch.searchsorted(torch.cumsum(padded, 0), block_starts, right=True).clamp(max=num_experts - 1)
    return slots[:capacity], block_expert.to(torch.int32)


def grouped_expert_mlp(
    x: torch.Tensor,
    experts: torch.Tensor,
    weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    block_m: int = 16,
    block_n: int = 32,
    block_k: int = 32,
) -> torch.Tensor:
    """Same arguments and result as `moe_ref.grouped_expert_mlp_ref`."""
    if x.dtype not in SUPPORTED_DTYPES or not x.dtype == w_gate_up.dtype == w_down.dtype:
        raise ValueError(f"x and the expert weights must share one of {SUPPORTED_DTYPES}")
    T, hidden = x.shape
    num_experts, inter = w_down.shape[0], w_down.shape[2]
    if tuple(w_gate_up.shape) != (num_experts, 2 * inter, hidden):
        raise ValueError(f"gate_up weights of shape {tuple(w_gate_up.shape)}; expected {(num_experts, 2 * inter, hidden)}")
    top_k = experts.shape[1]
    num_slots = T * top_k
    slots, block_expert = align_slots(experts, num_experts, block_m)
    y = torch.zeros((num_slots, hidden), dtype=torch.float32, device=x.device)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    if slots.numel():
        h = torch.empty((slots.numel(), inter), dtype=w_down.dtype, device=x.device)
        blocks = slots.numel() // block_m
        _gate_up_kernel[(blocks, triton.cdiv(inter, block_n))](
            x, w_gate_up, h, slots, block_expert,
            x.stride(0), x.stride(1), w_gate_up.stride(0), w_gate_up.stride(1), w_gate_up.stride(2), h.stride(0), h.stride(1),
            num_slots, top_k, hidden, inter,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=precision, UPCAST=INTERPRETED,
        )  # fmt: skip
        flat_weights = weights.reshape(-1).to(torch.float32).contiguous()
        _down_kernel[(blocks, triton.cdiv(hidden, block_n))](
            h, w_down, flat_weights, y, slots, block_expert,
            h.stride(0), h.stride(1), w_down.stride(0), w_down.stride(1), w_down.stride(2), y.stride(0), y.stride(1),
            num_slots, hidden, inter,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=precision, UPCAST=INTERPRETED,
        )  # fmt: skip
    return y.view(T, top_k, hidden).sum(dim=1).to(x.dtype)
