"""The KV tensors: one flat slot array per layer for keys and one for values.

On a CPU the cache is stored in 16 bits by default (`--kv-cache-dtype`: float16, or the model's
own 16-bit dtype): half the memory of float32 and half the bytes attention reads a step. Keys and
values are rounded to it as they are written and widened back as they are read (the C kernels
widen in registers), so that every path computes in float32 on the same stored values.

The cache is resident only as far as it is used: on a CPU its memory is one anonymous mapping
(zero pages the kernel backs only once written), and the block manager hands out the lowest
free blocks first, so the touched part follows the peak use, up to `kv_cache_gib`. Slots never
written read as zeros (never NaN garbage that a masked-out position could carry into SDPA's
value sum as 0 * NaN).
"""

from __future__ import annotations

import mmap

import torch

KV_CACHE_DTYPES = ("auto", "float16", "bfloat16", "float32")


def kv_cache_dtype(setting: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the cache stores for `--kv-cache-dtype` = `setting`. auto: 16 bits on a CPU (the
    model's dtype when it is a 16-bit one, else float16), the model's dtype elsewhere. Off the CPU
    the cache is always in the model's dtype (SDPA and the Triton kernels take q, k and v alike):
    ValueError for anything else there."""
    if setting not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, not {setting!r}")
    if device.type != "cpu":
        if setting not in ("auto", str(model_dtype).removeprefix("torch.")):
            raise ValueError(
                f"--kv-cache-dtype {setting}: on {device.type} the KV cache is kept in the model's dtype "
                f"({str(model_dtype).removeprefix('torch.')}); leave it auto"
            )
        return model_dtype
    if setting == "auto":
        return model_dtype if model_dtype in (torch.float16, torch.bfloat16) else torch.float16
    return getattr(torch, setting)


def lazy_zeros(shapes: list[tuple[int, ...]], dtype: torch.dtype) -> list[torch.Tensor]:
    """Zero CPU tensors of `shapes` in one anonymous mapping: no page is resident before it is
    written (torch.zeros writes every page; torch.empty may reuse freed, resident heap memory that
    holds anything)."""
    size = torch.empty((), dtype=dtype).element_size()
    counts = [int(torch.Size(s).numel()) for s in shapes]
    buffer = mmap.mmap(-1, max(1, sum(counts)) * size)
    flat = torch.frombuffer(buffer, dtype=dtype, count=sum(counts)) if sum(counts) else torch.empty(0, dtype=dtype)
    out, start = [], 0
    for shape, count in zip(shapes, counts):
        out.append(flat[start : start + count].view(shape))
        start += count
    return out


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
        self.dtype = dtype
        shapes = [(slots(i), num_kv_heads, head_dim) for i in range(num_layers) for _ in range(2)]
        if torch.device(device).type == "cpu":
            tensors = lazy_zeros(shapes, dtype)
        else:  # device memory is committed when allocated; zeros: no garbage in unwritten slots
            tensors = [torch.zeros(s, dtype=dtype, device=device) for s in shapes]
        self.layers = [(tensors[2 * i], tensors[2 * i + 1]) for i in range(num_layers)]

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
