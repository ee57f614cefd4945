"""Reference for the grouped MoE kernel: each token's weighted sum of its experts' SwiGLU MLPs.

    out[t] = sum_j weights[t, j] * down[e] @ (silu(gate[e] @ x[t]) * (up[e] @ x[t])),  e = experts[t, j]

with the experts' weights stacked (gate_up [E, 2I, H], gate first, as models/llama.py's MLP holds
them; down [E, H, I]) and -1 marking a slot a
token does not use (tokens routed to fewer experts, e.g. a method's weak row). This is what
`models/moe.py` computes with one matmul per expert; `moe_triton.grouped_expert_mlp` must match it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grouped_expert_mlp_ref(
    x: torch.Tensor,
    experts: torch.Tensor,
    weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
) -> torch.Tensor:
    """x [T, H]; experts [T, K] long (-1 = unused); weights [T, K] float32 -> [T, H] in x's dtype."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    inter = w_down.shape[2]
    for e in range(w_down.shape[0]):
        tokens, slots = (experts == e).nonzero(as_tuple=True)
        if tokens.numel() == 0:
            continue
        h = x[tokens]
        gate, up = F.linear(h, w_gate_up[e]).split(inter, dim=-1)
        y = F.linear(F.silu(gate) * up, w_down[e])
        out.index_add_(0, tokens, y.float() * weights[tokens, slots, None])
    return out.to(x.dtype)
