"""Weight-only quantised linears (`--quantization`): each kernel against its dequantised reference
(the same weights in float32, the same activations), GGUF blocks decoded as the gguf package
dequantises them, and the engine on quantised weights (int8, int4, a GGUF's own blocks) against
transformers on the same weights dequantised."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from freelunch.config import EngineConfig
from freelunch.engine.engine import Engine
from freelunch.engine.request import GenerationRequest, SamplingParams
from freelunch.models import gguf_blocks
from freelunch.models.loader import ModelLoadError, load_model, resolve_source
from freelunch.models.quantization import Int4Linear, Int8Linear, int4_dequantize, int4_quantize, int8_quantize, quantize_linears
from tiny_models import build_tiny_model
from torch import nn


def _blocks(qtype: str, weight: torch.Tensor, rng: np.random.Generator) -> np.ndarray:
    """GGUF blocks of type `qtype` for a [N, K] layer: llama.cpp's reference quantiser (the gguf
    package) where it has one, else random integers under scales that give weights of about
    `weight`'s size (the K-quants: any bytes are valid blocks)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quantize

    if qtype in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        return quantize(weight.numpy().astype(np.float32), GGMLQuantizationType[qtype])
    n, k = weight.shape
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    raw = rng.integers(0, 256, size=(n, k // block, size), dtype=np.uint8)
    top = float(weight.abs().max())
    if qtype in ("Q4_K", "Q5_K"):  # w = d sc q - dmin m, sc and m up to 63, q up to 15 (31)
        top_q = 15 if qtype == "Q4_K" else 31
        raw[..., 0:2] = (rng.uniform(0.5, 1.0, (n, k // block, 1)) * top / (63 * top_q)).astype(np.float16).view(np.uint8)
        raw[..., 2:4] = (rng.uniform(0.5, 1.0, (n, k // block, 1)) * top / (63 * 2)).astype(np.float16).view(np.uint8)
    else:  # Q6_K: w = d sc (q - 32), sc an int8, q - 32 in [-32, 31]
        raw[..., 208:210] = (rng.uniform(0.5, 1.0, (n, k // block, 1)) * top / (128 * 32)).astype(np.float16).view(np.uint8)
    return raw.reshape(n, -1)


def _stored(qtype: str, weight: torch.Tensor, rng: np.random.Generator) -> tuple[gguf_blocks.StoredTensor, torch.Tensor]:
    """(the stored tensor, its reference dequantisation by the gguf package)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    blocks = _blocks(qtype, weight, rng)
    reference = torch.from_numpy(np.asarray(dequantize(blocks, GGMLQuantizationType[qtype]), dtype=np.float32))
    return gguf_blocks.StoredTensor(qtype, blocks, gguf_blocks.row_keys(reference)), reference


@pytest.mark.parametrize("qtype", gguf_blocks.SERVED_TYPES)
def test_blocks_decode_to_the_gguf_packages_dequantisation(qtype):
    rng = np.random.default_rng(len(qtype))
    stored, reference = _stored(qtype, torch.randn(24, 512) * 0.05, rng)
    rows = gguf_blocks.decode(stored.blocks, qtype)
    assert rows.kind == {"Q4": "int4", "Q5_1": "int5", "Q5_K": "int5"}.get(qtype[:2] if qtype[1] == "4" else qtype, "int8")
    # the file's own numbers: equal up to the float32 rounding of one product and one sum
    assert (rows.dequantize() - reference).abs().max() <= 1e-6 * reference.abs().max()
    assert torch.equal(gguf_blocks.row_keys(reference), stored.keys)
    assert not torch.equal(gguf_blocks.row_keys(reference[:, torch.randperm(512)]), stored.keys)
    twins = reference[:2].clone()
    twins[1] = twins[0]
    twins[1, 1] += 1.0  # a column the sampled part of the key does not read: the rows still differ
    keys = gguf_blocks.row_keys(twins)
    assert keys[0] != keys[1]


@pytest.mark.parametrize("qtype", ["Q8_0", "Q6_K"])
@pytest.mark.parametrize("rows", [1, 5, 17])
def test_grouped_int8_kernel_equals_its_dequantized_reference(qtype, rows):
    torch.manual_seed(rows)
    linear = nn.Linear(512, 200, bias=True)
    stored, reference = _stored(qtype, linear.weight.detach(), np.random.default_rng(rows))
    decoded = gguf_blocks.decode(stored.blocks, qtype)
    layer = Int8Linear(linear, (decoded.q, decoded.d))
    assert torch.equal(layer.dequantized(), decoded.dequantize())
    x = torch.randn(rows, 512)
    want = torch.nn.functional.linear(x, reference, linear.bias)
    assert (layer(x) - want).abs().max() <= 1e-5 * want.abs().max()
    assert (layer(x.bfloat16()).float() - want).abs().max() <= 2e-2 * want.abs().max()  # bf16 activations


@pytest.mark.parametrize("kind", [Int8Linear, Int4Linear])
@pytest.mark.parametrize("rows", [1, 5, 17])
def test_kernel_equals_its_dequantized_reference(kind, rows):
    torch.manual_seed(rows)
    linear = nn.Linear(576, 1536, bias=True)
    layer = kind(linear)
    x = torch.randn(2, rows, 576)
    want = torch.nn.functional.linear(x, layer.dequantized(), linear.bias)
    got = layer(x)
    assert got.shape == want.shape
    # float32 sums in another order: |error| within 1e-5 of the outputs' scale
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    # and the quantisation itself stays close to the float layer (4 bits: a few percent)
    assert (want - linear(x)).abs().max() <= (0.01 if kind is Int8Linear else 0.15) * linear(x).abs().max()


def test_quantize_round_trips():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    q, s = int8_quantize(w)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    assert torch.equal(int8_quantize(q.float() * s[:, None])[0], q)  # idempotent
    q4, d, m = int4_quantize(w)
    assert q4.min() == 0 and q4.max() == 15
    again = int4_quantize(int4_dequantize(q4, d, m))
    assert torch.equal(again[0], q4)


def _dequantized_copy(hf, mode: str) -> None:
    """Write each linear's quantised-then-dequantised weights into `hf` (the reference)."""
    with torch.no_grad():
        for module in hf.modules():
            if isinstance(module, nn.Linear):
                w = module.weight
                if mode == "int8":
                    q, s = int8_quantize(w)
                    w.copy_(q.float() * s[:, None])
                else:
                    w.copy_(int4_dequantize(*int4_quantize(w)))


def _engine_equals_transformers(hf, loaded, folder, mode: str, atol: float = 1e-4, **config) -> None:
    """Greedy tokens equal and logprobs within `atol` on three prompts (a float32 cache: the exact reference)."""
    engine = Engine(loaded, EngineConfig(model=str(folder), max_model_len=256, kv_cache_gib=0.02, quantization=mode, kv_cache_dtype="float32", **config))
    prompts = [[1, 5, 9, 200, 31], [1, 4000, 17, 18, 19, 20, 21, 22], [1] + list(range(300, 340))]
    for i, p in enumerate(prompts):
        engine.add_request(GenerationRequest(f"r{i}", p, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=1)))
    got: dict[str, list] = {}
    while engine.has_work():
        for o in engine.step():
            got.setdefault(o.request_id, []).extend(o.logprobs or [])
    for i, p in enumerate(prompts):
        ids = [lp.token_id for lp in got[f"r{i}"]]
        ref = hf.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, min_new_tokens=10)[0, len(p) :].tolist()
        assert ids == ref
        with torch.no_grad():
            logits = hf(torch.tensor([p + ids])).logits[0, len(p) - 1 : -1].float()
        want = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids)[:, None]).flatten()
        assert torch.allclose(torch.tensor([lp.logprob for lp in got[f"r{i}"]]), want, atol=atol)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_engine_on_quantized_weights_equals_transformers_on_them_dequantized(tmp_path, mode):
    hf = build_tiny_model(tmp_path, "llama", seed=5)
    _dequantized_copy(hf, mode)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    loaded = load_model(resolve_source(str(tmp_path)), "float32", quantization=mode, activations="float")
    kinds = {type(m) for m in loaded.model.modules()}
    assert (Int8Linear if mode == "int8" else Int4Linear) in kinds
    _engine_equals_transformers(hf, loaded, tmp_path, mode)


# A llama.cpp-style mix: each projection stored in its own type; layer 1's v in Q8_0 while its q
# and k are int4 (their fused layer cannot hold both: it stays float).
GGUF_TYPES = {"q_proj": "Q4_K", "k_proj": "Q4_0", "v_proj": "Q4_1", "o_proj": "Q8_0", "gate_proj": "Q6_K", "up_proj": "Q8_0", "down_proj": "Q4_K", "lm_head": "Q6_K"}


def test_engine_serves_a_gguf_files_blocks_as_transformers_computes_them(tmp_path):
    hf = build_tiny_model(tmp_path, "llama", seed=6, hidden_size=256, intermediate_size=512)  # K-quants: 256 inputs a block
    rng = np.random.default_rng(6)
    stored = {}
    with torch.no_grad():
        for name, module in hf.named_modules():
            if isinstance(module, nn.Linear):
                qtype = "Q8_0" if name == "model.layers.1.self_attn.v_proj" else GGUF_TYPES[name.rsplit(".", 1)[-1]]
                t, reference = _stored(qtype, module.weight.detach(), rng)
                module.weight.copy_(reference)
                if name.endswith("q_proj"):  # stored in another row order (llama.cpp permutes q and k)
                    order = torch.randperm(reference.shape[0])
                    t = gguf_blocks.StoredTensor(qtype, t.blocks[order.numpy()], t.keys[order])
                stored[name] = t
        # layer 1's o_proj no longer holds the file's numbers, in a column its rows' keys do not read
        hf.model.layers[1].self_attn.o_proj.weight[3, 1] += 1e-3
    hf.save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(ModelLoadError, match="gguf"):  # no blocks in the folder: nothing to serve
        load_model(resolve_source(str(tmp_path)), "float32", quantization="gguf")
    assert load_model(resolve_source(str(tmp_path)), "float32", quantization="auto").quantization == "none"
    gguf_blocks.save(stored, tmp_path)
    assert [p.name for p in tmp_path.glob("*.safetensors")] == ["model.safetensors"]  # vLLM loads every one there
    # a folder holding a GGUF's blocks is one converted from a GGUF (what workers load): auto serves them
    loaded = load_model(resolve_source(str(tmp_path)), "float32", quantization="auto", activations="float")
    assert loaded.quantization == "gguf" and loaded.activations == "float"
    model = loaded.model
    assert isinstance(model.layers[0].self_attn.qkv_proj, Int4Linear)
    assert not isinstance(model.layers[1].self_attn.qkv_proj, (Int4Linear, Int8Linear))  # int4 and int8 rows
    assert isinstance(model.layers[0].self_attn.o_proj, Int8Linear)
    assert not isinstance(model.layers[1].self_attn.o_proj, Int8Linear)  # found by key, refused by value: float
    assert isinstance(model.layers[0].mlp.gate_up_proj, Int8Linear)  # Q6_K and Q8_0: groups of 16
    assert isinstance(model.layers[0].mlp.down_proj, Int4Linear) and isinstance(model.lm_head, Int8Linear)
    _engine_equals_transformers(hf, loaded, tmp_path, "gguf")


@pytest.mark.parametrize(
    "flags, level",
    [
        ("fpu sse2 avx2 fma f16c", "avx2"),
        ("avx2 fma avx512f avx512bw avx512vl avx512_vnni", "avx512"),
        ("avx2 fma avx512f avx512bw avx512vl avx512_bf16 avx512_vnni", "avx512_bf16"),
        ("avx2 fma avx512f avx512bw avx512vl avx512_bf16 amx_bf16 amx_int8", "amx"),
        ("fp asimd", "neon"),
        ("sse2", "baseline"),
    ],
)
def test_cpu_features_name_the_widest_level(monkeypatch, flags, level):
    from freelunch import cpu_features

    key = "Features" if "asimd" in flags else "flags"
    monkeypatch.setattr(cpu_features, "_cpuinfo", lambda: ("model name\t: Test CPU", f"{key}\t\t: {flags}"))
    assert cpu_features.isa_level() == level and cpu_features.cpu_name() == "Test CPU"
    assert set(cpu_features.cpu_features()) <= set(flags.split())
