"""The CPU linear kernel (freelunch/kernels/cpu_kernels.c): same results as F.linear, and a clean fallback.

Every engine-parity test also runs through it: the loader packs float32 CPU linears with it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from freelunch.kernels import cpu_kernels
from freelunch.models import cpu_linear
from freelunch.models.cpu_linear import PackedLinear, PanelLinear, pack_linears

pytestmark = pytest.mark.skipif(not cpu_kernels.cpu_supported(), reason="the kernel needs AVX2 and FMA")


@pytest.fixture
def fresh_kernel(monkeypatch, tmp_path):
    """load() as at a first start, with an empty cache folder."""
    monkeypatch.setenv("FREELUNCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_kernels, "_tried", False)
    monkeypatch.setattr(cpu_kernels, "_library", None)
    return tmp_path / "cache" / "kernels"


@pytest.mark.parametrize("rows", [0, 1, 5, 12, 13, 47, 48, 49, 100])
@pytest.mark.parametrize("in_features,out_features", [(1, 1), (7, 9), (64, 8), (576, 963)])
@pytest.mark.parametrize("bias", [False, True])
def test_panel_linear_matches_f_linear(rows: int, in_features: int, out_features: int, bias: bool) -> None:
    library = cpu_kernels.load()
    assert library is not None, "the kernel did not build: is a C compiler installed?"
    gen = torch.Generator().manual_seed(rows * 1000 + in_features + out_features)
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=gen))
        if bias:
            linear.bias.copy_(torch.randn(out_features, generator=gen))
    x = torch.randn(rows, in_features, generator=gen)
    got = PanelLinear(linear, library)(x)
    assert got.shape == (rows, out_features)
    torch.testing.assert_close(got, F.linear(x, linear.weight, linear.bias), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 5, 8, 17])
@pytest.mark.parametrize("bias", [False, True])
def test_bfloat16_weights_are_kept_as_bfloat16_and_give_the_float32_bits(rows: int, bias: bool) -> None:
    """A bfloat16 checkpoint's weights, loaded as float32, are bfloat16 values: stored in half the
    bytes and widened exactly, the layer gives the very bits of the float32 panels; weights that are
    not bfloat16 values stay float32."""
    gen = torch.Generator().manual_seed(rows)
    linear = torch.nn.Linear(96, 37, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(37, 96, generator=gen).bfloat16().float())
    x = torch.randn(rows, 96, generator=gen)
    halved = PanelLinear(linear, cpu_kernels.load())
    assert halved.packed.dtype == torch.bfloat16 and halved.kernel_matrix().kind == "bf16"
    full = cpu_kernels.linear(cpu_kernels.load(), x, cpu_kernels.pack(linear.weight.detach()), 37, halved.bias)
    assert torch.equal(halved(x), full)
    with torch.no_grad():
        linear.weight[3, 5] += 1e-4  # no longer a bfloat16 value
    assert PanelLinear(linear, cpu_kernels.load()).packed.dtype == torch.float32


def test_panel_linear_takes_any_leading_shape_and_strides() -> None:
    linear = torch.nn.Linear(40, 24)
    panel = PanelLinear(linear, cpu_kernels.load())
    x = torch.randn(3, 40, 5).transpose(1, 2)  # [3, 5, 40], not contiguous
    torch.testing.assert_close(panel(x), linear(x), rtol=1e-5, atol=1e-5)


def test_a_first_start_builds_the_kernel_once_into_the_cache(fresh_kernel) -> None:
    assert cpu_kernels.load() is not None
    built = list(fresh_kernel.iterdir())
    assert [p.name for p in built] == [cpu_kernels.library_name()]  # no temporary files left behind
    mtime = built[0].stat().st_mtime_ns
    cpu_kernels._tried = False
    assert cpu_kernels.load() is not None
    assert built[0].stat().st_mtime_ns == mtime  # loaded, not rebuilt


def test_a_prebuilt_kernel_loads_without_a_compiler(fresh_kernel, monkeypatch) -> None:
    cpu_kernels.build(fresh_kernel, cpu_kernels._compiler())  # as the Dockerfile's build stage does
    monkeypatch.setattr(cpu_kernels, "_compiler", lambda: None)
    assert cpu_kernels.load() is not None


def test_without_compiler_or_prebuilt_kernel_the_model_uses_onednn(fresh_kernel, monkeypatch) -> None:
    monkeypatch.setattr(cpu_kernels, "_compiler", lambda: None)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8))
    x = torch.randn(3, 16)
    expected = model(x)
    assert pack_linears(model) == 1
    assert isinstance(model[0], PackedLinear if cpu_linear.onednn_available() else torch.nn.Linear)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_a_compiler_error_falls_back_instead_of_failing_the_start(fresh_kernel, monkeypatch, tmp_path) -> None:
    (tmp_path / "broken.c").write_text("this is not C\n")
    monkeypatch.setattr(cpu_kernels, "SOURCES", tmp_path)
    assert cpu_kernels.load() is None


def test_an_unwritable_cache_builds_in_a_temporary_folder(fresh_kernel, monkeypatch, tmp_path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")  # a file where the cache folder would be: no one (root included) can create it
    monkeypatch.setenv("FREELUNCH_CACHE_DIR", str(blocker))
    assert cpu_kernels.load() is not None
    assert blocker.is_file()


def test_a_library_others_may_write_is_never_loaded(fresh_kernel) -> None:
    planted = cpu_kernels.build(fresh_kernel, cpu_kernels._compiler())
    planted.chmod(0o666)  # anyone could have replaced it
    assert not cpu_kernels.trusted(planted)
    assert cpu_kernels.load() is not None  # built apart instead
    assert cpu_kernels._library._name != str(planted)
    planted.chmod(0o755)
    fresh_kernel.chmod(0o777)  # or its folder
    assert not cpu_kernels.trusted(planted)
    fresh_kernel.chmod(0o755)
    assert cpu_kernels.trusted(planted)


def test_the_choice_can_be_forced_by_environment(monkeypatch) -> None:
    for choice, kind in [("onednn", PackedLinear), ("torch", torch.nn.Linear), ("panel", PanelLinear)]:
        if kind is PackedLinear and not cpu_linear.onednn_available():
            continue
        monkeypatch.setenv("FREELUNCH_CPU_LINEAR", choice)
        model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        pack_linears(model)
        assert type(model[0]) is kind


@pytest.mark.parametrize(
    "batch,queries,heads,kv_heads,head_dim,keys",
    [(1, 1, 9, 3, 64, 107), (3, 1, 4, 2, 32, 5), (1, 7, 9, 3, 64, 300), (2, 16, 4, 4, 24, 64), (1, 3, 2, 1, 20, 17)],
)
@pytest.mark.parametrize("masked", [False, True])
def test_paged_attention_matches_the_reference(batch, queries, heads, kv_heads, head_dim, keys, masked) -> None:
    from freelunch.kernels.paged_attention_ref import paged_attention_ref

    gen = torch.Generator().manual_seed(batch * 100 + queries * 10 + keys)
    slots = 3 * keys
    k_cache, v_cache = (torch.randn(slots, kv_heads, head_dim, generator=gen) for _ in range(2))
    kv_index = torch.stack([torch.randperm(slots, generator=gen)[:keys] for _ in range(batch)])  # paged: scattered slots
    mask = None
    if masked:  # a tree mask's shape: some keys hidden per query, each query sees at least one
        mask = torch.rand(batch, queries, keys, generator=gen) > 0.4
        mask[..., -1] = True
    q = torch.randn(batch, queries, heads, head_dim, generator=gen) * 3
    got = cpu_kernels.paged_attention(cpu_kernels.load(), q, k_cache, v_cache, kv_index, mask, head_dim**-0.5)
    want = paged_attention_ref(q.transpose(1, 2), k_cache, v_cache, kv_index, mask, head_dim**-0.5).transpose(1, 2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch,queries,heads,kv_heads,head_dim,keys", [(3, 1, 9, 3, 64, 107), (1, 7, 4, 2, 40, 33)])
def test_paged_attention_over_a_16_bit_cache_is_the_float32_one_on_widened_values(
    stored, batch, queries, heads, kv_heads, head_dim, keys
) -> None:
    """Keys and values stored in 16 bits are widened exactly in registers: the kernel's result is,
    to the bit, its result over the same values widened to a float32 cache (and the SDPA reference
    over the 16-bit cache widens them alike)."""
    from freelunch.kernels.paged_attention_ref import paged_attention_ref

    library = cpu_kernels.load()
    gen = torch.Generator().manual_seed(keys + head_dim)
    slots = 2 * keys
    k16, v16 = ((torch.randn(slots, kv_heads, head_dim, generator=gen) * 4).to(stored) for _ in range(2))
    kv_index = torch.stack([torch.randperm(slots, generator=gen)[:keys] for _ in range(batch)])
    mask = torch.rand(batch, queries, keys, generator=gen) > 0.3
    mask[..., 0] = True
    q = torch.randn(batch, queries, heads, head_dim, generator=gen)
    for m in (None, mask):
        got = cpu_kernels.paged_attention(library, q, k16, v16, kv_index, m, head_dim**-0.5)
        assert torch.equal(got, cpu_kernels.paged_attention(library, q, k16.float(), v16.float(), kv_index, m, head_dim**-0.5))
        want = paged_attention_ref(q.transpose(1, 2), k16, v16, kv_index, m, head_dim**-0.5).transpose(1, 2)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16])
def test_kv_store_rounds_as_torch_does(stored) -> None:
    """The one-call decoder writes its cache with fl_kv_store: the bits torch's .to() gives (round
    to nearest even), through ties, subnormals, overflow and infinities, so that it and the per-layer
    path (index_copy_ of k.to(dtype)) keep the same cache."""
    gen = torch.Generator().manual_seed(7)
    info = torch.finfo(stored)
    low = (torch.randn(999, generator=gen) * 100).to(stored)
    high = (low.view(torch.int16) + 1).view(stored)  # the next 16-bit value away from zero
    ties = (low.float() + high.float()) / 2
    x = torch.cat([
        torch.randn(4099, generator=gen) * 10.0 ** torch.randint(-9, 6, (4099,), generator=gen),
        torch.tensor([0.0, -0.0, float("inf"), -float("inf"), info.max, -info.max, info.max * 1.0001, info.tiny,
                      info.tiny / 3, info.smallest_normal / 1024, 1e-30, 65519.0, 65520.0, 3.4e38]),
        ties,  # halfway between two 16-bit neighbours (exact in float32); their float32 neighbours below
    ])  # fmt: skip
    x = torch.cat([x, torch.nextafter(x, torch.tensor(float("inf"))), torch.nextafter(x, torch.tensor(-float("inf")))])
    got = cpu_kernels.kv_store(cpu_kernels.load(), x, stored)
    assert torch.equal(got.view(torch.int16), x.to(stored).view(torch.int16))


def test_the_model_takes_the_kernel_for_few_queries_and_sdpa_for_many(monkeypatch) -> None:
    from freelunch.models import attention

    q, cache = torch.zeros(1, 1), torch.zeros(1, 1)
    limit = attention.CPU_PROMPT_MAX_QUERIES  # prompt chunks up to it too (the same sums as from the prefix cache)
    assert attention._cpu_kernels_for(q, cache, limit) is not None
    for stored in (torch.float16, torch.bfloat16):  # 16-bit caches too: widened in the kernel
        assert attention._cpu_kernels_for(q, cache.to(stored), 1) is not None
    assert attention._cpu_kernels_for(q, cache.double(), 1) is None
    assert attention._cpu_kernels_for(q, cache, limit + 1) is None
    assert attention._cpu_kernels_for(q.double(), cache, 1) is None
    monkeypatch.setenv("FREELUNCH_CPU_ATTENTION", "sdpa")
    attention.attention_library.cache_clear()
    try:
        assert attention._cpu_kernels_for(q, cache, 1) is None
    finally:
        monkeypatch.delenv("FREELUNCH_CPU_ATTENTION")
        attention.attention_library.cache_clear()


@pytest.mark.parametrize("rows", [1, 3, 40])
@pytest.mark.parametrize("width", [5, 64, 576])
def test_elementwise_kernels_match_pytorch(rows: int, width: int) -> None:
    """RMSNorm (with and without the residual add), q/k norms with clipping and RoPE, and SwiGLU's gate against the PyTorch ops
    the model uses without them: float32 rounding apart (~1e-6 relative)."""
    library = cpu_kernels.load()
    from freelunch.models.llama import rotate_half

    gen = torch.Generator().manual_seed(rows * 7 + width)
    x, delta = (torch.randn(rows, width, generator=gen) * 3 for _ in range(2))
    weight = torch.randn(width, generator=gen)
    total, normed = cpu_kernels.rms_norm(library, x, weight, 1e-5, delta)
    assert torch.equal(total, x + delta)
    torch.testing.assert_close(normed, F.rms_norm(x + delta, (width,), weight, 1e-5), rtol=1e-5, atol=1e-5)
    same, normed = cpu_kernels.rms_norm(library, x, weight, 1e-5)
    assert same is x
    torch.testing.assert_close(normed, F.rms_norm(x, (width,), weight, 1e-5), rtol=1e-5, atol=1e-5)

    gate_up = torch.randn(rows, 2 * width, generator=gen) * 6  # includes gates far into both tails
    want = F.silu(gate_up[:, :width]) * gate_up[:, width:]
    torch.testing.assert_close(cpu_kernels.silu_mul(library, gate_up), want, rtol=1e-5, atol=1e-6)

    head_dim, h, hkv = 2 * width if width % 2 else width, 2, 1  # RoPE on the 3 q and k heads of 4 per row
    cos, sin = torch.randn(rows, head_dim, generator=gen), torch.randn(rows, head_dim, generator=gen)
    for norm, clip in ((None, None), ("head", None), ("projection", 0.7), ("head", 0.7)):
        qkv = torch.randn(rows, (h + 2 * hkv) * head_dim, generator=gen) * 2
        q_w, k_w = (torch.rand(n * head_dim if norm == "projection" else head_dim, generator=gen) + 0.5 for n in (h, hkv))
        want = qkv.clone()
        if norm == "projection":
            want[:, : h * head_dim] = F.rms_norm(want[:, : h * head_dim], q_w.shape, q_w, 1e-6)
            want[:, h * head_dim : (h + hkv) * head_dim] = F.rms_norm(want[:, h * head_dim : (h + hkv) * head_dim], k_w.shape, k_w, 1e-6)
        if clip is not None:
            assert (want.abs() > clip).any()  # the clamp binds
            want = want.clamp(-clip, clip)
        want = want.view(rows, h + 2 * hkv, head_dim)
        if norm == "head":
            want[:, :h] = F.rms_norm(want[:, :h], q_w.shape, q_w, 1e-6)
            want[:, h : h + hkv] = F.rms_norm(want[:, h : h + hkv], k_w.shape, k_w, 1e-6)
        qk = want[:, : h + hkv]
        want = torch.cat([qk * cos[:, None] + rotate_half(qk) * sin[:, None], want[:, h + hkv :]], dim=1)
        desc = cpu_kernels.FlQk.of(norm, q_w if norm else None, k_w if norm else None, 1e-6, clip)
        cpu_kernels.qk_prepare_(library, qkv, desc, h, hkv, head_dim, cos, sin)
        torch.testing.assert_close(qkv.view_as(want), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows,vocab,k", [(1, 49152, 8), (5, 1000, 8), (3, 7, 4), (2, 100, 32), (4, 300, 1)])
def test_topk_matches_torch_and_orders_ties_by_index(rows: int, vocab: int, k: int) -> None:
    """Token Recycling's table update and greedy target read it: the values of torch.topk, and of
    equal values the lower index first (the one argmax picks)."""
    library = cpu_kernels.load()
    gen = torch.Generator().manual_seed(rows * vocab + k)
    x = torch.randn(rows, vocab, generator=gen)
    x[0, vocab - 1] = x[0, vocab // 2] = x[0].max() + 1  # a tie at the top, the later index first in memory order
    if rows > 1:
        x[-1, : vocab // 2] = float("-inf")  # masked entries (a grammar, a plausibility cut)
    values, indices = cpu_kernels.topk(library, x, k)
    want_values, _ = torch.topk(x, k)
    assert torch.equal(values, want_values)
    assert torch.equal(x.gather(1, indices), values)
    assert int(indices[0, 0]) == vocab // 2 == int(x[0].argmax())
    for r in range(rows):  # among equal values, ascending index
        for a, b in zip(range(k - 1), range(1, k)):
            if values[r, a] == values[r, b]:
                assert indices[r, a] < indices[r, b]
    assert all(len(set(row)) == k for row in indices.tolist())
