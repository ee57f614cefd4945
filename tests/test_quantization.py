"""Weight-only quantised linears (`--quantization`): each kernel against its dequantised reference
(the same weights in float32, the same activations), GGUF Q4_1 numbers recovered exactly, and the
engine on quantised weights against transformers on the same weights dequantised."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from freelunch.config import EngineConfig
from freelunch.engine.engine import Engine
from freelunch.engine.request import GenerationRequest, SamplingParams
from freelunch.models.loader import ModelLoadError, load_model, resolve_source
from freelunch.models.quantization import Int4Linear, Int8Linear, int4_dequantize, int4_quantize, int8_quantize, quantize_linears
from tiny_models import build_tiny_model
from torch import nn


def _q4_1_numbers(weight: torch.Tensor) -> torch.Tensor:
    """`weight` quantised to GGUF Q4_1 and back by the gguf package (llama.cpp's reference)."""
    from gguf.quants import GGMLQuantizationType, dequantize, quantize

    blocks = quantize(weight.numpy().astype(np.float32), GGMLQuantizationType.Q4_1)
    return torch.from_numpy(np.asarray(dequantize(blocks, GGMLQuantizationType.Q4_1), dtype=np.float32)).reshape(weight.shape)


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


def test_q4_1_file_numbers_are_recovered_exactly():
    torch.manual_seed(1)
    numbers = _q4_1_numbers(torch.randn(96, 576) * 0.05)
    q, d, m = int4_quantize(numbers)
    assert (int4_dequantize(q, d, m) - numbers).abs().max() <= 1e-6 * numbers.abs().max()
    model = nn.Sequential(nn.Linear(576, 96, bias=False), nn.Linear(96, 576, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(numbers)  # Q4_1 numbers
        model[1].weight.normal_()  # not: stays float
    assert quantize_linears(model, "gguf") == {"int4": 1, "float": 1}
    assert isinstance(model[0], Int4Linear) and isinstance(model[1], nn.Linear)


def _dequantized_copy(hf, mode: str) -> None:
    """Write each linear's quantised-then-dequantised weights into `hf` (the reference)."""
    with torch.no_grad():
        for module in hf.modules():
            if isinstance(module, nn.Linear):
                w = module.weight
                if mode == "int8":
                    q, s = int8_quantize(w)
                    w.copy_(q.float() * s[:, None])
                elif mode == "int4":
                    w.copy_(int4_dequantize(*int4_quantize(w)))
                else:
                    w.copy_(_q4_1_numbers(w.detach().clone()))


@pytest.mark.parametrize("mode", ["int8", "int4", "gguf"])
def test_engine_on_quantized_weights_equals_transformers_on_them_dequantized(tmp_path, mode):
    hf = build_tiny_model(tmp_path, "llama", seed=5)
    _dequantized_copy(hf, mode)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    loaded = load_model(resolve_source(str(tmp_path)), "float32", quantization=mode)
    kinds = {type(m) for m in loaded.model.modules()}
    assert (Int8Linear if mode == "int8" else Int4Linear) in kinds
    engine = Engine(loaded, EngineConfig(model=str(tmp_path), max_model_len=256, kv_cache_gib=0.02, quantization=mode))
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
        assert torch.allclose(torch.tensor([lp.logprob for lp in got[f"r{i}"]]), want, atol=1e-4)


def test_gguf_mode_refuses_a_model_without_q4_1_numbers(tiny_llama):
    folder, _ = tiny_llama
    with pytest.raises(ModelLoadError, match="Q4_1"):
        load_model(resolve_source(str(folder)), "float32", quantization="gguf")


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
