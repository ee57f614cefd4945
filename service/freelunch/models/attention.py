"""Per-step attention metadata: where each new token's K/V goes and what each query may see.

The model runner builds one `AttentionBatch` per forward. Rows are split into groups that
share a shape: all single-token decode rows form one padded batch; each multi-token row
(prefill chunk, draft tree) is its own group with a causal or custom mask.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from freelunch.config import kernel_switch
from freelunch.kernels import cpu_kernels
from freelunch.kernels.paged_attention_ref import paged_attention_ref, sdpa_gqa
from freelunch.models.expert_routing import ExpertRouting

# Up to this many queries per row, the C kernel (kernels/cpu/attention.c) serves attention on
# float32 CPUs. Alone it beats gathering the keys and calling SDPA up to 16 (15 vs 76 us for one query
# over 300 keys, 78 vs 118 for 8, 159 vs 4300 for 16 decode rows over 300); at 64 over 300 keys it
# takes 670 us to SDPA's 435, but it lets the step run as one C call (models/cpu_decoder.py), which
# saves about 0.3 ms a layer: draft trees of 64 nodes and short prompt chunks ride it.
CPU_KERNEL_MAX_QUERIES = 64
# Fresh prompt chunks up to this many tokens also attend through the C kernel, over the cache, rather
# than SDPA over their own keys: a prompt computed fresh and the same prompt found in the prefix cache
# (its tail computed over the cached blocks) then take the same sums in the same order, to the bit.
# SDPA's other order moved logprobs by ~1e-6, which int8 activations can turn into another token
# (2 of 9 chats, Token Recycling on first sight after plain decoding of the same chat). Longer
# chunks keep SDPA (a 1,500-token prompt's time to first token).
CPU_PROMPT_MAX_QUERIES = 256


@functools.cache
def attention_library():
    """The C kernels' library unless FREELUNCH_CPU_ATTENTION=sdpa (read once: ~10 us a lookup, 30 a step)."""
    return None if kernel_switch("FREELUNCH_CPU_ATTENTION") == "sdpa" else cpu_kernels.load()


def _cpu_kernels_for(q: torch.Tensor, k_cache: torch.Tensor, n: int):
    """The C attention kernel's library when it serves these queries (float32 queries on the CPU over a
    float32 or 16-bit cache), else None."""
    if n > CPU_PROMPT_MAX_QUERIES or q.device.type != "cpu" or q.dtype != torch.float32:
        return None
    if k_cache.dtype not in cpu_kernels.KV_DTYPES or not k_cache.is_contiguous():
        return None
    return attention_library()


def _triton_serves(q: torch.Tensor, k_cache: torch.Tensor, n: int) -> bool:
    """Whether the Triton kernel (kernels/tree_attention_triton.py) takes these queries: its head
    sizes, dtypes and query count, over a cache in the queries' dtype."""
    from freelunch.kernels.tree_attention_triton import MAX_QUERIES, SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS

    return q.dtype in SUPPORTED_DTYPES and k_cache.dtype == q.dtype and q.shape[-1] in SUPPORTED_HEAD_DIMS and n <= MAX_QUERIES


@dataclass(slots=True)
class AttentionGroup:
    """Queries of B rows with n tokens each, attending over gathered cache slots."""

    q_index: torch.Tensor | None  # [B*n] packed token indices; None = the whole packed batch in order
    batch: int
    n: int
    # (from layer, [B, L] slot ids, [B, n, L] bool mask or None = all visible), by layer: a split
    # cache keeps upper layers in other slots, and tokens dropped at an earlier prefill are hidden
    # (or absent) from their pruning layer on. None = fresh causal prefill (attend to own k/v).
    views: list[tuple[int, torch.Tensor, torch.Tensor | None]] | None

    def view_at(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(slot ids, mask) that `layer` attends over."""
        return next((index, mask) for start, index, mask in reversed(self.views) if start <= layer)


def query_attention(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """One query's attention probabilities over keys it sees, mean over heads: q [H, D], k [L, Hkv, D] -> [L].

    float32 softmax like transformers' eager attention (a prefill transform that selects tokens reads these weights)."""
    k = k.repeat_interleave(q.shape[0] // k.shape[1], dim=1)  # GQA: each kv head serves a group of q heads
    scores = torch.einsum("hd,lhd->hl", q.float(), k.float()) * scale
    return scores.softmax(dim=-1).mean(dim=0)


@dataclass(slots=True)
class TokenDropPlan:
    """Drop packed tokens before `layer`; later layers use the metadata that `resolve` builds then.

    `resolve` runs when the layer is reached, so that a selection may depend on this very forward:
    each probe (packed index of a query, packed indices of the keys it sees) records that query's
    attention (`query_attention`) at layer - 1, and `resolve` gets them in probe order.
    """

    layer: int
    resolve: Callable[[list[torch.Tensor]], tuple[torch.Tensor, AttentionBatch]]
    probes: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    observed: list[torch.Tensor] = field(default_factory=list)
    keep: torch.Tensor | None = None  # [T'] packed indices kept, once resolved


@dataclass(slots=True)
class AttentionBatch:
    # per layer: k, v [slots, Hkv, D], in the cache's dtype (16 bits on CPUs: written rounded to it,
    # read widened back to the compute dtype)
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    # (from layer, [T] cache slot of each packed token), by layer (a split cache's upper layers
    # keep tokens in slots of their own)
    slot_mappings: list[tuple[int, torch.Tensor]]
    groups: list[AttentionGroup]
    scale: float
    drop: TokenDropPlan | None = None
    # per row, in packing order: (extra model inputs, token count): e.g. a MoE routing override the
    # model interprets (models/moe.py); opaque to the engine
    row_inputs: list[tuple[dict[str, Any], int]] = field(default_factory=list)
    routing: ExpertRouting | None = None  # per-token MoE routing override (None: every token routes by default)
    triton: bool = False  # the Triton kernels serve attention over the cache (and MoE experts: models/moe.py)

    def keep_before_layer(self, layer: int) -> torch.Tensor | None:
        """Packed indices to keep from `layer` on, when a prefill transform drops tokens there."""
        drop = self.drop
        if drop is None or layer != drop.layer:
            return None
        drop.keep, after = drop.resolve(drop.observed)
        self.slot_mappings, self.groups = after.slot_mappings, after.groups
        if self.routing is not None:
            self.routing = self.routing.select(drop.keep)
        return drop.keep

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D] for the packed tokens -> attention output [T, H*D]."""
        drop = self.drop
        if drop is not None and drop.probes and layer == drop.layer - 1:
            drop.observed = [query_attention(q[query], k[keys], self.scale) for query, keys in drop.probes]
        k_cache, v_cache = self.kv_caches[layer]
        slots = next(m for start, m in reversed(self.slot_mappings) if start <= layer)
        k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)  # a 16-bit cache's rounding (no copy otherwise)
        k_cache.index_copy_(0, slots, k)
        v_cache.index_copy_(0, slots, v)
        # every path attends to the values as stored: a fresh prompt's own keys too (SDPA below), as the
        # decode steps after it and a request that finds the prompt in the prefix cache see them
        k, v = k.to(q.dtype), v.to(q.dtype)
        t, h, d = q.shape
        if len(self.groups) == 1 and self.groups[0].q_index is None:
            return self._attend_group(self.groups[0], layer, q, k, v).reshape(t, h * d)
        out = q.new_empty(t, h, d)
        for g in self.groups:
            rows = g.q_index
            out[rows] = self._attend_group(g, layer, q[rows], k[rows], v[rows])
        return out.reshape(t, h * d)

    def _attend_group(
        self, g: AttentionGroup, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """Group's packed q [B*n, H, D] -> [B*n, H, D]."""
        h, d = q.shape[1], q.shape[2]
        qb = q.view(g.batch, g.n, h, d).transpose(1, 2)  # [B, H, n, D]
        if g.views is None:  # a prompt chunk starting at position 0: its own keys, causal
            kb = k.view(g.batch, g.n, -1, d).transpose(1, 2)
            vb = v.view(g.batch, g.n, -1, d).transpose(1, 2)
            o = sdpa_gqa(qb, kb, vb, None, is_causal=g.n > 1, scale=self.scale)
        else:
            k_cache, v_cache = self.kv_caches[layer]
            kv_index, mask = g.view_at(layer)
            if self.triton and _triton_serves(q, k_cache, g.n):
                from freelunch.kernels.tree_attention_triton import tree_attention

                return tree_attention(qb, k_cache, v_cache, kv_index, mask, self.scale).transpose(1, 2).reshape(g.batch * g.n, h, d)
            library = _cpu_kernels_for(q, k_cache, g.n)
            if library is not None:  # [B, n, H, D] in and out: the packed layout
                o = cpu_kernels.paged_attention(library, q.view(g.batch, g.n, h, d), k_cache, v_cache, kv_index, mask, self.scale)
                return o.view(g.batch * g.n, h, d)
            o = paged_attention_ref(qb, k_cache, v_cache, kv_index, mask, scale=self.scale)
        return o.transpose(1, 2).reshape(g.batch * g.n, h, d)
