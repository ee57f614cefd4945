"""Token Recycling's default tree: chosen from what verifying T tokens costs on this hardware and
from how often the model's next token is each candidate of the adjacency table.

A tree's node is accepted when every rank on its path is the model's choice, so a tree of s
nodes yields 1 + sum over its nodes of P(node accepted) tokens per step (the bonus token plus
the expected accepted path), and costs one forward over s + 1 tokens. On a GPU that forward
costs about the same for 1 or 81 tokens, so the paper's full tree wins; on a few CPU cores it
grows with T, so small trees win. The engine measures the cost once per model (`VerifyCost`).
P(node) is the product over its path of P(rank r at depth d): a fixed prior at first, then
learned from every verify step of the table's requests (`RankAcceptance`), so the tree follows
the model and the traffic. Nodes are always taken from the paper's "2.2.2" template, most
probable first.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from freelunch.methods.tree_templates import TEMPLATE_222, most_probable_first, parents_first, rank_prior

MAX_DEPTH = max(len(p) for p in TEMPLATE_222)
# Pseudo-counts pulling a depth's estimate towards all depths' (and those towards the prior):
# a few dozen observations move it, one step does not.
_PSEUDO_COUNT = 16.0
# A tree must promise this many times plain decoding's tokens per second: the verify costs were
# timed once, at start-up, and a real step's differ by a few percent (on the default GGUF and 2
# AVX-512 cores, a 1-node tree that promised 1.04x decoded first-sight chats at 0.91x before this rule).
_MIN_GAIN = 1.05
# Tree sizes whose expected tokens per second are within this factor of the best one count as tied.
_NEAR_BEST = 0.98
# Counts halve when depth 1 has seen this many steps: the estimate follows changes in traffic.
_MEMORY = 2048.0


@dataclass(frozen=True, slots=True)
class VerifyCost:
    """Seconds per forward of T tokens: the measurements made non-decreasing in T (pooling
    adjacent violators, so one noisy timing is averaged with its neighbours, not followed), and
    interpolated linearly between them. On CPUs the curve bends: nearly flat while the weights'
    pass over memory dominates, then steep once the arithmetic does."""

    tokens: tuple[int, ...]
    seconds: tuple[float, ...]

    @classmethod
    def fit(cls, cost_s: dict[int, float]) -> VerifyCost:
        blocks: list[list[float]] = []  # [sum of seconds, count] per pooled run of sizes
        for t in sorted(cost_s):
            blocks.append([cost_s[t], 1.0])
            while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
                total, count = blocks.pop()
                blocks[-1][0] += total
                blocks[-1][1] += count
        seconds = [total / count for total, count in blocks for _ in range(int(count))]
        return cls(tuple(sorted(cost_s)), tuple(seconds))

    def max_nodes(self, ratio: float, largest: int = len(TEMPLATE_222)) -> int:
        """The most draft nodes whose verify forward costs at most `ratio` x a one-token forward."""
        return max((n for n in range(1, largest + 1) if self(n + 1) <= ratio * self(1)), default=1)

    def __call__(self, tokens: int) -> float:
        ts, ys = self.tokens, self.seconds
        if len(ts) == 1:
            return ys[0]
        i = min(max(bisect.bisect_left(ts, tokens), 1), len(ts) - 1)  # the segment [i - 1, i] holding T
        return ys[i - 1] + (ys[i] - ys[i - 1]) * (tokens - ts[i - 1]) / (ts[i] - ts[i - 1])


class RankAcceptance:
    """Counts, by depth along accepted paths, of the rank the model's next token had among the
    table's k candidates (column k: not among them)."""

    def __init__(self, k: int) -> None:
        self.k = k
        # Python lists: a verify step adds a few counts, and a tensor element update costs ~10 us
        self._counts = [[0.0] * (k + 1) for _ in range(MAX_DEPTH)]
        self._depth1 = 0.0  # the sum of the first row

    @property
    def counts(self) -> torch.Tensor:
        """[MAX_DEPTH, k + 1] float64."""
        return torch.tensor(self._counts, dtype=torch.float64)

    def observe(self, ranks: list[int]) -> None:
        """ranks[d]: the rank at depth d + 1 (k = a miss); the last one is where the path stopped."""
        for depth, rank in enumerate(ranks[:MAX_DEPTH]):
            self._counts[depth][rank] += 1
        self._depth1 += 1 if ranks else 0
        if self._depth1 >= _MEMORY:
            self._counts = [[c * 0.5 for c in row] for row in self._counts]
            self._depth1 *= 0.5

    def probabilities(self) -> torch.Tensor:
        """[MAX_DEPTH, k]: P(the next token is candidate r | the path reached depth d - 1)."""
        prior = torch.tensor([*rank_prior(self.k), 0.0], dtype=torch.float64)
        prior[-1] = max(0.0, 1.0 - float(prior.sum()))
        counts = self.counts
        pooled = (counts.sum(0) + _PSEUDO_COUNT * prior) / (float(counts.sum()) + _PSEUDO_COUNT)
        by_depth = (counts + _PSEUDO_COUNT * pooled) / (counts.sum(1, keepdim=True) + _PSEUDO_COUNT)
        return by_depth[:, : self.k]


def best_tree(cost: VerifyCost, probabilities: torch.Tensor, step_work_s: float = 0.0) -> list[tuple[int, ...]]:
    """The 2.2.2 nodes (parents first) that give the most expected tokens per second, given
    P(rank | depth) ([MAX_DEPTH, k]) and the seconds a verify step spends outside its forward;
    none where decoding plainly gives nearly as many (within _MIN_GAIN)."""
    k = probabilities.shape[1]

    def score(path: tuple[int, ...]) -> float:
        return float(torch.prod(probabilities[torch.arange(len(path)), torch.tensor(path)]))

    ranked = most_probable_first([p for p in TEMPLATE_222 if max(p) < k], score)
    rates, expected = [], 1.0
    for size, path in enumerate(ranked, start=1):
        expected += score(path)
        rates.append(expected / (cost(size + 1) + step_work_s))
    # Plain decoding is a candidate too: where verifying even one node costs more than it yields
    # (compute-bound kernels: the default GGUF's int4 layers on 2 AVX2 cores verify 2 tokens at
    # 1.5x one), no tree is the fastest.
    if _MIN_GAIN / cost(1) >= max(rates):
        return []
    # The smallest tree within _NEAR_BEST of the best rate: the timings are noisy by a few
    # percent, and where sizes tie within that, a smaller tree leaves more of a batch's forward
    # and of the KV cache to other requests.
    best_size = next(size for size, rate in enumerate(rates, start=1) if rate >= _NEAR_BEST * max(rates))
    return parents_first(ranked[:best_size])
