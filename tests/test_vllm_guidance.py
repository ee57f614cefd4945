"""The vLLM guidance processors, driven through vLLM's interfaces with the states vLLM hands them.

Model Runner V2 (vLLM's default on CUDA) cannot run on vLLM's CPU build, so its processor is
driven here as its sampler would: slots through `add_request`, the step's layout through a
`LogitsContext`, request lengths through the runner's host-side buffers. The V1 processor runs for
real in test_vllm_backend.py (vLLM's CPU build uses the V1 runner). Marked `vllm` (needs vLLM).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm", reason="the vllm extra is not installed")

from freelunch.methods.guidance_vllm import GUIDANCE_PAIRS, PairedGuidance, PairedGuidanceV2
from freelunch.methods.spec import PAIR_KEY
from freelunch.config import EngineConfig
from freelunch.methods.guidance import guide
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate
from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2Interface

VOCAB = 50
SLOTS = 8
MAX_LEN = 64


def tagged(role: str, pair: str = "p", scale: float = 2.0, seed: int = 5, **params) -> SamplingParams:
    """A row of a guided pair as the adapter tags it (role "cond" is the pair's main row)."""
    tag = {"option": "guidance", "pair": pair, "role": {"cond": "main", "uncond": "extra"}[role], "scale": scale, "rescale": None, "seed": seed}
    return SamplingParams(extra_args={PAIR_KEY: tag}, **params)


class RunnerStates:
    """What Model Runner V2 keeps per request slot and shows a processor (LogitsProcRequestState)."""

    def __init__(self) -> None:
        self.prompt_len = SimpleNamespace(np=np.zeros(SLOTS, dtype=np.int32))
        self.prefill_len = SimpleNamespace(np=np.zeros(SLOTS, dtype=np.int32))
        self.all_token_ids = SimpleNamespace(gpu=torch.zeros(SLOTS, MAX_LEN, dtype=torch.int32))

    def admit(self, slot: int, prompt: list[int], outputs: list[int] = ()) -> None:
        """A request in `slot` with this prompt, having produced `outputs` so far."""
        self.prompt_len.np[slot] = len(prompt)
        self.prefill_len.np[slot] = len(prompt)
        ids = list(prompt) + list(outputs)
        self.all_token_ids.gpu[slot, : len(ids)] = torch.tensor(ids, dtype=torch.int32)


def context(slots: list[int], seq_lens: list[int]) -> LogitsContext:
    n = len(slots)
    return LogitsContext(
        expanded_idx_mapping=torch.tensor(slots),
        idx_mapping=torch.tensor(slots),
        idx_mapping_np=np.array(slots, dtype=np.int32),
        expanded_local_pos=torch.zeros(n, dtype=torch.int32),
        input_ids=torch.zeros(n, dtype=torch.int64),
        pos=torch.tensor(seq_lens) - 1,
        seq_lens_upper_bound_np=np.array(seq_lens, dtype=np.int32),
    )


def v2(states: RunnerStates, requests: dict[int, SamplingParams]) -> PairedGuidanceV2:
    proc = PairedGuidanceV2(None, states)
    assert isinstance(proc, V2Interface)
    for slot, params in requests.items():
        PairedGuidanceV2.validate_params(params)
        assert proc.add_request(slot, params) == (PAIR_KEY in (params.extra_args or {}))
    return proc


def logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed))


def forced(row: torch.Tensor) -> int | None:
    """The one token a row was forced to, or None when it was not forced."""
    finite = torch.isfinite(row).nonzero().flatten()
    return int(finite[0]) if finite.numel() == 1 and float(row[finite[0]]) == 0.0 else None


def test_v2_guides_a_greedy_pair_and_leaves_plain_rows_alone():
    states = RunnerStates()
    states.admit(3, [1, 2, 3, 4], [7, 8])  # cond: 4 prompt tokens, 2 out
    states.admit(6, [9], [7, 8])  # uncond: the last prompt token, the same 2 out
    states.admit(1, [5, 5, 5])  # a plain request
    proc = v2(states, {3: tagged("cond", temperature=0.0), 6: tagged("uncond", temperature=0.0), 1: SamplingParams()})
    # batch order differs from slot order, as vLLM's reordering does
    x = logits(3)
    before = x.clone()
    out = proc.apply(x, context([6, 1, 3], [3, 3, 6]))
    want = guide(before[2], before[0], 2.0, None)
    assert torch.equal(out[2], want) and torch.equal(out[0], want)
    assert torch.equal(out[1], before[1]), "a plain row is untouched"


def test_v2_draws_a_sampled_pair_token_once_for_both_rows_reproducibly():
    def run(seed: int) -> list[int]:
        states = RunnerStates()
        states.admit(0, [1, 2, 3])
        states.admit(1, [3])
        params = {"temperature": 0.8, "top_p": 0.9}
        proc = v2(states, {0: tagged("cond", seed=seed, **params), 1: tagged("uncond", seed=seed, **params)})
        tokens = []
        for step in range(6):  # the pair's generator advances one draw a step
            out = proc.apply(logits(2, step), context([0, 1], [3 + step, 1 + step]))
            a, b = forced(out[0]), forced(out[1])
            assert a is not None and a == b, "both rows take the one drawn token"
            tokens.append(a)
        return tokens

    assert run(5) == run(5)
    assert len({tuple(run(s)) for s in range(6)}) > 1, "other seeds draw other tokens"


def test_v2_top_k_1_draws_the_guided_argmax():
    states = RunnerStates()
    states.admit(0, [1, 2])
    states.admit(1, [2])
    proc = v2(states, {0: tagged("cond", temperature=1.0, top_k=1), 1: tagged("uncond", temperature=1.0, top_k=1)})
    x = logits(2)
    want = int(guide(x[0], x[1], 2.0, None).argmax())
    out = proc.apply(x.clone(), context([0, 1], [2, 1]))
    assert forced(out[0]) == forced(out[1]) == want


def test_v2_forces_a_row_whose_partner_is_mid_prefill_or_absent():
    states = RunnerStates()
    states.admit(0, [1, 2, 3])
    states.admit(1, [4, 5, 6, 7, 8, 9])
    proc = v2(states, {0: tagged("cond"), 1: tagged("uncond")})
    # the uncond row has 4 of its 6 prompt tokens (chunked prefill): its token will be discarded
    out = proc.apply(logits(2), context([0, 1], [3, 4]))
    assert forced(out[0]) == 0, "the cond row is forced (the uncond branch has no token at index 0)"
    assert forced(out[1]) is None, "a row mid-prefill is left alone"
    out = proc.apply(logits(1), context([0], [4]))  # the uncond row not scheduled at all
    assert forced(out[0]) == 0


def test_v2_forces_a_row_unlike_its_partners_token_at_the_same_index():
    states = RunnerStates()
    states.admit(0, [1, 2, 3], [11, 12])  # cond: 2 out
    states.admit(1, [3], [11, 12, 13])  # uncond: 3 out (ran a step alone)
    proc = v2(states, {0: tagged("cond"), 1: tagged("uncond")})
    out = proc.apply(logits(2), context([0, 1], [5, 4]))
    assert forced(out[0]) == 14, "unlike the uncond branch's index-2 token (13)"
    assert forced(out[1]) == 0, "the cond branch has no index-3 token yet"


def test_v2_slot_reuse_forgets_the_previous_request():
    states = RunnerStates()
    states.admit(0, [1, 2])
    states.admit(1, [2])
    proc = v2(states, {0: tagged("cond"), 1: tagged("uncond")})
    assert proc.add_request(1, SamplingParams()) is False  # slot 1 now holds a plain request
    x = logits(2)
    out = proc.apply(x.clone(), context([0, 1], [2, 1]))
    assert forced(out[0]) == 0 and torch.equal(out[1], x[1])


def test_v2_refuses_several_rows_per_request():
    states = RunnerStates()
    states.admit(0, [1, 2])
    proc = v2(states, {0: tagged("cond")})
    with pytest.raises(RuntimeError, match="one logits row per request"):
        proc.apply(logits(3), context([0], [2]))


def test_bad_tags_are_refused_at_admission():
    bad = SamplingParams(extra_args={PAIR_KEY: {"option": "guidance", "pair": "p", "role": "both", "seed": 1}})
    for cls in (PairedGuidance, PairedGuidanceV2):
        with pytest.raises(ValueError, match=PAIR_KEY):
            cls.validate_params(bad)
        cls.validate_params(SamplingParams())


def test_v1_forces_a_row_unlike_its_partners_token_at_the_same_index():
    proc = PairedGuidance(None, torch.device("cpu"), False)
    cond_out, uncond_out = [11, 12], [11, 12, 13]
    proc.update_state(
        BatchUpdate(2, [], [(0, tagged("cond", temperature=0.0), [1, 2, 3], cond_out), (1, tagged("uncond", temperature=0.0), [3], uncond_out)], [])
    )
    out = proc.apply(logits(2))
    assert forced(out[0]) == 14 and forced(out[1]) == 0
    uncond_out.pop()  # both at 2 tokens: guided
    x = logits(2, 1)
    out = proc.apply(x.clone())
    assert torch.equal(out[0], guide(x[0], x[1], 2.0, None)) and torch.equal(out[0], out[1])


@pytest.mark.parametrize("v2_runner", [True, False])
def test_the_adapter_hands_vllm_the_processor_for_its_runner_and_no_limits(monkeypatch, tmp_path, v2_runner):
    """Model Runner V2 is vLLM's choice on CUDA (forced here through vLLM's own switch); plain
    traffic keeps vLLM's CUDA graphs, chunked prefill and token budget."""
    from freelunch.backends.vllm_engine import engine_config, paired_rows
    from tiny_models import build_tiny_model

    build_tiny_model(tmp_path, "llama", seed=3, num_attention_heads=2, num_key_value_heads=1)
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1" if v2_runner else "0")
    if v2_runner:  # vLLM's CPU build has no Triton backend; its check is all that stands in the way here
        monkeypatch.setattr("vllm.config.vllm.HAS_TRITON", True)
    vllm_config = engine_config(EngineConfig(model=str(tmp_path), dtype="float32"), str(tmp_path), "tiny", 256, paired_rows())
    assert vllm_config.use_v2_model_runner is v2_runner
    assert vllm_config.model_config.logits_processors == [PairedGuidanceV2 if v2_runner else PairedGuidance]
    assert GUIDANCE_PAIRS.processor(v2_runner) is vllm_config.model_config.logits_processors[0]
    assert vllm_config.model_config.enforce_eager is False
    assert vllm_config.scheduler_config.enable_chunked_prefill is True
