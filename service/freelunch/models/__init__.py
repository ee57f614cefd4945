"""Model classes and loaders. Architectures register by their transformers class name."""

from __future__ import annotations

from freelunch.models.llama import LlamaForCausalLM
from freelunch.models.llava import LlavaForConditionalGeneration
from freelunch.models.moe import MoeForCausalLM

# transformers `architectures[0]` -> our implementation. Llama-family variants share one class.
ARCHITECTURES: dict[str, type] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "MixtralForCausalLM": MoeForCausalLM,
    "Qwen2MoeForCausalLM": MoeForCausalLM,
    "Qwen3MoeForCausalLM": MoeForCausalLM,
    "OlmoeForCausalLM": MoeForCausalLM,
    "LlavaForConditionalGeneration": LlavaForConditionalGeneration,
}
