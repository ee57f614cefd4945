"""The decoder's layers as one C call (models/cpu_decoder.py): every step it serves gives the very
bits of the per-layer path (itself checked against transformers), for each weight kind the
kernels read, with biases, q/k norms and clipping, over padded decode rows, fresh prompt chunks
beside decode rows, draft trees up to 64 queries, guided pairs and trees over guided pairs; steps
it does not serve fall back; a stack whose modules were replaced is rebuilt."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from freelunch.config import EngineConfig
from freelunch.engine.engine import Engine
from freelunch.engine.request import GenerationRequest, SamplingParams
from freelunch.kernels import cpu_kernels
from freelunch.models.attention import CPU_KERNEL_MAX_QUERIES
from freelunch.models.cpu_decoder import CpuDecoderStack
from freelunch.models.llama import RMSNorm
from freelunch.models.loader import load_model, resolve_source
from freelunch.models.cpu_linear import PanelLinear
from tiny_models import build_tiny_model

pytestmark = pytest.mark.skipif(cpu_kernels.load() is None, reason="the C kernels do not build on this machine")

PROMPTS = [[1, 5, 9, 200, 31], [1, 4000, 17, 18, 19, 20, 21, 22], [1] + list(range(300, 340)), [1] + list(range(500, 580))]


def _greedy(tokens: int = 12) -> SamplingParams:
    return SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True, logprobs=2)


def _arrivals(moe: bool = False) -> dict[int, list[GenerationRequest]]:
    """Requests by the step they arrive at: fresh prompts of 5 to 81 tokens together, then a prompt
    and a tree request beside rows decoding, then guided pairs and a tree over a guided pair; on a
    MoE model, SCMoE's rows (routed per row) and a tree over them."""
    tr = lambda tree: {"speculative": {"method": "token_recycling", "tree": tree}}  # noqa: E731
    guided = {"guidance": {"scale": 1.5}}
    contrast = {"moe_contrast": {"beta": 0.5}}
    return {
        **({60: [GenerationRequest("contrast", PROMPTS[1], _greedy(), contrast),
                 GenerationRequest("contrast_spec", PROMPTS[1], _greedy(), {**contrast, **tr(6)})]} if moe else {}),
        0: [GenerationRequest(f"r{i}", p, _greedy()) for i, p in enumerate(PROMPTS)],
        3: [GenerationRequest("spec", PROMPTS[1], _greedy(), tr(14)), GenerationRequest("late", PROMPTS[0][:3], _greedy())],
        20: [GenerationRequest("spec50", PROMPTS[2], _greedy(), tr(50)), GenerationRequest("spec80", PROMPTS[1], _greedy(), tr("2.2.2"))],
        40: [GenerationRequest("guided", PROMPTS[0], _greedy(), guided), GenerationRequest("guided_spec", PROMPTS[0], _greedy(), {**guided, **tr(6)})],
    }


def _run(folder, mode: str, monkeypatch, stack: bool, adjust=None, kv: str = "auto") -> tuple[dict[str, list], list[tuple[int, ...]]]:
    """(request id -> [(token, logprob, top logprobs)], the queries a row of each group in each step the stack ran)."""
    monkeypatch.setenv("FREELUNCH_CPU_DECODER", "stack" if stack else "layers")
    mode, _, activations = mode.partition("/")  # "int4/float": float activations (default: int8 where quantised)
    loaded = load_model(resolve_source(str(folder)), "float32", quantization=mode, activations=activations or "auto")
    if adjust is not None:
        adjust(loaded.model)
    served: list[tuple[int, ...]] = []
    run = CpuDecoderStack.run

    def counted(self, x, cos, sin, attn):
        served.append(tuple(g.n for g in attn.groups))
        return run(self, x, cos, sin, attn)

    monkeypatch.setattr(CpuDecoderStack, "run", counted)
    config = EngineConfig(
        model=str(folder), max_model_len=256, kv_cache_gib=0.02, quantization=mode, max_step_cost=float("inf"), kv_cache_dtype=kv
    )
    engine = Engine(loaded, config)
    _run.kv_dtype = engine.kv.dtype
    got: dict[str, list] = {}
    arrivals, step = _arrivals(loaded.model.config.moe is not None), 0
    while arrivals or engine.has_work():
        for request in arrivals.pop(step, []):
            engine.add_request(request)
        for o in engine.step():
            got.setdefault(o.request_id, []).extend((lp.token_id, lp.logprob, lp.top) for lp in o.logprobs or [])
        step += 1
    monkeypatch.undo()
    _run.steps_by_path = engine.steps_by_path
    return got, served


def _check(folder, mode, monkeypatch, adjust=None, kv: str = "auto") -> tuple[dict[str, list], list[tuple[int, ...]]]:
    fused, served = _run(folder, mode, monkeypatch, stack=True, adjust=adjust, kv=kv)
    paths = _run.steps_by_path
    # what the one call does not serve falls back: the 81-token prompt (SDPA), the 81-query tree
    assert paths["one_call"] == len(served) and paths["per_layer"] >= 2
    layered, unserved = _run(folder, mode, monkeypatch, stack=False, adjust=adjust, kv=kv)
    assert fused == layered  # tokens and logprobs, to the last bit
    pairs = [("spec", "r1"), ("spec50", "r2"), ("spec80", "r1"), ("guided_spec", "guided"), ("contrast_spec", "contrast")]
    for spec, plain in pairs:
        if spec not in fused:
            continue
        assert [t for t, _, _ in fused[spec]] == [t for t, _, _ in fused[plain]], spec  # lossless speculation
    assert unserved == []
    assert _run.steps_by_path["one_call"] == 0  # FREELUNCH_CPU_DECODER=layers: none in one call
    assert any(len(g) == 1 and g[0] == 1 for g in served), "decode rows alone did not run in C"
    assert any(len(g) > 1 and 1 in g and max(g) > 1 for g in served), "no prompt chunk or tree beside decode rows ran in C"
    assert any(max(g) > 32 for g in served), "no tree over 32 nodes ran in C"
    assert all(max(g) <= CPU_KERNEL_MAX_QUERIES for g in served)
    return fused, served


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])  # qwen2: biases on q, k and v; qwen3: q/k norms per head
@pytest.mark.parametrize("mode", ["none", "int8", "int4", "int4/float"])  # quantised: int8 activations, or float
def test_stack_steps_equal_the_per_layer_path_bit_for_bit(tmp_path, monkeypatch, kind, mode):
    hf = build_tiny_model(tmp_path, kind, seed=7)
    fused, _ = _check(tmp_path, mode, monkeypatch)
    assert _run.kv_dtype == torch.float16  # the CPU's default cache: 16 bits
    if mode == "none":
        for i, p in enumerate(PROMPTS):
            ref = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, min_new_tokens=12)[0, len(p) :]
            assert [t for t, _, _ in fused[f"r{i}"]] == ref.tolist()


@pytest.mark.parametrize("kv", ["float32", "bfloat16"])  # the default (float16 on CPU): above
def test_stack_steps_equal_the_per_layer_path_for_each_kv_cache_dtype(tmp_path, monkeypatch, kv):
    """The one call writes k and v rounded to the cache's dtype as the per-layer path's .to() does
    (fl_kv_store) and widens them as it reads: the same bits either way, in every cache dtype."""
    hf = build_tiny_model(tmp_path, "llama", seed=7)
    fused, _ = _check(tmp_path, "none", monkeypatch, kv=kv)
    assert _run.kv_dtype == getattr(torch, kv)
    for i, p in enumerate(PROMPTS):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, min_new_tokens=12)[0, len(p) :]
        assert [t for t, _, _ in fused[f"r{i}"]] == ref.tolist()


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_moe_steps_equal_the_per_layer_path_bit_for_bit(tmp_path, monkeypatch, kind):
    """Sparse MoE layers (Qwen2-MoE: a shared expert and a dense layer; OLMoE: norms over the
    projection and clipping) in the one C call, SCMoE's weak rows routed per row beside them, and
    greedy tokens as transformers gives them."""
    hf = build_tiny_model(tmp_path, kind, seed=7)
    fused, served = _check(tmp_path, "none", monkeypatch)
    assert "contrast" in fused and "contrast_spec" in fused
    for i, p in enumerate(PROMPTS):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, min_new_tokens=12)[0, len(p) :]
        assert [t for t, _, _ in fused[f"r{i}"]] == ref.tolist()


def test_norms_over_the_projection_and_clipping_run_in_c_alike(tmp_path, monkeypatch):
    """OLMoE's attention (one norm over all q heads and one over all k heads, then clamping) in a
    dense model: the C stack and the per-layer path agree to the bit, and the clamp binds."""
    build_tiny_model(tmp_path, "llama", seed=8)

    def adjust(model):
        gen = torch.Generator().manual_seed(3)
        for layer in model.layers:
            attn = layer.self_attn
            q, kv = attn.num_heads * attn.head_dim, attn.num_kv_heads * attn.head_dim
            attn.qk_norm, attn.clip_qkv = "projection", 0.5
            attn.q_norm, attn.k_norm = RMSNorm(q, 1e-6), RMSNorm(kv, 1e-6)
            for norm in (attn.q_norm, attn.k_norm):
                norm.weight.data = 1 + torch.rand(norm.weight.shape, generator=gen)

    _check(tmp_path, "none", monkeypatch, adjust)


def test_a_stack_is_rebuilt_when_a_layer_is_replaced(tmp_path):
    """Its descriptors point into the modules' weights: a replaced module must not be read stale."""
    build_tiny_model(tmp_path, "llama", seed=2)
    model = load_model(resolve_source(str(tmp_path)), "float32").model
    before = model.cpu_decoder_stack()
    assert before is not None and model.cpu_decoder_stack() is before
    mlp = model.layers[0].mlp
    mlp.down_proj = PanelLinear(nn.Linear(mlp.intermediate, model.config.hidden_size), cpu_kernels.load())
    after = model.cpu_decoder_stack()
    assert after is not before and after.matrices[0][3].packed is mlp.down_proj.packed


def test_the_worker_says_how_decode_steps_run(tmp_path, caplog):
    from freelunch.pool.local_engine import log_kernels

    build_tiny_model(tmp_path, "llama", seed=3)
    with caplog.at_level("INFO", logger="freelunch.worker"):
        log_kernels(load_model(resolve_source(str(tmp_path)), "float32"))
    assert "decode steps: all layers in one C call" in caplog.text


def test_a_bfloat16_checkpoint_runs_in_float32_from_bfloat16_panels(tmp_path):
    """`--dtype auto` on a CPU: transformers' float32 tokens on the checkpoint's own weights, read as
    bfloat16 through the one C call."""
    hf = build_tiny_model(tmp_path, "llama", seed=4).to(torch.bfloat16)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    loaded = load_model(resolve_source(str(tmp_path)), "auto")
    assert loaded.dtype == torch.float32
    stack = loaded.model.cpu_decoder_stack()
    assert stack is not None and {m.kind for layer in stack.matrices for m in layer} == {"bf16"}
    engine = Engine(loaded, EngineConfig(model=str(tmp_path), max_model_len=256, kv_cache_gib=0.02))
    hf = hf.float()
    for i, p in enumerate(PROMPTS):
        engine.add_request(GenerationRequest(f"r{i}", p, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)))
    got: dict[str, list[int]] = {}
    while engine.has_work():
        for o in engine.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
    for i, p in enumerate(PROMPTS):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, min_new_tokens=10)[0, len(p) :]
        assert got[f"r{i}"] == ref.tolist()
