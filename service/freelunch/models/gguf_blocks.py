"""GGUF's quantised blocks, served as they are stored (`--quantization gguf`).

A GGUF file stores each weight matrix row by row in blocks; each block holds small integers and
the scales that turn them into weights. Every type served here is one of two forms that our
kernels (kernels/cpu/linear.c, linear_int8.c) compute with, so a layer reads the file's own numbers:

- int4, groups of 32 inputs, w = d q + m, q in [0, 15]: Q4_0 (m = -8 d), Q4_1, Q4_K (d and m are
  a super-block's fp16 scale times a 6-bit sub-block scale: exact in float32);
- int8, w = d q per group: Q8_0 (groups of 32), Q6_K (groups of 16, q in [-32, 31], d = fp16
  times an int8 sub-block scale), Q5_0 (groups of 32, q = the stored 5 bits - 16);
- 5-bit, groups of 32, w = d q + m, q in [0, 31]: Q5_1, Q5_K (as Q4_K). Only the integer-activation
  kernels (`--activations int8`) take them; with float activations such layers stay float.

Other types (Q2_K, Q3_K, IQ*) and float tensors stay float. Which model layer a tensor
feeds is found by content: transformers dequantises the file for the float model (and reorders
the rows of q/k projections, and we fuse q/k/v and gate/up), so each row of a model layer is
matched to the stored row whose dequantised values hash the same (`row_keys`, computed from
the gguf package's reference dequantisation when the file is converted), then checked value by
value (quantization.py).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# in a folder of its own: vLLM and transformers load every *.safetensors file at a model folder's top
BLOCKS_FILE = "gguf_blocks/blocks.safetensors"
INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")
INT5_TYPES = ("Q5_1", "Q5_K")
INT8_GROUPS = {"Q8_0": 32, "Q6_K": 16, "Q5_0": 32}
SERVED_TYPES = (*INT4_TYPES, *INT5_TYPES, *INT8_GROUPS)


@dataclass(frozen=True)
class QuantizedRows:
    """Rows of a weight matrix in one of the kernels' forms: int4 or int5 (unsigned, m set) or int8 (m None)."""

    q: torch.Tensor  # [N, K]: uint8 in [0, 15] (int4), [0, 31] (int5), or int8
    d: torch.Tensor  # [N, K / group] float32
    m: torch.Tensor | None  # [N, K / group] float32: the unsigned kinds' offset
    group: int
    bits: int = 0  # 4, 5 or 8 (0: 4 with m, 8 without)

    @property
    def kind(self) -> str:
        return f"int{self.bits or (4 if self.m is not None else 8)}"

    def dequantize(self) -> torch.Tensor:
        n, k = self.q.shape
        w = self.q.view(n, k // self.group, self.group).float() * self.d[..., None]
        if self.m is not None:
            w = w + self.m[..., None]
        return w.view(n, k)

    def regrouped(self, group: int) -> QuantizedRows:
        """The same weights with scales per `group` inputs (a divisor of self.group): scales repeat."""
        if group == self.group:
            return self
        r = self.group // group
        m = None if self.m is None else self.m.repeat_interleave(r, 1)
        return QuantizedRows(self.q, self.d.repeat_interleave(r, 1), m, group, self.bits)

    @staticmethod
    def concat(parts: list[QuantizedRows]) -> QuantizedRows:
        """Rows of one kind stacked (a fused q/k/v layer); int8 groups meet at their gcd."""
        group = math.gcd(*(p.group for p in parts))
        parts = [p.regrouped(group) for p in parts]
        m = None if parts[0].m is None else torch.cat([p.m for p in parts])
        return QuantizedRows(torch.cat([p.q for p in parts]), torch.cat([p.d for p in parts]), m, group, parts[0].bits)

    def select(self, rows: torch.Tensor) -> QuantizedRows:
        return QuantizedRows(self.q[rows], self.d[rows], None if self.m is None else self.m[rows], self.group, self.bits)


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)[..., 0]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes -> [..., 32]: the low nibbles are elements 0-15, the high ones 16-31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def decode(blocks: np.ndarray, qtype: str) -> QuantizedRows:
    """[N, bytes a row] uint8 as stored -> the rows' integers and scales (layouts: ggml-quants.c)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import Q4_K

    block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    n = blocks.shape[0]
    b = blocks.reshape(n, -1, type_size)  # [N, blocks a row, bytes a block]
    nb = b.shape[1]
    k = nb * block_size
    if qtype in ("Q4_0", "Q4_1"):
        d = _f16(b[..., 0:2])
        m = -8 * d if qtype == "Q4_0" else _f16(b[..., 2:4])
        q = _nibbles(b[..., 2 if qtype == "Q4_0" else 4 :])
    elif qtype == "Q4_K":  # 256 = 8 groups of 32; 4 chunks of 32 bytes, low nibbles then high
        d, dmin = _f16(b[..., 0:2])[..., None], _f16(b[..., 2:4])[..., None]
        sc, mn = Q4_K.get_scale_min(b[..., 4:16].reshape(-1, 12))
        d = (d * sc.reshape(n, nb, 8).astype(np.float32)).reshape(n, -1)
        m = -(dmin * mn.reshape(n, nb, 8).astype(np.float32)).reshape(n, -1)
        qs = b[..., 16:].reshape(n, nb, 4, 32)
        q = np.stack([qs & 0x0F, qs >> 4], axis=3)  # [N, nb, 4, 2, 32]
    elif qtype in ("Q5_0", "Q5_1"):  # the 5th bits of the 32 elements in a 32-bit word after the scales
        d = _f16(b[..., 0:2])
        at = 2 if qtype == "Q5_0" else 4
        high = (b[..., at : at + 4].copy().view("<u4")[..., 0, None] >> np.arange(32, dtype=np.uint32)) & 1
        q = _nibbles(b[..., at + 4 :]) | (high.astype(np.uint8) << 4)
        if qtype == "Q5_0":  # w = d (q - 16): int8
            q, m = (q.astype(np.int16) - 16).astype(np.int8), None
        else:
            m = _f16(b[..., 2:4])
    elif qtype == "Q5_K":  # as Q4_K, with a 5th bit per element: bit j of qh[l] for element l of chunk j // 2
        d, dmin = _f16(b[..., 0:2])[..., None], _f16(b[..., 2:4])[..., None]
        sc, mn = Q4_K.get_scale_min(b[..., 4:16].reshape(-1, 12))
        d = (d * sc.reshape(n, nb, 8).astype(np.float32)).reshape(n, -1)
        m = -(dmin * mn.reshape(n, nb, 8).astype(np.float32)).reshape(n, -1)
        qh = b[..., 16:48].reshape(n, nb, 1, 32)
        qs = b[..., 48:].reshape(n, nb, 4, 32)
        low = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(n, nb, 8, 32)  # groups 2j, 2j + 1
        high = (qh >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)) & 1
        q = low | (high << 4)
    elif qtype == "Q8_0":
        d, m = _f16(b[..., 0:2]), None
        q = b[..., 2:].view(np.int8)
    elif qtype == "Q6_K":  # 256 = 16 groups of 16; 2 halves of 128, each 4 runs of 32
        ql, qh = b[..., :128].reshape(n, nb, 2, 1, 64), b[..., 128:192].reshape(n, nb, 2, 1, 32)
        low = np.concatenate([ql[..., :32], ql[..., 32:]], axis=3)  # runs 0, 1 then 2, 3 below
        low = np.concatenate([low & 0x0F, low >> 4], axis=3)  # [N, nb, 2, 4, 32]
        high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 1, 4, 1)) & 0x03
        q = ((low | (high << 4)).astype(np.int16) - 32).astype(np.int8)
        d = (_f16(b[..., 208:210])[..., None] * b[..., 192:208].view(np.int8).astype(np.float32)).reshape(n, -1)
        m = None
    else:
        raise ValueError(f"GGUF type {qtype} is not served quantised (served: {', '.join(SERVED_TYPES)})")
    group = INT8_GROUPS.get(qtype, 32)
    q = torch.from_numpy(np.ascontiguousarray(q).reshape(n, k))
    return QuantizedRows(
        q.to(torch.uint8) if m is not None else q,
        torch.from_numpy(np.ascontiguousarray(d, dtype=np.float32)).reshape(n, k // group),
        None if m is None else torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32)).reshape(n, k // group),
        group,
        5 if qtype in INT5_TYPES else 4 if qtype in INT4_TYPES else 8,
    )


KEY_COLUMNS = 64  # a row's key reads this many of its columns, spread over it
KEY_VERSION = "64-columns-and-sum-1"  # stored with the keys: a file of other keys is read anew
_COEFFICIENTS = torch.randint(1, 2**24, (2, KEY_COLUMNS), generator=torch.Generator().manual_seed(0), dtype=torch.int64)


def row_keys(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] float32 -> [N] int64: a hash of the exact bits of each row: KEY_COLUMNS of its columns
    mixed, and the sum of all its columns' bits (hashing every column took ~6 s a start for the
    default model; rows that only the sum tells apart do occur, e.g. unused tokens' embeddings).
    A key match is then checked value by value."""
    k = weight.shape[1]
    bits = weight.detach().float().contiguous().view(torch.int32)
    columns = torch.linspace(0, k - 1, KEY_COLUMNS).round().long() if k > KEY_COLUMNS else torch.arange(k)
    sample = bits[:, columns].to(torch.int64)
    low, high = sample & 0xFFFF, (sample >> 16) & 0xFFFF  # 16-bit halves by 24-bit numbers: no sum overflows
    c = _COEFFICIENTS[:, : sample.shape[1]]
    return (low * c[0]).sum(1) ^ (high * c[1]).sum(1) ^ bits.sum(1, dtype=torch.int64)


@dataclass(frozen=True)
class StoredTensor:
    qtype: str
    blocks: np.ndarray  # [N, bytes a row] uint8, as in the file
    keys: torch.Tensor  # [N] row_keys of the reference dequantisation


def read_gguf(path: Path) -> dict[str, StoredTensor]:
    """The served-quantised tensors of a GGUF file, with their rows' keys."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    stored = {}
    for t in GGUFReader(str(path)).tensors:
        if t.tensor_type.name not in SERVED_TYPES or t.data.ndim != 2:
            continue
        reference = torch.from_numpy(np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32))
        stored[t.name] = StoredTensor(t.tensor_type.name, np.asarray(t.data), row_keys(reference))
    return stored


def save(stored: dict[str, StoredTensor], folder: Path) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for name, t in stored.items():
        tensors[f"{name}/blocks"] = torch.from_numpy(np.array(t.blocks))  # a copy: the reader maps the file read-only
        tensors[f"{name}/keys"] = t.keys
    (folder / BLOCKS_FILE).parent.mkdir(exist_ok=True)
    tmp = folder / f"{BLOCKS_FILE}.tmp{os.getpid()}"
    save_file(tensors, str(tmp), metadata={"keys": KEY_VERSION} | {name: t.qtype for name, t in stored.items()})
    os.replace(tmp, folder / BLOCKS_FILE)  # a worker loading at the same time never reads half a file


def present(folder: Path) -> bool:
    """Whether `folder` holds a blocks file with this version's keys (reads its header only)."""
    from safetensors import safe_open

    path = folder / BLOCKS_FILE
    if not path.exists():
        return False
    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("keys") == KEY_VERSION


def load(folder: Path) -> dict[str, StoredTensor] | None:
    """What `save` wrote into `folder`, or None when it holds no blocks file (or one with other keys)."""
    from safetensors import safe_open

    if not present(folder):  # none, or written with other row keys: read the GGUF again
        return None
    with safe_open(str(folder / BLOCKS_FILE), framework="pt") as f:
        types = dict(f.metadata() or {})
        del types["keys"]
        return {
            name: StoredTensor(qtype, f.get_tensor(f"{name}/blocks").numpy(), f.get_tensor(f"{name}/keys"))
            for name, qtype in types.items()
        }
