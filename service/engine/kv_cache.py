"""The KV tensors: one flat slot array per layer for keys and one for values."""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        shape = (num_slots, num_kv_heads, head_dim)
        self.layers = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(num_layers)
        ]

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def copy_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Move entries src[i] -> dst[i] in every layer (KV compaction after verification)."""
        for k, v in self.layers:
            k[dst] = k[src]
            v[dst] = v[src]
