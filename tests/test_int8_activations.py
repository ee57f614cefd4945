"""Integer-activation linears (kernels/cpu/linear_int8.c, `--activations int8`): every variant this
CPU runs equals the PyTorch reference (freelunch/kernels/linear_int8_ref.py) at 1-64 rows, for
every weight form; a row's result is the same bits whatever the other rows of the call and the
variant (what keeps Token Recycling lossless); the engine on int8 activations serves GGUF blocks,
and speculative decoding over them equals plain decoding token for token."""

from __future__ import annotations

import pytest
import torch
from freelunch.kernels import cpu_kernels
from freelunch.kernels.linear_int8_ref import linear_int8_activations, quantize_activations
from freelunch.models.gguf_blocks import QuantizedRows
from freelunch.models.quantization import Int8ActivationLinear, quantize_linears
from torch import nn

pytestmark = pytest.mark.skipif(not cpu_kernels.cpu_supported(), reason="the kernels need AVX2 and FMA")

ROWS = (1, 2, 5, 8, 16, 17, 64)
# weight forms: (bits, group, integer range): GGUF's Q8_0 (and any int8, -128 included), Q6_K's 16-input
# groups, Q4_x (unsigned with an offset), Q5_1 / Q5_K (5-bit unsigned with an offset)
FORMS = {"int8/32": (8, 32, (-128, 127)), "int8/16": (8, 16, (-32, 31)), "int4/32": (4, 32, (0, 15)), "int5/32": (5, 32, (0, 31))}


@pytest.fixture(scope="module")
def library():
    library = cpu_kernels.load()
    if library is None:
        pytest.skip("the CPU kernels did not build")
    chosen = cpu_kernels.int8_variant()
    yield library
    cpu_kernels.use_int8_variant(chosen)


def weights(form: str, n: int, k: int, seed: int, half: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    bits, group, (lo, hi) = FORMS[form]
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(lo, hi + 1, (n, k), generator=g).to(torch.int8 if bits == 8 else torch.uint8)
    d = torch.rand(n, k // group, generator=g) * 0.02 + 1e-3
    m = None if bits == 8 else -torch.rand(n, k // 32, generator=g) * 0.1
    if half:  # float16 values (as GGUF's Q4_0, Q4_1, Q8_0 store them): kept as float16
        d, m = d.half().float(), None if m is None else m.half().float()
    return q, d, m, bits


@pytest.mark.parametrize("half", [False, True], ids=["float32-scales", "float16-scales"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("variant", cpu_kernels.INT8_VARIANTS)
def test_every_variant_equals_the_reference_at_every_row_count(library, variant, form, half):
    if variant not in cpu_kernels.int8_variants(library):
        pytest.skip(f"this CPU lacks what the {variant} kernels need (CPUID)")
    n, k = 52, 320  # 7 panels of 8 columns, the last of 4: three pairs (the 512-bit tiles) and one alone
    q, d, m, bits = weights(form, n, k, seed=len(form), half=half)
    bias = torch.randn(n)
    matrix = cpu_kernels.pack_int8_activations(q, d, m, n, bias, bits)
    assert matrix.scales.dtype == (torch.float16 if half else torch.float32)
    assert torch.equal(cpu_kernels.unpack_int8_activations(matrix, k).to(q.dtype), q)
    for rows in ROWS:
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)) * 3
        x[0, :32] = 0.0  # a block of zeros (scale 0)
        want = linear_int8_activations(x, q, d, m, bias)
        cpu_kernels.use_int8_variant("avx2")  # every x86-64 CPU the kernels run on has it
        baseline = cpu_kernels.matrix_apply(library, matrix, x)
        cpu_kernels.use_int8_variant(variant)
        got = cpu_kernels.matrix_apply(library, matrix, x)
        # integer sums exact, the float steps in the reference's order: the same bits, but for the
        # reference's float64 fma rounding twice (rare): within a float32 rounding of the sum
        scale = linear_int8_activations(x.abs(), q.abs().to(q.dtype), d, None if m is None else m.abs()).abs()
        assert ((got - want).abs() <= 2e-7 * scale + 1e-30).all(), rows
        assert torch.equal(got, baseline), f"{variant} differs from avx2 at {rows} rows"
        alone = torch.cat([cpu_kernels.matrix_apply(library, matrix, x[i : i + 1]) for i in range(rows)])
        assert torch.equal(alone, got), f"a row's result depends on the other rows ({rows})"


def test_activation_quantisation_is_llama_cpp_q8_blocks():
    x = torch.tensor([[0.5, -1.0, 0.25] + [0.0] * 29])
    q, d, s = quantize_activations(x)
    assert d[0, 0] == torch.tensor(1.0) / 127
    assert q[0, :3].tolist() == [64, -127, 32]  # 63.5 rounds half to even
    assert s[0, 0] == d[0, 0] * (64 - 127 + 32)


def test_per_channel_int8_and_int4_layers_run_on_integer_activations(library):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 40, bias=False), nn.Linear(40, 8))  # 40 inputs: not blocks of 32
    x = torch.randn(3, 64)
    for mode in ("int8", "int4"):
        copy = nn.Sequential(*[nn.Linear(l.in_features, l.out_features, bias=l.bias is not None) for l in model])
        copy.load_state_dict(model.state_dict())
        counts = quantize_linears(copy, mode, activations="int8")
        assert isinstance(copy[0], Int8ActivationLinear) and isinstance(copy[1], Int8ActivationLinear)
        assert not isinstance(copy[2], Int8ActivationLinear)  # K = 40: the float-activation kernels instead
        assert sum(counts.values()) == 3
        h = x
        for layer in copy:
            if isinstance(layer, Int8ActivationLinear):
                w = layer.dequantized()
                rows = QuantizedRows(*_rows_of(layer))
                want = linear_int8_activations(h, rows.q, rows.d, rows.m, layer.matrix.bias)
                got = layer(h)
                assert ((got - want).abs() <= 1e-6 * want.abs().max()).all()
                # int8 activations stay close to the float result on the same weights
                exact = nn.functional.linear(h, w, layer.matrix.bias)
                assert (got - exact).abs().max() <= 0.02 * exact.abs().max()
            h = layer(h)


def _rows_of(layer: Int8ActivationLinear):
    m = layer.matrix
    q = cpu_kernels.unpack_int8_activations(m, layer.in_features)
    d = cpu_kernels.from_panels(m.scales, m.out_features)
    mins = None if m.mins is None else cpu_kernels.from_panels(m.mins, m.out_features)
    return q, d, mins, m.group


def test_a_variant_the_cpu_lacks_is_refused(library, monkeypatch):
    monkeypatch.setattr(library, "fl_int8_variants", lambda: 1)  # an AVX2-only CPU
    monkeypatch.setenv("FREELUNCH_INT8_KERNEL", "avx512vnni")
    with pytest.raises(RuntimeError, match="avx512vnni"):
        cpu_kernels._chosen_variant(library)
    monkeypatch.delenv("FREELUNCH_INT8_KERNEL")
    assert cpu_kernels._chosen_variant(library) == "avx2"


class _ReferenceLinear(nn.Module):
    """transformers' layer computed as linear_int8_activations on `mode`'s quantised weights."""

    def __init__(self, linear: nn.Linear, mode: str) -> None:
        super().__init__()
        rows = _quantized_rows(linear, mode)
        self.q, self.d, self.m = rows.q, rows.d, rows.m
        self.bias = None if linear.bias is None else linear.bias.detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear_int8_activations(x.reshape(-1, x.shape[-1]).float(), self.q, self.d, self.m, self.bias)
        return y.view(*x.shape[:-1], -1)


def _quantized_rows(linear: nn.Linear, mode: str) -> QuantizedRows:
    from freelunch.models.quantization import _rows

    rows = _rows(linear, mode)
    if rows.group == linear.in_features:  # one scale a row: the kernel repeats it per 32 inputs
        rows = QuantizedRows(rows.q, rows.d.expand(-1, linear.in_features // 32), None, 32, 8)
    return rows


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_engine_on_int8_activations_equals_transformers_computing_them(tmp_path, mode):
    from freelunch.models.loader import load_model, resolve_source
    from test_quantization import _engine_equals_transformers
    from tiny_models import build_tiny_model

    hf = build_tiny_model(tmp_path, "llama", seed=7)
    loaded = load_model(resolve_source(str(tmp_path)), "float32", quantization=mode, activations="int8")
    assert loaded.activations == "int8" and loaded.kernels == f"int8-{cpu_kernels.int8_variant()}"
    assert any(isinstance(m, Int8ActivationLinear) for m in loaded.model.modules())
    for parent in list(hf.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, _ReferenceLinear(child, mode))
    # transformers' attention sums in another order than ours (1e-6); an activation that lands that
    # close to a rounding boundary of its int8 block then takes the other integer: one step of a
    # block's scale, ~1e-3 on a logprob (seen: 1.5e-3). Tokens stay equal.
    _engine_equals_transformers(hf, loaded, tmp_path, mode, atol=5e-3, activations="int8")


def test_token_recycling_over_int8_activations_equals_plain_decoding(tmp_path):
    from freelunch.config import EngineConfig
    from freelunch.engine.engine import Engine
    from freelunch.engine.request import GenerationRequest, SamplingParams
    from freelunch.models.loader import load_model, resolve_source
    from tiny_models import build_tiny_model

    build_tiny_model(tmp_path, "llama", seed=8)
    loaded = load_model(resolve_source(str(tmp_path)), "float32", quantization="int4", activations="int8")
    tok = loaded.tokenizer
    prompts = ["1, 2, 3, 4, 5, 6, 7,", "Translate to French: I like cheese.", "x"]

    def run(spec: dict | None) -> dict[str, list[int]]:
        engine = Engine(loaded, EngineConfig(kv_cache_gib=0.05, max_model_len=512, max_step_cost=float("inf")))
        methods = {"speculative": spec} if spec is not None else {}
        for i, p in enumerate(prompts * 2):  # twice: the table has seen the chats the second time
            engine.add_request(GenerationRequest(f"r{i}", tok.encode(p), SamplingParams(max_tokens=30, temperature=0, ignore_eos=True), dict(methods)))
        out: dict[str, list[int]] = {}
        while engine.has_work():
            for o in engine.step():
                out.setdefault(o.request_id, []).extend(o.new_token_ids)
        return out

    plain = run(None)
    for spec in ({"method": "token_recycling"}, {"method": "token_recycling", "tree": "2.2.2"}, {"method": "token_recycling", "tree": 12}):
        assert run(spec) == plain
