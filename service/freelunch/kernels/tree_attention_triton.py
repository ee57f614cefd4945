"""Triton kernel: attention of a block of query tokens over gathered paged-cache slots + a mask.

Built for draft-tree verification (Token Recycling): the n queries are the tree's nodes of
one sequence, the L keys are the committed prefix followed by the tree's own tokens, all
gathered from the flat per-layer cache by slot index, and the mask is the ancestor relation
(the prefix is always visible). Nothing in the kernel is tree-specific, though: it computes
exactly `paged_attention_ref` (same arguments, same result), so the engine can call either.

One program handles one (sequence, KV head) pair and BLOCK_M query rows of that KV head's
group: with G = H / Hkv query heads per KV head, row r is (query head kvh*G + r // n,
token r % n), so every K/V tile loaded from the cache serves all G heads at once. Keys are
visited in tiles of BLOCK_N with an online softmax (flash-attention), accumulating in float32
whatever the input dtype.

Maths per query row, in base 2 (exp(x) = 2^(x * log2 e), folded into the scale):
    s_j  = (q . k_j) * scale * log2(e)              masked keys: s_j = -inf
    m'   = max(m, max_j s_j)                         running maximum
    l'   = l * 2^(m - m') + sum_j 2^(s_j - m')       running denominator
    acc' = acc * 2^(m - m') + sum_j 2^(s_j - m') v_j
    out  = acc / l                                   (0 for a row that sees no key)
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_QUERIES = 128  # n: tree nodes (or chunk tokens) per sequence
LOG2E = 1.4426950408889634


@triton.jit
def _tree_attention_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, mask_ptr, o_ptr,
    sq_b, sq_h, sq_n, sq_d,  # q [B, H, n, D]
    sk_s, sk_h, sk_d,  # k_cache [slots, Hkv, D]
    sv_s, sv_h, sv_d,  # v_cache [slots, Hkv, D]
    si_b, si_l,  # kv_index [B, L]
    sm_b, sm_n, sm_l,  # mask [B, n, L] (uint8 view of bool)
    so_b, so_h, so_n, so_d,  # out [B, H, n, D]
    n, L, num_kv_heads, group,
    qk_scale,  # scale * log2(e)
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr,  # tl.dot input precision: "ieee" keeps float32 exact (no TF32)
    UPCAST: tl.constexpr,  # interpreter: it has no bf16 arithmetic, so dot in float32
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_kv_heads).to(tl.int64)
    kvh = pid_bh % num_kv_heads

    # Rows of this program: (query head, token) pairs of KV head kvh's group.
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    row_ok = rows < group * n
    head = kvh * group + rows // n  # [BM]
    tok = rows % n  # [BM]
    d = tl.arange(0, HEAD_DIM)  # [D]

    q_off = b * sq_b + head[:, None] * sq_h + tok[:, None] * sq_n + d[None, :] * sq_d
    q = tl.load(q_ptr + q_off, mask=row_ok[:, None], other=0.0)  # [BM, D]
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running denominator
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)  # running numerator

    for start in range(0, L, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)  # [BN] key positions
        col_ok = cols < L  # the last tile may run past L
        slots = tl.load(idx_ptr + b * si_b + cols * si_l, mask=col_ok, other=0).to(tl.int64)  # [BN]
        k = tl.load(
            k_ptr + slots[:, None] * sk_s + kvh * sk_h + d[None, :] * sk_d, mask=col_ok[:, None], other=0.0
        )  # [BN, D]
        v = tl.load(
            v_ptr + slots[:, None] * sv_s + kvh * sv_h + d[None, :] * sv_d, mask=col_ok[:, None], other=0.0
        )  # [BN, D]
        if UPCAST:
            k = k.to(tl.float32)

        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BM, BN]
        visible = row_ok[:, None] & col_ok[None, :]
        if HAS_MASK:
            mk = tl.load(
                mask_ptr + b * sm_b + tok[:, None] * sm_n + cols[None, :] * sm_l, mask=visible, other=0
            )
            visible = visible & (mk != 0)
        s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))  # [BM]
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key seen yet: avoid -inf - -inf
        alpha = tl.exp2(m_i - m_ref)  # rescales what was accumulated so far
        p = tl.exp2(s - m_ref[:, None])  # [BM, BN], 0 where masked
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        p = p.to(v_ptr.dtype.element_ty)  # the second product runs in the cache dtype
        if UPCAST:
            acc += tl.dot(p.to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            acc = tl.dot(p, v, acc, input_precision=PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_off = b * so_b + head[:, None] * so_h + tok[:, None] * so_n + d[None, :] * so_d
    tl.store(o_ptr + o_off, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])


# The interpreter (TRITON_INTERPRET=1 when this module is imported) runs on CPU tensors.
INTERPRETED = not isinstance(_tree_attention_kernel, triton.runtime.JITFunction)


def tree_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_index: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Same contract as `paged_attention_ref`, on the Triton kernel.

    q: [B, H, n, D]; k_cache, v_cache: [slots, Hkv, D]; kv_index: [B, L] slot ids;
    mask: [B, n, L] bool (True = may attend) or None (all visible). Returns [B, H, n, D]
    in q's dtype. H must be a multiple of Hkv; D in SUPPORTED_HEAD_DIMS; n <= MAX_QUERIES.
    Any strides are fine (the engine passes a transposed view of q). A query that sees no
    key gets zeros. block_m / block_n / num_warps override the tile heuristics.
    """
    b, h, n, dim = q.shape
    _, hkv, dim_k = k_cache.shape
    if v_cache.shape != k_cache.shape or dim_k != dim:
        raise ValueError(
            f"k/v cache {tuple(k_cache.shape)}/{tuple(v_cache.shape)} do not fit q {tuple(q.shape)}"
        )
    if q.dtype not in SUPPORTED_DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(
            f"q/k/v dtypes {q.dtype}/{k_cache.dtype}/{v_cache.dtype}: all one of {SUPPORTED_DTYPES}"
        )
    if dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {dim} not supported (one of {SUPPORTED_HEAD_DIMS})")
    if h % hkv:
        raise ValueError(f"{h} query heads are not a multiple of {hkv} KV heads")
    if n > MAX_QUERIES:
        raise ValueError(f"{n} queries per sequence > {MAX_QUERIES}")
    if kv_index.dim() != 2 or kv_index.shape[0] != b or kv_index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"kv_index {tuple(kv_index.shape)} is not int32/int64 [B={b}, L]")
    length = kv_index.shape[1]
    if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (b, n, length)):
        raise ValueError(
            f"mask must be bool [B, n, L] = {(b, n, length)}, got {mask.dtype} {tuple(mask.shape)}"
        )
    if not INTERPRETED and not q.is_cuda:
        raise RuntimeError("the compiled Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 at import)")

    out = q.new_empty(b, h, n, dim)
    if out.numel() == 0:
        return out
    group = h // hkv
    rows = group * n  # query rows per (sequence, KV head)
    bm = block_m or min(64, max(16, triton.next_power_of_2(rows)))
    # Untuned defaults: K/V tiles x 2 pipeline stages + the q block stay within ~100 KB of
    # shared memory with 64-key tiles, 32 for float32 at D=128.
    bn = block_n or (64 if dim * q.element_size() <= 256 else 32)
    warps = num_warps or (8 if bm * dim >= 8192 else 4)
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    # Without a mask, any tensor stands in for the pointer: HAS_MASK=False never reads it.
    m = mask.view(torch.uint8) if mask is not None else kv_index
    m_strides = m.stride() if mask is not None else (0, 0, 0)

    grid = (triton.cdiv(rows, bm), b * hkv)
    _tree_attention_kernel[grid](
        q, k_cache, v_cache, kv_index, m, out,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *kv_index.stride(), *m_strides, *out.stride(),
        n, length, hkv, group,
        scale * LOG2E,
        HEAD_DIM=dim, BLOCK_M=bm, BLOCK_N=bn, HAS_MASK=mask is not None,
        # input_precision only matters for float32 operands; 16-bit ones take the default.
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", UPCAST=INTERPRETED,
        num_warps=warps, num_stages=2,
    )  # fmt: skip
    return out
