"""Token Recycling's default tree size, chosen from what verifying T tokens costs on this hardware.

A tree of s nodes yields 1 + sum over its nodes of P(node accepted) tokens per step (the bonus
token plus the expected accepted path) and costs one forward over s + 1 tokens. On a GPU that
forward costs about the same for 1 or 81 tokens, so the paper's full tree wins; on a few CPU
cores it grows with T, so small trees win. The engine measures the cost once per model, fits
a line (robust to timing noise), and takes the size with the most tokens per second.
"""

from __future__ import annotations

import torch

from freelunch.methods.tree_templates import TEMPLATE_222, acceptance_prior, sub_template


def expected_tokens(size: int) -> float:
    """Tokens per step a `size`-node tree yields under the rank prior (the bonus token included)."""
    return 1.0 + sum(acceptance_prior(path) for path in sub_template(size))


def best_tree_size(cost_s: dict[int, float]) -> int:
    """Node count (1..80) with the most expected tokens per second, given seconds per forward of T tokens."""
    ts = torch.tensor(sorted(cost_s), dtype=torch.float64)
    ys = torch.tensor([cost_s[int(t)] for t in ts], dtype=torch.float64)
    slope = float(((ts - ts.mean()) * (ys - ys.mean())).sum() / ((ts - ts.mean()) ** 2).sum())
    slope = max(slope, 0.0)  # noise can tilt a flat (GPU) curve downwards
    base = max(float(ys.mean()) - slope * float(ts.mean()), 1e-9)
    sizes = range(1, len(TEMPLATE_222) + 1)
    return max(sizes, key=lambda s: expected_tokens(s) / (base + slope * (s + 1)))
