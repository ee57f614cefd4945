"""What the engine needs to know about a sparse Mixture-of-Experts decoder, read from a transformers config.

Supported: Mixtral, Qwen2-MoE (sigmoid-gated shared expert, dense layers via `mlp_only_layers` /
`decoder_sparse_step`), Qwen3-MoE and OLMoE. Their attention is the Llama family's (llama.py).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class MoeConfig:
    num_experts: int
    top_k: int  # experts per token
    expert_intermediate_size: int
    normalize_top_k: bool  # renormalise the top-k router probabilities to sum 1
    shared_expert_intermediate_size: int  # 0: no shared expert
    sparse_layers: tuple[bool, ...]  # per layer: a MoE block, or a dense MLP of `intermediate_size`
    # Checkpoint names: the block's prefix in a layer, and each expert's gate / up / down projections.
    checkpoint_prefix: str = "mlp"
    checkpoint_expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")

    @classmethod
    def from_hf(cls, c) -> MoeConfig | None:
        """The MoE part of a (text) config; None for a dense model. ValueError for what is not supported."""
        model_type = getattr(c, "model_type", "")
        layers = range(c.num_hidden_layers)
        if model_type == "mixtral":
            config = cls(
                num_experts=c.num_local_experts,
                top_k=c.num_experts_per_tok,
                expert_intermediate_size=c.intermediate_size,
                normalize_top_k=True,  # Mixtral always renormalises its top-2
                shared_expert_intermediate_size=0,
                sparse_layers=tuple(True for _ in layers),
                checkpoint_prefix="block_sparse_moe",
                checkpoint_expert_names=("w1", "w3", "w2"),
            )
        elif model_type in ("qwen2_moe", "qwen3_moe"):
            dense = set(getattr(c, "mlp_only_layers", None) or ())
            step = getattr(c, "decoder_sparse_step", 1) or 1
            config = cls(
                num_experts=c.num_experts,
                top_k=c.num_experts_per_tok,
                expert_intermediate_size=c.moe_intermediate_size,
                normalize_top_k=bool(c.norm_topk_prob),
                shared_expert_intermediate_size=getattr(c, "shared_expert_intermediate_size", 0) or 0,
                # transformers' rule (Qwen2MoeDecoderLayer): MoE unless listed dense or off the step
                sparse_layers=tuple(
                    i not in dense and c.num_experts > 0 and (i + 1) % step == 0 for i in layers
                ),
            )
        elif model_type == "olmoe":
            config = cls(
                num_experts=c.num_experts,
                top_k=c.num_experts_per_tok,
                expert_intermediate_size=c.intermediate_size,
                normalize_top_k=bool(c.norm_topk_prob),
                shared_expert_intermediate_size=0,
                sparse_layers=tuple(True for _ in layers),
            )
        else:
            return None
        if not 1 <= config.top_k <= config.num_experts:
            raise ValueError(f"{model_type}: {config.top_k} experts per token out of {config.num_experts}")
        if getattr(c, "hidden_act", "silu") != "silu":
            raise ValueError(f"{model_type}: only SiLU experts are supported, not {c.hidden_act}")
        return config
