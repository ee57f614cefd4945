"""Static draft-tree templates for Token Recycling.

A template is a list of nodes, each the path of child ranks from the root: `[0, 2]` is the
third-ranked candidate after the top candidate of the root. Nodes are ordered so a parent
always comes before its children (breadth-first), which lets a tree be filled in one pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# "2.2.2" from the reference code (Luo et al. 2024): 80 nodes + root, depth 6,
# nodes per depth 8/21/25/15/8/3.
TEMPLATE_222: list[tuple[int, ...]] = [
    (0,), (1,), (2,), (3,), (4,), (5,), (6,), (7,),
    (0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (0, 5), (0, 6), (0, 7), (1, 0), (1, 1), (1, 2), (1, 3),
    (2, 0), (2, 1), (2, 2), (3, 0), (3, 1), (4, 0), (5, 0), (6, 0), (7, 0),
    (0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 0, 3), (0, 0, 4), (0, 0, 5), (0, 0, 6), (0, 0, 7), (0, 1, 0),
    (0, 1, 1), (0, 1, 2), (0, 2, 0), (0, 2, 1), (0, 3, 0), (0, 4, 0), (0, 5, 0), (0, 6, 0), (0, 7, 0),
    (1, 0, 0), (1, 0, 1), (1, 1, 0), (2, 0, 0), (3, 0, 0), (4, 0, 0), (5, 0, 0),
    (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 0, 2), (0, 0, 0, 3), (0, 0, 0, 4), (0, 0, 1, 0), (0, 0, 1, 1),
    (0, 0, 2, 0), (0, 0, 3, 0), (0, 0, 4, 0), (0, 1, 0, 0), (0, 2, 0, 0), (1, 0, 0, 0), (2, 0, 0, 0),
    (3, 0, 0, 0),
    (0, 0, 0, 0, 0), (0, 0, 0, 0, 1), (0, 0, 0, 0, 2), (0, 0, 0, 1, 0), (0, 0, 0, 2, 0), (0, 0, 1, 0, 0),
    (0, 1, 0, 0, 0), (1, 0, 0, 0, 0),
    (0, 0, 0, 0, 0, 0), (0, 0, 0, 0, 0, 1), (0, 0, 0, 1, 0, 0),
]  # fmt: skip

# Acceptance rate of the candidate at each rank: the prior for ranking nodes before any
# acceptance has been observed (a node's score is the product over its path).
_RANK_PRIOR = (0.55, 0.15, 0.07, 0.04, 0.03, 0.02, 0.015, 0.01)


def rank_prior(k: int) -> tuple[float, ...]:
    """The prior for ranks 0..k-1 (ranks past the template's get a small share)."""
    return (_RANK_PRIOR + (0.005,) * k)[:k]


def acceptance_prior(path: tuple[int, ...]) -> float:
    """Prior probability that a node is on the accepted path (the product over its ranks)."""
    s = 1.0
    for r in path:
        s *= _RANK_PRIOR[r]
    return s


def most_probable_first(nodes: list[tuple[int, ...]], score: Callable[[tuple[int, ...]], float]) -> list[tuple[int, ...]]:
    """Nodes by descending score; a child never scores above its parent, and on ties the
    shallower node comes first, so every prefix of the result holds its nodes' parents."""
    index = {p: i for i, p in enumerate(nodes)}
    return sorted(nodes, key=lambda p: (-score(p), len(p), index[p]))


def parents_first(nodes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """Nodes in template order (breadth-first), as a DraftTree wants them."""
    return sorted(nodes, key=lambda p: (len(p), TEMPLATE_222.index(p)))


def sub_template(size: int) -> list[tuple[int, ...]]:
    """The `size` most promising nodes of 2.2.2 under the prior, parents before children."""
    if not 1 <= size <= len(TEMPLATE_222):
        raise ValueError(f"tree size must be in [1, {len(TEMPLATE_222)}]")
    return parents_first(most_probable_first(TEMPLATE_222, acceptance_prior)[:size])


@dataclass(frozen=True, slots=True)
class DraftTree:
    """Index form of a template; node 0 is the root (the last accepted token)."""

    parent: torch.Tensor  # [N+1] parent node index (-1 for the root)
    rank: torch.Tensor  # [N+1] child rank within the parent (0 for the root)
    depth: torch.Tensor  # [N+1]
    ancestor_mask: torch.Tensor  # [N+1, N+1] bool: node i may see node j (j is i or an ancestor)
    children: list[list[int]]  # node -> child node indices, by rank
    levels: list[torch.Tensor]  # node indices at depth 1, 2, ...
    max_rank: int

    @property
    def size(self) -> int:
        return int(self.parent.numel())

    @classmethod
    def from_template(cls, template: list[tuple[int, ...]]) -> "DraftTree":
        index = {(): 0}
        parent, rank = [-1], [0]
        for path in template:
            if path[:-1] not in index:
                raise ValueError(f"tree node {list(path)} comes before its parent")
            if path in index:
                raise ValueError(f"tree node {list(path)} appears twice")
            index[path] = len(parent)
            parent.append(index[path[:-1]])
            rank.append(path[-1])
        return cls.from_parents(parent, rank)

    @classmethod
    def from_parents(cls, parent: list[int], rank: list[int]) -> "DraftTree":
        """A tree from each node's parent index (parents before children; -1 for the root, node 0)."""
        n = len(parent)
        depth = [0] * n
        for i in range(1, n):
            depth[i] = depth[parent[i]] + 1
        mask = torch.zeros(n, n, dtype=torch.bool)
        children: list[list[int]] = [[] for _ in range(n)]
        for i in range(n):
            j = i
            while j >= 0:
                mask[i, j] = True
                j = parent[j]
            if parent[i] >= 0:
                children[parent[i]].append(i)
        for c in children:
            c.sort(key=lambda i: rank[i])
        depth_t = torch.tensor(depth)
        levels = [(depth_t == d).nonzero().flatten() for d in range(1, int(depth_t.max()) + 1)]
        return cls(torch.tensor(parent), torch.tensor(rank), depth_t, mask, children, levels, max(rank) + 1)

    @classmethod
    def chain(cls, length: int) -> "DraftTree":
        """A root and `length` nodes, each the child of the one before."""
        return cls.from_parents([-1, *range(length)], [0] * (length + 1))

    def subtree(self, keep: list[int]) -> "DraftTree":
        """The nodes `keep` (ascending, the root and each kept node's parent among them), renumbered."""
        new = {old: i for i, old in enumerate(keep)}
        parents = self.parent.tolist()
        ranks = self.rank.tolist()
        return DraftTree.from_parents([new[parents[k]] if k else -1 for k in keep], [ranks[k] for k in keep])
