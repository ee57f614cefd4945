"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, SmolLM2) over a packed batch.

All rows of a step are packed into one token dimension [T]; the linear layers see one
matrix, attention goes through `AttentionBatch`, which reads and writes the paged KV cache.
Numerics follow transformers' modeling_llama (RMSNorm in float32, RoPE tables from
transformers' own rope init functions) so greedy tokens match it exactly in float32.
MoE models (moe.py) reuse it with sparse feed-forward blocks (`feed_forward`, `load_feed_forward`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from freelunch.config import kernel_switch
from freelunch.kernels import cpu_kernels
from freelunch.models.attention import AttentionBatch
from freelunch.models.cpu_decoder import CpuDecoderStack
from freelunch.models.expert_routing import ExpertRouting
from freelunch.models.moe_config import MoeConfig


@dataclass(frozen=True, slots=True)
class DecoderConfig:
    """What the engine needs to know about a decoder, read from a transformers config."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # biases on q, k and v
    o_proj_bias: bool
    mlp_bias: bool
    # RMSNorm of q and k before RoPE: "head" on each head (Qwen3), "projection" over all heads
    # at once (OLMoE), None for none
    qk_norm: str | None
    clip_qkv: float | None  # OLMoE: q, k, v clamped to [-clip, clip]
    eos_token_ids: tuple[int, ...]
    moe: MoeConfig | None = None  # sparse MoE feed-forward layers (moe.py), None for a dense model

    @classmethod
    def from_hf(cls, hf_config) -> "DecoderConfig":
        c = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        eos = getattr(c, "eos_token_id", None)
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        model_type = getattr(c, "model_type", "llama")
        max_positions = getattr(c, "max_position_embeddings", 4096)
        window = _sliding_window(c)
        bias = bool(getattr(c, "attention_bias", False))  # Llama, Qwen3, OLMoE: q, k, v and o
        return cls(
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_layers=c.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            rms_norm_eps=c.rms_norm_eps,
            # Within its window, sliding-window attention is full attention: serve no longer contexts.
            max_position_embeddings=max_positions if window is None else min(max_positions, window),
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases; Qwen2-MoE says so in `qkv_bias`.
            attention_bias=bias or model_type == "qwen2" or bool(getattr(c, "qkv_bias", False)),
            o_proj_bias=bias,
            mlp_bias=bool(getattr(c, "mlp_bias", False)),
            qk_norm={"qwen3": "head", "qwen3_moe": "head", "olmoe": "projection"}.get(model_type),
            clip_qkv=getattr(c, "clip_qkv", None),
            eos_token_ids=eos_ids,
            moe=MoeConfig.from_hf(c),
        )


def _sliding_window(c) -> int | None:
    """The attention window of a config that uses one (Mistral, Mixtral, Qwen2 with use_sliding_window)."""
    window = getattr(c, "sliding_window", None)
    if not window or getattr(c, "use_sliding_window", True) is False:
        return None
    return window


@functools.cache
def elementwise_library():
    """The C kernels for norms, RoPE and SwiGLU unless FREELUNCH_CPU_ELEMENTWISE=torch (read once)."""
    return None if kernel_switch("FREELUNCH_CPU_ELEMENTWISE") == "torch" else cpu_kernels.load()


def _fused(*tensors: torch.Tensor):
    """The C kernels' library when every tensor is float32 on the CPU (else None: PyTorch ops)."""
    for t in tensors:
        if t.dtype != torch.float32 or t.device.type != "cpu":
            return None
    return elementwise_library()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        library = _fused(x, self.weight)
        if library is not None:  # one call: F.rms_norm's ops took 25-60 us at a decode step's size
            return cpu_kernels.rms_norm(library, x, self.weight, self.eps)[1]
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # one fused op (bit-identical to the composite below in float32; ~3x fewer us per call)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def add_forward(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, the norm of it): the residual add and the norm in one pass where fused."""
        library = _fused(x, delta, self.weight)
        if library is not None:
            return cpu_kernels.rms_norm(library, x, self.weight, self.eps, delta)
        total = x + delta
        return total, self(total)


class RotaryTable(nn.Module):
    """cos/sin for every position, computed once with transformers' rope init (all scaled variants)."""

    def __init__(self, hf_config, head_dim: int, max_positions: int) -> None:
        super().__init__()
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        c = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
        params = getattr(c, "rope_parameters", None) or {}
        rope_type = params.get("rope_type", "default")
        if rope_type == "default":
            base = params.get("rope_theta", getattr(c, "rope_theta", 10000.0))
            inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
            scaling = 1.0
        else:
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](c, torch.device("cpu"))
        pos = torch.arange(max_positions, dtype=torch.float)
        freqs = pos[:, None] * inv_freq[None, :]  # [P, D/2], same product as transformers' matmul
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * scaling, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions].to(dtype), self.sin[positions].to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, q + 2 * kv, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(q, cfg.hidden_size, bias=cfg.o_proj_bias)
        self.qk_norm = cfg.qk_norm
        q_norm_dim, k_norm_dim = (q, kv) if cfg.qk_norm == "projection" else (cfg.head_dim, cfg.head_dim)
        self.q_norm = RMSNorm(q_norm_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(k_norm_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.clip_qkv = cfg.clip_qkv
        self.split = (q, kv, kv)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttentionBatch) -> torch.Tensor:
        t = x.shape[0]
        h, hkv = self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(x)
        norms = [norm.weight for norm in (self.q_norm, self.k_norm) if norm is not None]
        library = _fused(qkv, cos, *norms) if qkv.is_contiguous() else None
        if library is not None:  # norms, clipping and RoPE in place in one call, as the one-call decoder does
            cpu_kernels.qk_prepare_(library, qkv, self.qk_kernel(), h, hkv, self.head_dim, cos, sin)
            qkv = qkv.view(t, h + 2 * hkv, self.head_dim)
            q, k, v = qkv[:, :h], qkv[:, h : h + hkv], qkv[:, h + hkv :]
            return self.o_proj(attn.attend(self.layer_idx, q, k, v))
        if self.qk_norm == "projection":  # OLMoE: one norm over all q heads, one over all k heads
            q, k, v = qkv.split(self.split, dim=-1)
            qkv = torch.cat([self.q_norm(q), self.k_norm(k), v], dim=-1)
        if self.clip_qkv is not None:  # OLMoE clamps after the norms
            qkv = qkv.clamp(-self.clip_qkv, self.clip_qkv)
        qkv = qkv.view(t, h + 2 * hkv, self.head_dim)  # [T, H + 2*Hkv, D]
        qk, v = qkv[:, : h + hkv], qkv[:, h + hkv :]
        if self.qk_norm == "head":
            qk = torch.cat([self.q_norm(qk[:, :h]), self.k_norm(qk[:, h:])], dim=1)
        qk = qk * cos[:, None, :] + rotate_half(qk) * sin[:, None, :]  # q and k heads at once
        out = attn.attend(self.layer_idx, qk[:, :h], qk[:, h:], v)  # [T, H*D]
        return self.o_proj(out)

    def qk_kernel(self) -> cpu_kernels.FlQk:
        """This layer's q/k norms and clipping as the C kernels take them (float32 norm weights)."""
        q_norm, k_norm = self.q_norm, self.k_norm
        return cpu_kernels.FlQk.of(
            self.qk_norm, None if q_norm is None else q_norm.weight, None if k_norm is None else k_norm.weight,
            q_norm.eps if q_norm is not None else 0.0, self.clip_qkv,
        )  # fmt: skip


class MLP(nn.Module):
    """SwiGLU feed-forward, gate and up in one matmul (also each expert of a MoE layer)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        self.intermediate = intermediate_size
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        library = _fused(gate_up)
        if library is not None:
            return self.down_proj(cpu_kernels.silu_mul(library, gate_up))
        gate, up = gate_up.split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer_idx: int, feed_forward: nn.Module) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = feed_forward

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttentionBatch) -> torch.Tensor:
        x, h = self.post_attention_layernorm.add_forward(x, self.self_attn(self.input_layernorm(x), cos, sin, attn))
        # a dense MLP sees only hidden states; a MoE block also the batch's per-token routing override
        return x + (self.mlp(h) if isinstance(self.mlp, MLP) else self.mlp(h, attn.routing, attn.triton))


STACK_PATH, LAYER_PATH = "one_call", "per_layer"


class LlamaForCausalLM(nn.Module):
    """Packed-batch Llama. `forward` returns hidden states; `logits` projects selected rows."""

    def __init__(self, cfg: DecoderConfig, hf_config) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, self.feed_forward(i)) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryTable(hf_config, cfg.head_dim, cfg.max_position_embeddings)
        # forwards by the path they took (/metrics): STACK_PATH (every layer in one C call) or LAYER_PATH
        self.steps_by_path: dict[str, int] = {STACK_PATH: 0, LAYER_PATH: 0}

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionBatch,
        input_embeds: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T', hidden] (T' < T if tokens were dropped).

        `input_embeds` (packed indices [k], values [k, hidden]) replace those tokens' embeddings
        (image features at their placeholder tokens)."""
        attn.routing = self.routing_override(attn.row_inputs, input_ids.device)
        x = self.embed_tokens(input_ids)
        if input_embeds is not None:
            index, values = input_embeds
            x = x.index_copy(0, index, values.to(x.dtype))
        cos, sin = self.rotary(positions, x.dtype)
        stack = self.cpu_decoder_stack()
        if stack is not None and not attn.triton and stack.serves(x, attn):  # every layer in one C call, bit-identical
            stack.run(x, cos, sin, attn)
            self.steps_by_path[STACK_PATH] += 1
            return self.norm(x)
        self.steps_by_path[LAYER_PATH] += 1
        for i, layer in enumerate(self.layers):
            keep = attn.keep_before_layer(i)
            if keep is not None:  # a prefill transform drops tokens from here on
                x, cos, sin = x[keep], cos[keep], sin[keep]
            x = layer(x, cos, sin, attn)
        return self.norm(x)

    def cpu_decoder_stack(self) -> CpuDecoderStack | None:
        """The layers' C descriptors, built at the first step (after loading has packed or quantised
        the weights) and again if a layer's modules were replaced since."""
        built = self.__dict__.get("_cpu_stack_built")
        if built is None or not CpuDecoderStack.built_from(built[0], self.layers):
            built = (CpuDecoderStack.modules_of(self.layers), CpuDecoderStack.build(self.layers))
            self.__dict__["_cpu_stack_built"] = built
        return built[1]

    def routing_override(self, row_inputs: list[tuple[dict[str, Any], int]], device: torch.device) -> ExpertRouting | None:
        """Per-token routing from the rows' inputs (a dense model has none to override)."""
        return None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> float32 logits [N, vocab]."""
        return self.lm_head(hidden).float()

    def feed_forward(self, layer_idx: int) -> nn.Module:
        """The feed-forward block of a layer (MoE models override this)."""
        cfg = self.config
        return MLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)

    # ---- weights -------------------------------------------------------------------------
    def load_hf_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load transformers-named weights, fusing q/k/v and gate/up into one matmul each."""
        weights = CheckpointWeights(self, tensors)
        get, put = weights.get, weights.put
        prefix = "model." if any(k.startswith("model.") for k in tensors) else ""
        put("embed_tokens.weight", get(f"{prefix}embed_tokens.weight"))
        put("norm.weight", get(f"{prefix}norm.weight"))
        if not self.config.tie_word_embeddings:
            put("lm_head.weight", get("lm_head.weight"))
        for i in range(self.config.num_layers):
            src, dst = f"{prefix}layers.{i}.", f"layers.{i}."
            a = src + "self_attn."
            put(dst + "self_attn.qkv_proj.weight", torch.cat([get(a + f"{p}_proj.weight") for p in "qkv"]))
            if self.config.attention_bias:
                put(dst + "self_attn.qkv_proj.bias", torch.cat([get(a + f"{p}_proj.bias") for p in "qkv"]))
            put(dst + "self_attn.o_proj.weight", get(a + "o_proj.weight"))
            if self.config.o_proj_bias:
                put(dst + "self_attn.o_proj.bias", get(a + "o_proj.bias"))
            if self.config.qk_norm:
                put(dst + "self_attn.q_norm.weight", get(a + "q_norm.weight"))
                put(dst + "self_attn.k_norm.weight", get(a + "k_norm.weight"))
            self.load_feed_forward(weights, i, src, dst + "mlp.")
            put(dst + "input_layernorm.weight", get(src + "input_layernorm.weight"))
            put(dst + "post_attention_layernorm.weight", get(src + "post_attention_layernorm.weight"))
        missing = {k for k in weights.missing() if not (k == "lm_head.weight" and self.config.tie_word_embeddings)}
        if missing:
            raise KeyError(f"weights not found in checkpoint: {sorted(missing)[:5]}")

    def load_feed_forward(self, weights: CheckpointWeights, layer_idx: int, src: str, dst: str) -> None:
        """Layer `layer_idx`'s feed-forward weights; `src` is the checkpoint's layer prefix, `dst` our block's."""
        load_gated_mlp(weights, src + "mlp.", dst, bias=self.config.mlp_bias)


class CheckpointWeights:
    """Checkpoint tensors copied into a module's state dict by name, shapes checked, the copied ones counted."""

    def __init__(self, module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        self.own = module.state_dict()
        self.tensors = tensors
        self.loaded: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def put(self, name: str, value: torch.Tensor) -> None:
        if name not in self.own:
            raise KeyError(f"unexpected weight {name}")
        if self.own[name].shape != value.shape:
            raise ValueError(f"weight {name}: shape {tuple(value.shape)} != {tuple(self.own[name].shape)}")
        self.own[name].copy_(value)
        self.loaded.add(name)

    def missing(self) -> set[str]:
        return set(self.own) - self.loaded


def load_gated_mlp(
    weights: CheckpointWeights,
    src: str,
    dst: str,
    names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
    bias: bool = False,
) -> None:
    """One `MLP` at `dst` from the checkpoint's separate gate / up / down projections at `src`."""
    gate, up, down = (src + n for n in names)
    weights.put(dst + "gate_up_proj.weight", torch.cat([weights.get(gate + ".weight"), weights.get(up + ".weight")]))
    weights.put(dst + "down_proj.weight", weights.get(down + ".weight"))
    if bias:
        weights.put(dst + "gate_up_proj.bias", torch.cat([weights.get(gate + ".bias"), weights.get(up + ".bias")]))
        weights.put(dst + "down_proj.bias", weights.get(down + ".bias"))
