"""The decoder's layers as one C call (models/cpu_decoder.py): every step it serves gives the very
bits of the per-layer path (itself checked against transformers), for each weight kind the
kernels read, with biases, over padded decode rows and a draft tree; steps it does not serve fall
back; a stack whose modules were replaced is rebuilt."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from freelunch.config import EngineConfig
from freelunch.engine.engine import Engine
from freelunch.engine.request import GenerationRequest, SamplingParams
from freelunch.kernels import cpu_kernels
from freelunch.models.cpu_decoder import CpuDecoderStack
from freelunch.models.loader import load_model, resolve_source
from freelunch.models.cpu_linear import PanelLinear
from tiny_models import build_tiny_model

pytestmark = pytest.mark.skipif(cpu_kernels.load() is None, reason="the C kernels do not build on this machine")

PROMPTS = [[1, 5, 9, 200, 31], [1, 4000, 17, 18, 19, 20, 21, 22], [1] + list(range(300, 340))]


def _run(folder, mode: str, monkeypatch, stack: bool) -> tuple[dict[str, list], list[tuple[int, int]]]:
    """(request id -> [(token, logprob, top logprobs)], (tokens, queries a row) of each step the stack ran)."""
    monkeypatch.setenv("FREELUNCH_CPU_DECODER", "stack" if stack else "layers")
    loaded = load_model(resolve_source(str(folder)), "float32", quantization=mode)
    served: list[tuple[int, int]] = []
    run = CpuDecoderStack.run

    def counted(self, x, cos, sin, attn):
        served.append((x.shape[0], attn.groups[0].n))
        return run(self, x, cos, sin, attn)

    monkeypatch.setattr(CpuDecoderStack, "run", counted)
    config = EngineConfig(model=str(folder), max_model_len=256, kv_cache_gib=0.02, quantization=mode, max_step_cost=float("inf"))
    engine = Engine(loaded, config)
    greedy = lambda: SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)  # noqa: E731
    got: dict[str, list] = {}
    # decode rows of different lengths (one padded group), then a small draft tree alone (2 + 4 + 8
    # nodes and the root: 15 queries, within the C attention's 16); together they are two groups
    batches = [
        [GenerationRequest(f"r{i}", p, greedy()) for i, p in enumerate(PROMPTS)],
        [GenerationRequest("spec", PROMPTS[1], greedy(), {"speculative": {"method": "token_recycling", "tree": "2.2.2"}})],
    ]
    for batch in batches:
        for request in batch:
            engine.add_request(request)
        while engine.has_work():
            for o in engine.step():
                got.setdefault(o.request_id, []).extend((lp.token_id, lp.logprob, lp.top) for lp in o.logprobs or [])
    monkeypatch.undo()
    return got, served


@pytest.mark.parametrize("kind", ["llama", "qwen2"])  # qwen2: biases on q, k and v
@pytest.mark.parametrize("mode", ["none", "int8", "int4"])
def test_stack_steps_equal_the_per_layer_path_bit_for_bit(tmp_path, monkeypatch, kind, mode):
    hf = build_tiny_model(tmp_path, kind, seed=7)
    fused, served = _run(tmp_path, mode, monkeypatch, stack=True)
    layered, unserved = _run(tmp_path, mode, monkeypatch, stack=False)
    assert fused == layered  # tokens and logprobs, to the last bit
    assert [t for t, _, _ in fused["spec"]] == [t for t, _, _ in fused["r1"]]  # lossless speculation through the stack too
    assert unserved == []
    assert any(t > 1 and n == 1 for t, n in served), "padded decode rows did not run in C"
    assert any(n > 1 for _, n in served), "no draft tree ran in C"
    if mode == "none":
        for i, p in enumerate(PROMPTS):
            ref = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, min_new_tokens=12)[0, len(p) :]
            assert [t for t, _, _ in fused[f"r{i}"]] == ref.tolist()


def test_layers_the_kernels_do_not_cover_take_the_per_layer_path(tmp_path):
    build_tiny_model(tmp_path, "qwen3", seed=1)  # q/k norms per head: not in the C stack
    loaded = load_model(resolve_source(str(tmp_path)), "float32")
    assert loaded.model.cpu_decoder_stack() is None


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
    from freelunch.pool.worker import log_kernels

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
