"""PyTorch reference for attention over a paged KV cache with an explicit mask.

This is what CPU runs use, and what every Triton kernel in this folder is tested against.
The cache is a flat slot array per layer ([slots, Hkv, D]); a row's keys are gathered by
slot index, so paged blocks, tree drafts and dropped tokens are all just index lists + masks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_index: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of queries over gathered cache slots.

    q: [B, H, n, D]; k_cache, v_cache: [slots, Hkv, D]; kv_index: [B, L] slot ids;
    mask: [B, n, L] bool (True = may attend) or None (all visible). Returns [B, H, n, D].
    H must be a multiple of Hkv (grouped-query attention). A cache in another dtype than q's (16 bits
    on CPUs) is widened to q's after the gather.
    """
    b, length = kv_index.shape
    flat = kv_index.reshape(-1)
    k = k_cache.index_select(0, flat).view(b, length, *k_cache.shape[1:]).transpose(1, 2)  # [B, Hkv, L, D]
    v = v_cache.index_select(0, flat).view(b, length, *v_cache.shape[1:]).transpose(1, 2)
    if k.dtype != q.dtype:
        k, v = k.to(q.dtype), v.to(q.dtype)
    return sdpa_gqa(q, k, v, None if mask is None else mask[:, None], scale=scale)


def sdpa_gqa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """SDPA with grouped-query heads: q [B, H, n, D], k/v [B, Hkv, L, D], mask broadcastable to [B, H, n, L]."""
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
