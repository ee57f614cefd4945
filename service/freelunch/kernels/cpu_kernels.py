"""The C CPU kernels (the top-level kernels/cpu/, linked here as csrc/), built once with the system's
C compiler, and their Python wrappers.

- `matrix_apply`: every linear layer's matmul, whatever form its weights take (KINDS): float
  activations (`pack`, `pack_q8`, `pack_q4`) or int8 activations (`pack_int8_activations`:
  kernels/cpu/linear_int8.c, one object per instruction set, the variant CPUID allows chosen at
  load: `int8_variants`, `int8_variant`).
- `linear`: decoding and draft-tree verification multiply a handful of rows by every weight
  matrix, so a step costs about one pass over the weights in memory (weights that are bfloat16
  values, as a bfloat16 checkpoint's, are kept and read as bfloat16: half the pass). oneDNN's kernels, tuned
  for larger matrices, pay that pass and then the arithmetic on top; this one overlaps them,
  so 5 or 9 rows cost little more than 1 (numbers in freelunch.models.cpu_linear).
- `paged_attention`: attention of a few queries per row over keys read straight from the
  paged cache by slot id, with an optional mask (decoding, tree verification): the PyTorch
  reference gathers the keys into a copy, then SDPA spends most of its time on set-up at
  these sizes.
- `rms_norm` (with the residual add before it), `rope`, `silu_mul`: the elementwise steps
  between a layer's matmuls, one call each instead of several PyTorch ops.
- `decoder`: all the layers of a dense Llama-family decoder in one call, built from the kernels
  above (models/cpu_decoder.py).

The shared library is compiled from the shipped sources at first use (a few seconds with gcc)
into `<FREELUNCH_CACHE_DIR>/kernels/`, named by a hash of the sources and the flags; a read-only
cache compiles into a temporary folder instead, and an image may ship it prebuilt (the
Dockerfile does). Without it and without a C compiler, or on a CPU without AVX2 and FMA,
`load()` returns None and callers fall back to oneDNN.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from freelunch.config import kernel_switch

log = logging.getLogger(__name__)

SOURCES = Path(__file__).with_name("csrc")  # the top-level kernels/cpu/ (a link in the source tree)
PANEL = 8  # output columns per packed panel (common.h's PANEL)
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-fPIC")
# The integer-activation matmul (linear_int8.c), one object per instruction set, in the order of
# linear.c's INT8_VARIANTS; each is called only where CPUID says it runs (fl_int8_variants).
INT8_VARIANTS = {
    "avx2": ("-DVARIANT_AVX2",),
    "avxvnni": ("-DVARIANT_AVXVNNI", "-mavxvnni"),
    "avx512": ("-DVARIANT_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl"),
    "avx512vnni": ("-DVARIANT_AVX512VNNI", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"),
}
# The order a variant is preferred in where several run: measured on a 2-core Xeon with all four
# (bench/bench_int8_kernels.py, bench/results/int8_kernels.json).
INT8_PREFERENCE = ("avx512vnni", "avxvnni", "avx512", "avx2")
_library: ctypes.CDLL | None = None
_tried = False


def cpu_supported() -> bool:
    """AVX2 and FMA (every CPU that PyTorch runs at the AVX2 or AVX512 level has both)."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _compiler() -> str | None:
    return kernel_switch("CC") or shutil.which("gcc") or shutil.which("cc")


def _objects() -> list[tuple[Path, tuple[str, ...], str]]:
    """(source, extra flags, object name) for every object of the library."""
    objects = [(c, (), c.stem) for c in sorted(SOURCES.glob("*.c")) if c.name != "linear_int8.c"]
    int8 = SOURCES / "linear_int8.c"
    # -ffp-contract=off: the compiler fuses no multiply-add of its own, so every variant rounds alike
    objects += [(int8, (*flags, "-ffp-contract=off"), f"linear_int8_{name}") for name, flags in INT8_VARIANTS.items()]
    return objects


def library_name() -> str:
    """The compiled file's name: a hash of the sources and the flags (a new source builds anew)."""
    parts = [p.read_text() for p in sorted(SOURCES.glob("*.[ch]"))] + list(FLAGS)
    parts += [" ".join(flags) for _, flags, _ in _objects()]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    return f"cpu_kernels-{key}.so"


def build(folder: Path, cc: str) -> Path:
    """Compile into `folder` (kept if already there); CalledProcessError / OSError on failure."""
    target = folder / library_name()
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    # Compile beside the target and rename: workers starting together never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    work = Path(tempfile.mkdtemp(prefix="objects-", dir=folder))
    try:
        objects = []
        for source, flags, name in _objects():
            obj = work / f"{name}.o"
            subprocess.run([cc, *FLAGS, *flags, "-c", str(source), "-o", str(obj)], check=True, capture_output=True, text=True, timeout=120)
            objects.append(str(obj))
        subprocess.run([cc, "-shared", "-fopenmp", *objects, "-o", tmp], check=True, capture_output=True, text=True, timeout=120)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def trusted(path: Path) -> bool:
    """Loading a shared library runs its code: only one that root or this user owns, in a folder
    that root or this user owns, neither writable by others (a planted file is refused)."""
    for p in (path, path.parent):
        st = p.stat()
        if st.st_uid not in (0, os.getuid()) or st.st_mode & 0o022:
            return False
    return True


def _locate() -> Path | None:
    """The cached library (an image may ship it prebuilt, with no compiler), else a fresh build."""
    from freelunch.config import cache_dir

    folder = cache_dir() / "kernels"
    cached = folder / library_name()
    if cached.exists() and trusted(cached):
        return cached
    cc = _compiler()
    if cc is None:
        log.warning("CPU kernels not built: no C compiler found (set CC, or install gcc); no usable prebuilt %s", cached)
        return None
    try:
        if cached.exists():  # present but not trusted: never overwrite it, build apart
            raise PermissionError(f"{cached} is not owned by this user or is writable by others")
        return build(folder, cc)
    except OSError:  # a read-only (or untrusted) cache: build where only we may write
        return build(Path(tempfile.mkdtemp(prefix="freelunch-kernels-")), cc)


def load() -> ctypes.CDLL | None:
    """The compiled kernel, or None where it cannot run here (the reason is logged once)."""
    global _library, _tried
    if _tried:
        return _library
    _tried = True
    if not cpu_supported():
        log.info("CPU kernels not used: the CPU lacks AVX2/FMA")
        return None
    try:
        path = _locate()
        if path is None:
            return None
        library = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or e
        log.warning("CPU kernels not built (%s); using oneDNN and SDPA", str(detail).strip()[:500])
        return None
    library.fl_linear.argtypes = [
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
        ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
    ]  # fmt: skip
    library.fl_linear.restype = None
    library.fl_linear_bf16.argtypes = library.fl_linear.argtypes
    library.fl_linear_bf16.restype = None
    library.fl_paged_attention.argtypes = [
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
        ctypes.c_float, ctypes.c_void_p, ctypes.c_int,
    ]  # fmt: skip
    library.fl_paged_attention.restype = None
    library.fl_kv_store.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64]
    library.fl_kv_store.restype = None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    library.fl_rms_norm.argtypes = [p, p, p, ctypes.c_float, i64, i64, p, p]
    library.fl_rope.argtypes = [p, i64, i64, i64, i64, p, p]
    library.fl_qk_prepare.argtypes = [p, i64, i64, i64, i64, p, p, p]
    library.fl_qk_prepare.restype = None
    library.fl_silu_mul.argtypes = [p, i64, i64, p]
    library.fl_topk.argtypes = [p, i64, i64, i64, p, p]
    library.fl_topk.restype = None
    library.fl_rms_norm.restype = library.fl_rope.restype = library.fl_silu_mul.restype = None
    f32 = ctypes.c_float
    library.fl_decoder.argtypes = [p, i64, p, i64, i64, i64, i64, i64, i64, f32, p, p, p, p, i64, p, p, f32, p, ctypes.c_int]
    library.fl_moe_forward.argtypes = [p, p, i64, i64, p, p, p, ctypes.c_int]
    library.fl_moe_forward.restype = None
    library.fl_decoder.restype = None
    library.fl_matrix_apply.argtypes = [p, p, i64, i64, p, ctypes.c_int]
    library.fl_matrix_apply.restype = None
    library.fl_use_int8_variant.argtypes = [ctypes.c_int]
    library.fl_int8_variants.restype = library.fl_use_int8_variant.restype = ctypes.c_int
    _use_variant(library, _chosen_variant(library))
    _library = library
    return library


def int8_variants(library: ctypes.CDLL) -> list[str]:
    """The integer-activation variants this CPU runs (CPUID, as the C code reads it)."""
    mask = library.fl_int8_variants()
    return [name for i, name in enumerate(INT8_VARIANTS) if mask >> i & 1]


def _chosen_variant(library: ctypes.CDLL) -> str:
    """FREELUNCH_INT8_KERNEL names one (refused where the CPU cannot run it), else the first of
    INT8_PREFERENCE that runs here."""
    runs = int8_variants(library)
    wanted = kernel_switch("FREELUNCH_INT8_KERNEL") or None
    if wanted:
        if wanted not in runs:
            raise RuntimeError(f"FREELUNCH_INT8_KERNEL={wanted}: this CPU runs {', '.join(runs) or 'none of them'}")
        return wanted
    return next(name for name in INT8_PREFERENCE if name in runs)


_variant = "avx2"


def _use_variant(library: ctypes.CDLL, name: str) -> None:
    global _variant
    if not library.fl_use_int8_variant(list(INT8_VARIANTS).index(name)):
        raise RuntimeError(f"this CPU cannot run the {name} kernels")
    _variant = name


def use_int8_variant(name: str) -> None:
    """Run the integer-activation matmuls with variant `name` from now on (tests, benchmarks)."""
    library = load()
    if library is None:
        raise RuntimeError("the CPU kernels are not available")
    _use_variant(library, name)


def int8_variant() -> str:
    """The integer-activation variant that runs (after load())."""
    return _variant


def pack(weight: torch.Tensor, storage: torch.dtype = torch.float32) -> torch.Tensor:
    """W [N, K] -> panels [ceil(N / 8), K, 8] of `storage` (float32, or bfloat16 for weights that are
    bfloat16 values: `linear` widens them exactly), zero past N."""
    n, k = weight.shape
    padded = torch.zeros((n + PANEL - 1) // PANEL * PANEL, k, dtype=storage)
    padded[:n] = weight
    return padded.view(-1, PANEL, k).transpose(1, 2).contiguous()


def linear(
    library: ctypes.CDLL, x: torch.Tensor, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None
) -> torch.Tensor:
    """x [M, K] float32 contiguous -> x W^T + bias [M, out_features], W from `pack` (either storage)."""
    m, k = x.shape
    y = torch.empty(m, out_features, dtype=torch.float32)
    if m:
        (library.fl_linear_bf16 if packed.dtype == torch.bfloat16 else library.fl_linear)(
            x.data_ptr(), m, k, packed.data_ptr(), out_features,
            None if bias is None else bias.data_ptr(), y.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
    return y


def _panels(t: torch.Tensor) -> torch.Tensor:
    """[N, ...] -> [ceil(N / 8), 8, ...], zero past N."""
    n = t.shape[0]
    padded = torch.zeros((n + PANEL - 1) // PANEL * PANEL, *t.shape[1:], dtype=t.dtype)
    padded[:n] = t
    return padded.view(-1, PANEL, *t.shape[1:])


def per_panel(t: torch.Tensor) -> torch.Tensor:
    """[N, X] -> [ceil(N / 8), X, 8]: each panel's 8 columns side by side, zero past N (dtype kept)."""
    return _panels(t).transpose(1, 2).contiguous()


def from_panels(t: torch.Tensor, out_features: int) -> torch.Tensor:
    """per_panel's [ceil(N / 8), X, 8] back to [out_features, X] (references and tests)."""
    return t.transpose(1, 2).reshape(-1, t.shape[1])[:out_features]


def pack_q8(q: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 q [N, K], scales [N] (one per output channel) or [N, K / G] (groups of G inputs) ->
    (panels [ceil(N / 8), K, 8] int8, scales per panel [ceil(N / 8), groups, 8] float32)."""
    return per_panel(q), per_panel(scales.float().reshape(q.shape[0], -1))


def pack_q4(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [N, K] in [0, 15], d and m [N, K / 32] -> (panels [ceil(N / 8), K, 4] uint8, two columns a
    byte, the even one low; d and m per panel [ceil(N / 8), K / 32, 2, 8] float32)."""
    cols = _panels(q.to(torch.uint8)).transpose(1, 2)  # [P, K, 8]
    packed = (cols[..., 0::2] | (cols[..., 1::2] << 4)).contiguous()
    dm = torch.stack([_panels(d.float()), _panels(m.float())], dim=-1)  # [P, 8, G, 2]
    return packed, dm.permute(0, 2, 3, 1).contiguous()


def unpack_q4(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """pack_q4's panels back to q [out_features, K] uint8 (references and tests)."""
    cols = torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)  # [P, K, 8]
    return cols.transpose(1, 2).reshape(-1, packed.shape[1])[:out_features]


def _octets(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] -> [ceil(N / 8), K / 8, 64]: per panel and 8 inputs, column c's 8 values at 8 c (zero past N)."""
    p = _panels(q)  # [P, 8, K]
    return p.view(p.shape[0], PANEL, -1, 8).permute(0, 2, 1, 3).reshape(p.shape[0], -1, 64).contiguous()


def _storable_in_half(*scales: torch.Tensor | None) -> bool:
    """Whether every scale is a float16 value (GGUF's Q4_0, Q4_1, Q8_0 store them so): kept in half
    the bytes and widened exactly, the same products."""
    present = [s.float() for s in scales if s is not None]
    return all(torch.equal(s.half().float(), s) for s in present)


def pack_int8_activations(
    q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None, out_features: int, bias: torch.Tensor | None, bits: int = 8
) -> KernelMatrix:
    """Weights w = d q (+ m) as linear_int8.c reads them: q [N, K] int8 (bits 8: any int8, no m), or
    unsigned in [0, 15] (bits 4) or [0, 31] (bits 5) with m; d [N, K / G] for G = 16 or 32 (one scale a
    row: repeated per 32 inputs); m [N, K / 32]."""
    n, k = q.shape
    if d.dim() == 1 or d.shape[1] == 1:
        d = d.reshape(n, 1).expand(n, k // 32)
    # scales: a third of an int4 matrix's bytes in float32 (8 bytes a 32-input group), a fifth in float16
    scale_type = torch.float16 if _storable_in_half(d, m) else torch.float32
    d = d.to(scale_type)
    m = None if m is None else m.to(scale_type)
    group = k // d.shape[1]
    if group not in (16, 32) or k % 32:
        raise ValueError(f"int8 activations take groups of 16 or 32 inputs and K a multiple of 32, not {group} / {k}")
    if bits == 8:
        if m is not None:
            raise ValueError("int8 weights take no offset")
        wsum = 128 * q.view(n, k // group, group).sum(-1, dtype=torch.int32)
        return KernelMatrix("w8a8", _octets(q.to(torch.int8)), per_panel(d), out_features, bias, group, None, per_panel(wsum))
    if m is None or group != 32:
        raise ValueError("int4 and 5-bit weights take an offset m and groups of 32")
    octets = _octets(q.to(torch.uint8))
    if bits == 4:  # two columns' halves a byte: columns 0-3 low nibbles, 4-7 high
        octets = octets[..., :32] | (octets[..., 32:] << 4)
    return KernelMatrix(f"w{bits}a8", octets.contiguous(), per_panel(d), out_features, bias, group, per_panel(m))


def unpack_int8_activations(m: KernelMatrix, in_features: int) -> torch.Tensor:
    """pack_int8_activations' q back as [out_features, K] (references and tests)."""
    octets = m.packed
    if m.kind == "w4a8":
        octets = torch.cat([octets & 15, octets >> 4], dim=-1)
    p = octets.view(octets.shape[0], -1, PANEL, 8).permute(0, 2, 1, 3).reshape(-1, in_features)
    return p[: m.out_features]


def dequantize_kernel_matrix(m: KernelMatrix, in_features: int) -> torch.Tensor:
    """The float32 weights [out_features, K] an int8-activation matrix holds."""
    q = unpack_int8_activations(m, in_features).float()
    scales = from_panels(m.scales, m.out_features).float()
    w = (q.view(m.out_features, scales.shape[1], -1) * scales[..., None]).view(m.out_features, in_features)
    if m.mins is not None:
        w = w + from_panels(m.mins, m.out_features).float().repeat_interleave(32, 1)
    return w


# The element types a KV cache may hold, as common.h numbers them (FL_KV_*): float32, or 16 bits
# widened to float32 as the kernels read them.
KV_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def paged_attention(
    library: ctypes.CDLL,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_index: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """q [B, n, H, D] float32; k_cache, v_cache [slots, Hkv, D] contiguous, of one of KV_DTYPES; kv_index
    [B, L] slot ids; mask [B, n, L] bool (True = may attend) or None -> [B, n, H, D]. Every query must
    see a key."""
    b, n, h, d = q.shape
    if k_cache.dtype != v_cache.dtype or k_cache.dtype not in KV_DTYPES:
        raise ValueError(f"k/v caches of {k_cache.dtype}/{v_cache.dtype}: one of {', '.join(map(str, KV_DTYPES))}")
    q = q.contiguous()
    kv_index = kv_index.contiguous()
    if mask is not None:
        mask = mask.contiguous()
    out = torch.empty_like(q)
    library.fl_paged_attention(
        q.data_ptr(), b, n, h, d, k_cache.data_ptr(), v_cache.data_ptr(), KV_DTYPES[k_cache.dtype], k_cache.shape[1],
        kv_index.data_ptr(), kv_index.shape[1], None if mask is None else mask.data_ptr(), scale,
        out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return out


def kv_store(library: ctypes.CDLL, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x float32 -> the values as the one-call decoder writes them into a `dtype` cache (fl_kv_store):
    x.to(dtype) to the bit (tests)."""
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=dtype)
    library.fl_kv_store(out.data_ptr(), KV_DTYPES[dtype], x.data_ptr(), x.numel())
    return out


def rms_norm(
    library: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor, eps: float, delta: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] float32 (+ delta) -> (x + delta, RMSNorm(x + delta) * weight); without delta the
    first is x itself."""
    x = x.contiguous()
    delta = None if delta is None else delta.contiguous()  # held here: the C call reads its memory
    k = x.shape[-1]
    out = torch.empty_like(x)
    total = x if delta is None else torch.empty_like(x)
    library.fl_rms_norm(
        x.data_ptr(), None if delta is None else delta.data_ptr(), weight.data_ptr(), eps,
        x.numel() // k, k, total.data_ptr(), out.data_ptr(),
    )  # fmt: skip
    return total, out


class FlQk(ctypes.Structure):
    """What a layer does to q and k before attention (fl_qk_prepare): norms, clipping; RoPE always."""

    _fields_ = [("q_norm", ctypes.c_void_p), ("k_norm", ctypes.c_void_p), ("norm", ctypes.c_int64),
                ("eps", ctypes.c_float), ("clip", ctypes.c_float), ("clipped", ctypes.c_int64)]  # fmt: skip

    @classmethod
    def of(
        cls, norm: str | None, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, eps: float, clip: float | None
    ) -> "FlQk":
        """norm: None, "head" (weights [D]) or "projection" (weights [H D] and [Hkv D]), float32 weights."""
        return cls(
            None if q_norm is None else q_norm.data_ptr(), None if k_norm is None else k_norm.data_ptr(),
            (None, "head", "projection").index(norm), eps, clip or 0.0, clip is not None,
        )  # fmt: skip


def qk_prepare_(
    library: ctypes.CDLL, qkv: torch.Tensor, qk: FlQk, heads: int, kv_heads: int, head_dim: int, cos: torch.Tensor,
    sin: torch.Tensor,
) -> None:
    """In place on the q/k/v projection rows qkv [T, (heads + 2 kv_heads) head_dim] (contiguous float32):
    `qk`'s norms and clipping, then RoPE on the q and k heads; cos, sin [T, head_dim] float32."""
    cos, sin = cos.contiguous(), sin.contiguous()  # held here: the C call reads their memory
    library.fl_qk_prepare(qkv.data_ptr(), qkv.shape[0], heads, kv_heads, head_dim, ctypes.byref(qk), cos.data_ptr(), sin.data_ptr())


def topk(library: ctypes.CDLL, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of each row of x [M, N] (float32, no NaN, k <= N), largest first, of
    equal values the lower index first: (values [M, k], indices [M, k] int64), as torch.topk gives
    them up to the order of ties."""
    x = x.contiguous()
    m, n = x.shape
    values, indices = x.new_empty(m, k), torch.empty(m, k, dtype=torch.long)
    library.fl_topk(x.data_ptr(), m, n, k, values.data_ptr(), indices.data_ptr())
    return values, indices


def silu_mul(library: ctypes.CDLL, gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2 I] float32 rows [gate | up] -> silu(gate) * up [..., I]."""
    gate_up = gate_up.contiguous()
    i = gate_up.shape[-1] // 2
    out = gate_up.new_empty(*gate_up.shape[:-1], i)
    library.fl_silu_mul(gate_up.data_ptr(), gate_up.numel() // (2 * i), i, out.data_ptr())
    return out


# common.h's fl_matrix kinds: float activations ("f32", "bf16": pack; "q8": pack_q8; "q4": pack_q4),
# then int8 activations over int8, int4 and 5-bit weights (pack_int8_activations)
KINDS = ("f32", "q8", "q4", "bf16", "w8a8", "w4a8", "w5a8")


@dataclass(frozen=True, slots=True)
class KernelMatrix:
    """A linear layer's weights as one of the matmul kernels takes them (what `decoder` needs of it)."""

    kind: str  # one of KINDS
    packed: torch.Tensor
    scales: torch.Tensor | None
    out_features: int
    bias: torch.Tensor | None
    group: int = 0  # inputs a scale covers (q8 and the int8-activation kinds)
    mins: torch.Tensor | None = None  # w4a8, w5a8: the offsets m per panel [K / 32, 8]
    wsum: torch.Tensor | None = None  # w8a8: 128 x each group's weight sum per panel (VNNI's offset)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class FlMatrix(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int64), ("packed", ctypes.c_void_p), ("scales", ctypes.c_void_p),
                ("group", ctypes.c_int64), ("out", ctypes.c_int64), ("bias", ctypes.c_void_p),
                ("mins", ctypes.c_void_p), ("wsum", ctypes.c_void_p), ("half", ctypes.c_int64)]  # fmt: skip

    @classmethod
    def of(cls, m: KernelMatrix) -> "FlMatrix":
        return cls(
            KINDS.index(m.kind), m.packed.data_ptr(), _ptr(m.scales), m.group, m.out_features, _ptr(m.bias), _ptr(m.mins),
            _ptr(m.wsum), m.scales is not None and m.scales.dtype == torch.float16,
        )  # fmt: skip


def matrix_apply(library: ctypes.CDLL, m: KernelMatrix, x: torch.Tensor) -> torch.Tensor:
    """x [M, in_features] float32 -> x W^T + bias [M, out_features], W as `m` holds it (any kind)."""
    x = x.contiguous()
    y = torch.empty(x.shape[0], m.out_features, dtype=torch.float32)
    if x.shape[0]:
        desc = FlMatrix.of(m)
        library.fl_matrix_apply(ctypes.byref(desc), x.data_ptr(), x.shape[0], x.shape[1], y.data_ptr(), torch.get_num_threads())
    return y


class FlMoe(ctypes.Structure):
    _fields_ = [("gate", FlMatrix), ("E", ctypes.c_int64), ("top_k", ctypes.c_int64), ("normalize", ctypes.c_int64),
                ("gate_up", ctypes.c_void_p), ("down", ctypes.c_void_p), ("I", ctypes.c_int64),
                ("shared_gate_up", FlMatrix), ("shared_down", FlMatrix), ("shared_gate", FlMatrix),
                ("shared_I", ctypes.c_int64)]  # fmt: skip


class MoeKernel:
    """A sparse MoE block's weights as fl_moe_forward reads them (the matrices held here)."""

    def __init__(
        self, gate: KernelMatrix, experts: list[tuple[KernelMatrix, KernelMatrix]], top_k: int, normalize: bool,
        shared: tuple[KernelMatrix, KernelMatrix, KernelMatrix] | None,
    ) -> None:
        self.matrices = (gate, experts, shared)
        self.gate_up = (FlMatrix * len(experts))(*(FlMatrix.of(g) for g, _ in experts))
        self.down = (FlMatrix * len(experts))(*(FlMatrix.of(d) for _, d in experts))
        desc = FlMoe(gate=FlMatrix.of(gate), E=len(experts), top_k=top_k, normalize=normalize, I=experts[0][1].packed.shape[1])
        desc.gate_up, desc.down = ctypes.addressof(self.gate_up), ctypes.addressof(self.down)
        if shared is not None:  # (gate_up, down, gate)
            desc.shared_gate_up, desc.shared_down, desc.shared_gate = (FlMatrix.of(m) for m in shared)
            desc.shared_I = shared[1].packed.shape[1]
        self.desc = desc

    def forward(self, library: ctypes.CDLL, x: torch.Tensor, routing: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """x [T, hidden] float32 -> the block's output [T, hidden]; routing: per-token (rank, top_k)."""
        x = x.contiguous()
        out = torch.empty_like(x)
        rank, top_k = (None, None) if routing is None else (routing[0].contiguous(), routing[1].contiguous())
        library.fl_moe_forward(
            ctypes.byref(self.desc), x.data_ptr(), x.shape[0], x.shape[1], None if rank is None else rank.data_ptr(),
            None if top_k is None else top_k.data_ptr(), out.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        return out


class FlLayer(ctypes.Structure):
    _fields_ = [("input_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p), ("qkv", FlMatrix), ("o", FlMatrix),
                ("gate_up", FlMatrix), ("down", FlMatrix), ("qk", FlQk), ("k_cache", ctypes.c_void_p),
                ("v_cache", ctypes.c_void_p), ("moe", ctypes.c_void_p), ("kv_dtype", ctypes.c_int64)]  # fmt: skip


class FlGroup(ctypes.Structure):
    _fields_ = [("q_index", ctypes.c_void_p), ("B", ctypes.c_int64), ("n", ctypes.c_int64), ("kv_index", ctypes.c_void_p),
                ("Lk", ctypes.c_int64), ("mask", ctypes.c_void_p)]  # fmt: skip


# One attention group of a step: (packed rows [B n] or None = the whole step in order, B, n,
# kv_index [B, Lk] slot ids, mask [B, n, Lk] bool or None = all visible)
Group = tuple[torch.Tensor | None, int, int, torch.Tensor, torch.Tensor | None]


def decoder(
    library: ctypes.CDLL, layers: ctypes.Array, x: torch.Tensor, shape: tuple[int, int, int, int], eps: float,
    cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor, groups: list[Group], scale: float,
    routing: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Run every layer of `layers` (FlLayer, k/v cache pointers filled in) over x [T, K] in place:
    shape = (heads, kv heads, head dim, intermediate size); cos, sin [T, D]; slots [T] where each
    token's k/v go; the queries attend in `groups` as fl_paged_attention; routing: MoE layers'
    per-token (rank, top_k) [T] int64, or None."""
    t, k = x.shape
    h, hkv, d, i = shape
    scratch = torch.empty(t * (2 * k + (h + 2 * hkv) * d + 4 * h * d + 3 * i), dtype=torch.float32)
    cos, sin, slots = cos.contiguous(), sin.contiguous(), slots.contiguous()
    rank, top_k = (None, None) if routing is None else (routing[0].contiguous(), routing[1].contiguous())
    held = [rank, top_k]  # the C call reads their memory
    descs = (FlGroup * len(groups))()
    for desc, (q_index, b, n, kv_index, mask) in zip(descs, groups):
        q_index = None if q_index is None else q_index.contiguous()
        kv_index, mask = kv_index.contiguous(), None if mask is None else mask.contiguous()
        held += [q_index, kv_index, mask]
        desc.q_index = None if q_index is None else q_index.data_ptr()
        desc.B, desc.n, desc.kv_index, desc.Lk = b, n, kv_index.data_ptr(), kv_index.shape[1]
        desc.mask = None if mask is None else mask.data_ptr()
    library.fl_decoder(
        ctypes.addressof(layers), len(layers), x.data_ptr(), t, k, h, hkv, d, i, eps, cos.data_ptr(), sin.data_ptr(),
        slots.data_ptr(), ctypes.addressof(descs), len(groups), None if rank is None else rank.data_ptr(),
        None if top_k is None else top_k.data_ptr(), scale, scratch.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
