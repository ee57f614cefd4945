"""The native engine on its CUDA kernels (`--triton-kernels`), checked on a CPU in Triton's interpreter.

On CUDA the engine attends over its paged cache with `kernels/tree_attention_triton.py` (decode
rows, prompt chunks over cached blocks, draft trees) and runs MoE experts with
`kernels/moe_triton.py`. Here a child pytest runs engine parity tests (against transformers) and MoE
tests with those kernels forced on under TRITON_INTERPRET=1, plain float32 linears (our C linears
are CPU-only) and a float32 cache, and counts the kernels' calls, so a silent fallback to the
PyTorch path fails this test. `bench/device_check.sh` runs the same parity files compiled on a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="Triton is not installed (the test extra has it)")

TESTS = Path(__file__).parent
# parity with transformers on the paths a step takes: decode rows, requests joining, prompt chunks
# over cached blocks, logprobs, preemption; MoE routing and SCMoE's weak rows (experts -1)
SELECTED = {
    "test_engine_parity.py": "(greedy_alone or mixed_batch or chunked_prefill or logprobs_match) and llama",
    "test_moe.py": "(greedy_matches_transformers or scmoe_greedy) and qwen2_moe",
    "test_triton_path.py": "inner",
}


def test_engine_on_the_triton_path_matches_transformers(tmp_path):
    calls = tmp_path / "calls.json"
    env = dict(os.environ, TRITON_INTERPRET="1", FREELUNCH_CPU_LINEAR="torch", FREELUNCH_TEST_TRITON="on")
    env["FREELUNCH_TRITON_CALLS"] = str(calls)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    failures = []
    for file, selection in SELECTED.items():
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "triton_calls", "-p", "no:cacheprovider", str(TESTS / file), "-k", selection],
            env=env, capture_output=True, text=True, timeout=900, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            failures.append(f"{file}:\n{proc.stdout[-4000:]}{proc.stderr[-2000:]}")
            continue
        counted = json.loads(calls.read_text())
        assert counted["tree_attention"] > 0, f"{file}: the Triton attention kernel never ran"
        if file == "test_moe.py":
            assert counted["grouped_expert_mlp"] > 0, "the Triton MoE kernel never ran"
    assert not failures, "\n".join(failures)


@pytest.mark.skipif(os.environ.get("FREELUNCH_TEST_TRITON") != "on", reason="runs inside the Triton-path test above")
def test_inner_token_recycling_is_lossless_on_the_triton_path(tmp_path):
    """Draft trees verified by the Triton kernel (tree attention over the cache with an ancestor
    mask): the same tokens as plain decoding."""
    from freelunch.config import EngineConfig
    from freelunch.engine.engine import Engine
    from freelunch.engine.request import GenerationRequest, SamplingParams
    from freelunch.models.loader import load_model, resolve_source
    from tiny_models import build_tiny_model, engine_settings

    build_tiny_model(tmp_path, "llama", seed=5)
    loaded = load_model(resolve_source(str(tmp_path)), "float32")
    prompts = [[1, 5, 9, 5, 9, 5, 9, 5], [1, 7, 8, 9, 10, 7, 8, 9, 10, 7], [1, 3]]

    def run(methods: dict) -> dict[str, list[int]]:
        engine = Engine(loaded, EngineConfig(kv_cache_gib=0.02, max_model_len=256, max_step_cost=float("inf"), **engine_settings({})))
        assert engine.kernels.endswith("+triton")
        for i, p in enumerate(prompts):
            engine.add_request(GenerationRequest(f"r{i}", p, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True), dict(methods)))
        out: dict[str, list[int]] = {}
        while engine.has_work():
            for o in engine.step():
                out.setdefault(o.request_id, []).extend(o.new_token_ids)
        return out

    assert run({"speculative": {"tree": "2.2.2"}}) == run({})
