"""LLaVA (`LlavaForConditionalGeneration`): a vision tower, a projector and a Llama-family decoder.

The vision tower (CLIP or SigLIP) and the projector are transformers' own modules run on the
checkpoint's weights; features are selected exactly like transformers' `LlavaModel.get_image_features`
(`vision_feature_layer`, `vision_feature_select_strategy`). The language model is our packed-batch
`LlamaForCausalLM`; the engine feeds it the image features in place of the prompt's placeholder
tokens (`input_embeds`).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from collections import OrderedDict
from collections.abc import Iterator

import torch
from torch import nn

from freelunch.models.llama import DecoderConfig, LlamaForCausalLM
from freelunch.models.loader import ModelLoadError

VISION_TOWERS = ("clip_vision_model", "siglip_vision_model")
LANGUAGE_MODELS = ("llama", "mistral", "qwen2", "qwen3")  # what `LlamaForCausalLM` runs


class LlavaForConditionalGeneration(nn.Module):
    """Packed-batch decoder (forward / logits as `LlamaForCausalLM`) plus the `ImageEncoder` interface."""

    def __init__(self, cfg: DecoderConfig, hf_config) -> None:
        from transformers import AutoModel
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        super().__init__()
        vision_config = copy.deepcopy(hf_config.vision_config)
        if hasattr(vision_config, "vision_use_head"):
            vision_config.vision_use_head = False  # SigLIP's pooling head never feeds LLaVA: not built, not run
        if vision_config.model_type not in VISION_TOWERS:
            raise ModelLoadError(f"LLaVA with a {vision_config.model_type} vision tower is not supported (only {VISION_TOWERS})")
        text_type = hf_config.text_config.model_type
        if text_type not in LANGUAGE_MODELS:
            raise ModelLoadError(f"LLaVA with a {text_type} language model is not supported (only {LANGUAGE_MODELS})")
        self.config = cfg
        self.language_model = LlamaForCausalLM(cfg, hf_config)
        self.vision_tower = AutoModel.from_config(vision_config, attn_implementation="sdpa")
        self.multi_modal_projector = LlavaMultiModalProjector(hf_config)
        self.image_token_id: int = hf_config.image_token_id
        layers = hf_config.vision_feature_layer
        self.feature_layers: list[int] = [layers] if isinstance(layers, int) else list(layers)
        self.drop_cls = hf_config.vision_feature_select_strategy == "default"
        # transformers crops the first token under "default" whatever it is (SigLIP has no [CLS])
        positions = self.vision_tower.embeddings.num_positions
        self.tokens_per_image: int = positions - 1 if self.drop_cls else positions
        self.has_cls_token: bool = hasattr(self.vision_tower.embeddings, "class_embedding")
        self.num_vision_layers: int = vision_config.num_hidden_layers
        # hidden_states[i] is the output of layer i - 1 (hidden_states[0]: the embeddings), so the
        # layers before this one produce the features: a [CLS] attention band ends here
        self.cls_band_end: int = max(i % (self.num_vision_layers + 1) for i in self.feature_layers)
        self.pixel_shape = (vision_config.num_channels, vision_config.image_size, vision_config.image_size)
        # The n choices of a request (and retries of one prompt) carry the same images: the tower
        # runs once for them. Keyed by the pixel bytes; a few entries are enough for that.
        self._tower_cache: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()
        self.tower_cache_size = 4  # 0: no cache (benchmarks that time the tower)
        self.tower_runs = 0

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.language_model(*args, **kwargs)

    @property
    def steps_by_path(self) -> dict[str, int]:
        return self.language_model.steps_by_path

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.logits(hidden)

    # ---- vision ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _eager_vision_attention(self, needed: bool) -> Iterator[None]:
        """sdpa returns no attention weights: run the tower eagerly while they are needed."""
        if not needed:
            yield
            return
        self.vision_tower.set_attn_implementation("eager")
        try:
            yield
        finally:
            self.vision_tower.set_attn_implementation("sdpa")

    def encode_images(
        self, pixel_values: torch.Tensor, cls_attention_from: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """pixel_values [N, C, H, W] -> features [N, tokens_per_image, D] before the projector, and with
        `cls_attention_from` = s the [CLS]-to-token attention (mean over heads) summed over the tower's
        layers [s, cls_band_end) ([N, tokens_per_image])."""
        if tuple(pixel_values.shape[1:]) != self.pixel_shape:
            raise ValueError(f"pixel values of shape {tuple(pixel_values.shape[1:])}; this vision tower takes {self.pixel_shape}")
        want_attention = cls_attention_from is not None
        if want_attention and not self.has_cls_token:
            raise ValueError("this vision tower has no [CLS] token")
        if not self.tower_cache_size:
            return self._run_tower(pixel_values, cls_attention_from)
        flat = pixel_values.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy()
        key = (hashlib.sha256(flat).digest(), tuple(pixel_values.shape), pixel_values.dtype, cls_attention_from)
        if key in self._tower_cache:
            self._tower_cache.move_to_end(key)
            return self._tower_cache[key]
        result = self._run_tower(pixel_values, cls_attention_from)
        self._tower_cache[key] = result
        if len(self._tower_cache) > self.tower_cache_size:
            self._tower_cache.popitem(last=False)
        return result

    def _run_tower(self, pixel_values: torch.Tensor, cls_attention_from: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        want_attention = cls_attention_from is not None
        self.tower_runs += 1
        with self._eager_vision_attention(want_attention):
            out = self.vision_tower(pixel_values, output_hidden_states=True, output_attentions=want_attention)
        first = 1 if self.drop_cls else 0
        features = torch.cat([out.hidden_states[i][:, first:] for i in self.feature_layers], dim=-1)
        if not want_attention:
            return features, None
        cls_rows = [a.mean(dim=1)[:, 0, first:] for a in out.attentions[cls_attention_from : self.cls_band_end]]
        if not cls_rows:
            raise ValueError(f"no vision layers from {cls_attention_from} to the last feature layer ({self.cls_band_end - 1})")
        scores = torch.stack(cls_rows).sum(dim=0).float()
        if not self.drop_cls:
            scores[:, 0] = torch.inf  # the [CLS] feature itself always stays
        return features, scores

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.multi_modal_projector(features)

    # ---- weights ---------------------------------------------------------------------------
    def load_hf_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load a checkpoint in either layout: transformers >= 5 (`model.language_model.*`, `lm_head.*`)
        or the original llava-hf one (`language_model.model.*`, `language_model.lm_head.*`)."""
        text: dict[str, torch.Tensor] = {}
        vision: dict[str, torch.Tensor] = {}
        projector: dict[str, torch.Tensor] = {}
        for name, value in tensors.items():
            if name.startswith(("model.language_model.", "model.vision_tower.", "model.multi_modal_projector.")):
                name = name.removeprefix("model.")
            if name.startswith("language_model."):
                inner = name.removeprefix("language_model.")
                text[inner if inner.startswith(("model.", "lm_head.")) else "model." + inner] = value
            elif name.startswith("lm_head."):
                text[name] = value
            elif name.startswith("vision_tower."):
                vision[name.removeprefix("vision_tower.").removeprefix("vision_model.")] = value
            elif name.startswith("multi_modal_projector."):
                projector[name.removeprefix("multi_modal_projector.")] = value
            else:
                raise KeyError(f"unexpected weight {name}")
        self.language_model.load_hf_state_dict(text)
        self.multi_modal_projector.load_state_dict(projector)
        missing, unexpected = self.vision_tower.load_state_dict(vision, strict=False)
        unexpected = [k for k in unexpected if not k.startswith("head.")]  # SigLIP's unused pooling head
        if missing or unexpected:
            raise KeyError(f"vision tower weights: missing {missing[:5]}, unexpected {unexpected[:5]}")
