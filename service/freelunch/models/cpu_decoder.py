"""A Llama-family decoder's layers as one C call.

Each layer's Python path (models/llama.py) makes a dozen calls into our C kernels and PyTorch,
and between them PyTorch dispatch, ctypes and allocation cost about 0.3 ms a layer: on the
default model (30 layers, 2 AVX2 cores) about 8 of a 23 ms decode step. `fl_decoder`
(kernels/cpu/decoder.c) runs the same kernels in the same order over all layers, so its result
is bit-identical to the per-layer path. It serves any step whose attention groups read the cache
with at most CPU_KERNEL_MAX_QUERIES queries a row (decode rows, paired rows, `n` choices, draft
trees, prompt chunks that short, beside each other), over layers with q/k norms, clipping and
biases, dense or sparse Mixture-of-Experts feed-forwards (routing overridden per row: a method's weak
rows). The per-layer path still serves the rest: longer prompt chunks from position 0 (SDPA),
pruning, a split cache. FREELUNCH_CPU_DECODER=layers turns it off (profiling, comparisons).
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from freelunch.config import kernel_switch
from freelunch.kernels import cpu_kernels
from freelunch.models.attention import CPU_KERNEL_MAX_QUERIES, AttentionBatch, attention_library


class CpuDecoderStack:
    """The C descriptors of a model's layers (weights held here), reused by every step it serves."""

    def __init__(self, library: ctypes.CDLL, layers: nn.ModuleList, matrices: list[list[cpu_kernels.KernelMatrix]]) -> None:
        first = layers[0]
        attn = first.self_attn
        self.library = library
        self.matrices = matrices  # holds the weights the descriptors point at
        dense = [layer.mlp.intermediate for layer, found in zip(layers, matrices) if found[2] is not None]  # (a MoE layer: None)
        self.shape = (attn.num_heads, attn.num_kv_heads, attn.head_dim, max(dense, default=0))
        self.eps = first.input_layernorm.eps
        self.layers = (cpu_kernels.FlLayer * len(layers))()
        self.moe_kernels = []  # held: the descriptors point into them
        for desc, layer, (qkv, o, gate_up, down) in zip(self.layers, layers, matrices):
            desc.input_norm = layer.input_layernorm.weight.data_ptr()
            desc.post_norm = layer.post_attention_layernorm.weight.data_ptr()
            desc.qkv, desc.o = cpu_kernels.FlMatrix.of(qkv), cpu_kernels.FlMatrix.of(o)
            if gate_up is not None:  # a dense MLP
                desc.gate_up, desc.down = cpu_kernels.FlMatrix.of(gate_up), cpu_kernels.FlMatrix.of(down)
            else:  # a sparse MoE block
                moe = layer.mlp.kernel()
                self.moe_kernels.append(moe)
                desc.moe = ctypes.addressof(moe.desc)
            desc.qk = layer.self_attn.qk_kernel()

    @classmethod
    def build(cls, layers: nn.ModuleList) -> "CpuDecoderStack | None":
        """The stack for these layers, or None where a layer is not one the C path computes alike."""
        from freelunch.models.llama import MLP, DecoderLayer, elementwise_library
        from freelunch.models.moe import SparseMoeBlock

        library = elementwise_library()
        if kernel_switch("FREELUNCH_CPU_DECODER") == "layers" or library is None or attention_library() is None:
            return None
        if not len(layers) or not all(type(layer) is DecoderLayer for layer in layers):
            return None
        dense = [layer.mlp for layer in layers if type(layer.mlp) is MLP]
        sparse = [layer.mlp for layer in layers if type(layer.mlp) is SparseMoeBlock]
        if len(dense) + len(sparse) != len(layers) or len({m.intermediate for m in dense}) > 1:
            return None
        if any(moe.kernel() is None for moe in sparse):
            return None
        first = layers[0]
        matrices = []
        for layer in layers:
            attn, norms = layer.self_attn, (layer.input_layernorm, layer.post_attention_layernorm)
            eps = first.input_layernorm.eps
            if any(nm.weight.dtype != torch.float32 or nm.weight.device.type != "cpu" or nm.eps != eps for nm in norms):
                return None
            qk_norms = [nm for nm in (attn.q_norm, attn.k_norm) if nm is not None]
            if any(nm.weight.dtype != torch.float32 or nm.weight.device.type != "cpu" for nm in qk_norms):
                return None
            if qk_norms and attn.k_norm.eps != attn.q_norm.eps:
                return None
            qkv, o, gate_up, down = _layer_modules(layer)[:4]
            found = [getattr(m, "kernel_matrix", lambda: None)() for m in (qkv, o, gate_up, down) if m is not None]
            if any(m is None for m in found):
                return None
            matrices.append(found + [None] * (4 - len(found)))  # a MoE layer: its block's kernel instead
        return cls(library, layers, matrices)

    @staticmethod
    def modules_of(layers: nn.ModuleList) -> list[tuple[nn.Module | None, ...]]:
        """The linear modules a stack is built from, layer by layer."""
        return [_layer_modules(layer) for layer in layers]

    @staticmethod
    def built_from(modules: list[tuple[nn.Module | None, ...]], layers: nn.ModuleList) -> bool:
        """Whether the layers still hold these modules (loading packs or quantises after a model is
        made; a stack built before then, or before a layer was replaced, is stale). Checked every
        step: modules compare by identity."""
        return len(layers) == len(modules) and all(_layer_modules(layer) == seen for layer, seen in zip(layers, modules))

    def serves(self, x: torch.Tensor, attn: AttentionBatch) -> bool:
        """Whether this step is one the C path computes: float32 rows on the CPU (over a float32 or
        16-bit cache) whose groups all read the cache through one view with at most CPU_KERNEL_MAX_QUERIES queries a row, nothing pruned."""
        if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2 or not x.is_contiguous():
            return False
        if attn.drop is not None or len(attn.slot_mappings) != 1:
            return False
        if any(g.views is None or len(g.views) != 1 or g.n > CPU_KERNEL_MAX_QUERIES for g in attn.groups):
            return False
        k_cache, v_cache = attn.kv_caches[0]
        return (
            k_cache.dtype == v_cache.dtype
            and k_cache.dtype in cpu_kernels.KV_DTYPES
            and k_cache.is_contiguous()
            and v_cache.is_contiguous()
        )

    def run(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttentionBatch) -> None:
        """Every layer over x [T, hidden] in place (a step `serves` accepted)."""
        for desc, (k_cache, v_cache) in zip(self.layers, attn.kv_caches):
            desc.k_cache, desc.v_cache = k_cache.data_ptr(), v_cache.data_ptr()
            desc.kv_dtype = cpu_kernels.KV_DTYPES[k_cache.dtype]
        groups = [(g.q_index, g.batch, g.n, *g.views[0][1:]) for g in attn.groups]
        slots = attn.slot_mappings[0][1]
        routing = None if attn.routing is None else (attn.routing.rank, attn.routing.top_k)
        cpu_kernels.decoder(self.library, self.layers, x, self.shape, self.eps, cos, sin, slots, groups, attn.scale, routing)


def _layer_modules(layer: nn.Module) -> tuple[nn.Module | None, ...]:
    # read from `_modules` directly: nn.Module.__getattr__ took ~1.5 us a lookup, 430 us a step
    # over the default model's 30 layers (23 us this way)
    attn, mlp = layer._modules.get("self_attn"), layer._modules.get("mlp")
    own_attn = attn._modules if attn is not None else {}
    own_mlp = mlp._modules if mlp is not None else {}
    moe = mlp.kernel_modules() if "experts" in own_mlp else ()  # a sparse MoE block's linears
    return own_attn.get("qkv_proj"), own_attn.get("o_proj"), own_mlp.get("gate_up_proj"), own_mlp.get("down_proj"), *moe
