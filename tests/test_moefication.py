"""MoEfication (service/freelunch/models/moefication.py): a tiny seeded dense Llama converted to Qwen2-MoE.

With every expert active the converted model is the dense model (transformers Qwen2-MoE vs transformers
Llama, logits to float error); the converted folder loads in our engine, whose greedy tokens equal
transformers' Qwen2-MoE on it with top-k < E.
"""

from __future__ import annotations

import pytest
import torch
from freelunch.config import EngineConfig
from freelunch.engine.engine import Engine
from freelunch.engine.request import GenerationRequest, SamplingParams
from freelunch.models.loader import load_model, resolve_source
from freelunch.models.moe import MoeForCausalLM
from freelunch.models.moefication import CALIBRATION_TEXT, balanced_kmeans, convert
from tiny_models import build_tiny_model, default_tokenizer

PROMPTS = ["The capital of France is", "Once upon a time, in a land far away, there lived a dragon."]


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama-dense")
    hf = build_tiny_model(folder, "llama", seed=0)
    return folder, hf


def _qwen(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, experts_implementation="eager").eval()


def test_balanced_kmeans_sizes():
    x = torch.randn(64, 5)
    labels = balanced_kmeans(x, 8)
    assert torch.bincount(labels, minlength=8).tolist() == [8] * 8


@pytest.mark.parametrize("shared", [0.0, 0.5])
def test_all_experts_active_equals_dense(dense, tmp_path, shared):
    folder, hf = dense
    out = convert(folder, tmp_path / "moe", num_experts=4, top_k=4, shared_fraction=shared,
                  calibration_text=CALIBRATION_TEXT[:600], model=hf, tokenizer=default_tokenizer())
    moe = _qwen(out)
    assert type(moe).__name__ == "Qwen2MoeForCausalLM"
    ids = torch.tensor([default_tokenizer().encode(PROMPTS[1])])
    with torch.no_grad():
        a, b = hf(ids).logits.float(), moe(ids).logits.float()
    assert torch.allclose(a, b, atol=2e-3 * a.abs().max().item(), rtol=0), (a - b).abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).all()


def test_engine_greedy_matches_transformers(dense, tmp_path):
    folder, hf = dense
    out = convert(folder, tmp_path / "moe", num_experts=4, top_k=2, shared_fraction=0.25,
                  calibration_text=CALIBRATION_TEXT[:600], model=hf, tokenizer=default_tokenizer())
    moe = _qwen(out)
    loaded = load_model(resolve_source(str(out)), "float32")
    assert isinstance(loaded.model, MoeForCausalLM)
    engine = Engine(loaded, EngineConfig(model=str(out), max_model_len=512, kv_cache_gib=0.02))
    tok = loaded.tokenizer
    expected, reqs = {}, []
    for i, p in enumerate(PROMPTS):
        ids = tok.encode(p)
        g = moe.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
        expected[f"r{i}"] = g[0, len(ids):].tolist()
        reqs.append(GenerationRequest(f"r{i}", ids, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), {}))
    for r in reqs:
        engine.add_request(r)
    got: dict[str, list[int]] = {}
    while engine.has_work():
        for o in engine.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
    assert got == expected
