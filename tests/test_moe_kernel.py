"""The Triton grouped MoE kernels against their reference, and the reference against the engine's
per-expert loop (models/moe.py). On CPU the kernels run in Triton's interpreter."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before any triton import: kernels become interpreted

import pytest
import torch

pytest.importorskip("triton")

from freelunch.kernels.moe_ref import grouped_expert_mlp_ref
from freelunch.kernels.moe_triton import INTERPRETED, align_slots, grouped_expert_mlp
from freelunch.models.expert_routing import ExpertRouting, route

TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 2e-2), torch.bfloat16: (6e-2, 6e-2)}
E, HIDDEN, INTER = 4, 64, 48  # INTER not a multiple of the 32-wide tiles: the masks are exercised


def weights(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mk = lambda *shape: (torch.randn(*shape, generator=g) * 0.2).to(dtype)
    return mk(E, 2 * INTER, HIDDEN), mk(E, HIDDEN, INTER)


def routing_case(tokens: int, top_k: int, seed: int, weak_every: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Router top-k (expert 3 never chosen, so one expert has no tokens); every `weak_every`-th
    token routed to one expert only (its other slots -1), as SCMoE's weak rows."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, E, generator=g)
    logits[:, 3] = -1e4
    rank = torch.tensor([2 if weak_every and t % weak_every == 0 else 0 for t in range(tokens)])
    routing = ExpertRouting(rank, torch.zeros_like(rank), int(rank.max()), 0) if weak_every else None
    return route(logits, top_k, True, routing)


@pytest.mark.parametrize("tokens,top_k,weak_every", [(1, 2, 0), (7, 2, 3), (33, 2, 0), (20, 1, 0), (9, 3, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_matches_reference(tokens, top_k, weak_every, dtype):
    assert INTERPRETED or torch.cuda.is_available()
    w_gate_up, w_down = weights(dtype)
    experts, w = routing_case(tokens, top_k, seed=tokens, weak_every=weak_every)
    x = (torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(1))).to(dtype)
    got = grouped_expert_mlp(x, experts, w, w_gate_up, w_down)
    want = grouped_expert_mlp_ref(x, experts, w, w_gate_up, w_down)
    atol, rtol = TOLERANCE[dtype]
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)


def test_slot_alignment():
    experts = torch.tensor([[2, 0], [0, -1], [2, 1]])
    slots, block_expert = align_slots(experts, 4, block_m=2)
    s = 6  # the sentinel: T * K
    # expert 0: slots 1, 2 | expert 1: slot 5 (+pad) | expert 2: slots 0, 4 | expert 3: none; then
    # blocks of sentinels up to the capacity the shapes allow (6 slots + 4 experts' padding: 10)
    assert slots.tolist() == [1, 2, 5, s, 0, 4, s, s, s, s]
    assert block_expert.tolist()[:3] == [0, 1, 2] and len(block_expert) == 5


def test_reference_matches_the_engine_moe_block():
    """The reference is the same maths as the engine's per-expert loop (models/moe.py)."""
    from freelunch.models.moe import SparseMoeBlock
    from freelunch.models.moe_config import MoeConfig

    torch.manual_seed(0)
    moe = MoeConfig(E, 2, INTER, normalize_top_k=True, shared_expert_intermediate_size=0, sparse_layers=(True,))
    block = SparseMoeBlock(HIDDEN, moe).eval()
    x = torch.randn(11, HIDDEN)
    experts, w = route(block.gate(x), 2, True)
    stack = lambda name: torch.stack([getattr(e, name).weight for e in block.experts])
    with torch.no_grad():
        want = block._run_experts(x, experts, w)
        got = grouped_expert_mlp_ref(x, experts, w, stack("gate_up_proj"), stack("down_proj"))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
