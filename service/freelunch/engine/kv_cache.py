"""The KV tensors: one flat slot array per layer for keys and one for values."""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        upper: tuple[int, int] | None = None,
    ) -> None:
        """`num_slots` per layer; with `upper` = (S, slots), layers from S on get `slots` instead
        (the upper pool of a split cache, see block_manager)."""

        def slots(layer: int) -> int:
            return upper[1] if upper is not None and layer >= upper[0] else num_slots

        self.split = upper[0] if upper is not None else num_layers
        self.layers = [
            tuple(torch.zeros((slots(i), num_kv_heads, head_dim), dtype=dtype, device=device) for _ in range(2))
            for i in range(num_layers)
        ]

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def copy_slots(
        self, src: torch.Tensor, dst: torch.Tensor, upper_src: torch.Tensor | None = None, upper_dst: torch.Tensor | None = None
    ) -> None:
        """Move entries src[i] -> dst[i] in every layer (upper_src / upper_dst in the layers of
        the upper pool): KV compaction after verification."""
        for i, (k, v) in enumerate(self.layers):
            s, d = (src, dst) if i < self.split else (upper_src, upper_dst)
            k[d] = k[s]
            v[d] = v[s]
