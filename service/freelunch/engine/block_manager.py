"""Fixed-size KV blocks handed out from a budget; a sequence's blocks form its block table.

The cache may be split at a layer S into two pools of blocks: a block of the lower pool holds
`block_size` tokens of layers < S, one of the upper pool the same of layers >= S, and each
sequence has a table in each. A sequence pruned at prefill (FastV at layer K <= S) keeps every
token below S but only the kept ones from S on, so the upper blocks it does not need serve other
requests: different KV lengths per layer, without a table per layer. Without a split there is
one pool and one table, as in a plain paged cache.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from freelunch.engine.request import Sequence


@dataclass(frozen=True, slots=True)
class BlockNeed:
    """Blocks wanted from each pool."""

    lower: int = 0
    upper: int = 0

    def __add__(self, other: BlockNeed) -> BlockNeed:
        return BlockNeed(self.lower + other.lower, self.upper + other.upper)


class _Pool:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.free: deque[int] = deque(range(num_blocks))
        self.owner: dict[int, int] = {}  # block -> seq_id, to catch double frees and leaks

    def take(self, seq: Sequence, table: list[int], count: int) -> None:
        for _ in range(count):
            block = self.free.popleft()
            self.owner[block] = seq.seq_id
            table.append(block)

    def give_back(self, seq: Sequence, table: list[int], keep: int) -> None:
        while len(table) > keep:
            block = table[-1]
            # check before forgetting the owner, so that a refused release changes nothing
            if self.owner.get(block) != seq.seq_id:
                raise RuntimeError(f"block {block} released by a sequence that does not own it")
            table.pop()
            del self.owner[block]
            self.free.append(block)


class BlockManager:
    def __init__(
        self, num_blocks: int, block_size: int, upper_blocks: int = 0, layer_split: tuple[int, int] | None = None
    ) -> None:
        """`num_blocks` in the lower (or only) pool; with `layer_split` = (S, num_layers),
        `upper_blocks` more for the layers from S on."""
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        if (layer_split is None) != (upper_blocks == 0) or upper_blocks < 0:
            raise ValueError("a split cache needs upper blocks, and only a split cache has them")
        self.block_size = block_size
        self.lower = _Pool(num_blocks)
        self.upper = _Pool(upper_blocks) if layer_split is not None else None
        self.split, self.num_layers = layer_split if layer_split is not None else (None, None)

    @property
    def num_blocks(self) -> int:
        return self.lower.num_blocks

    @property
    def num_free(self) -> int:
        """Free blocks of the lower (or only) pool."""
        return len(self.lower.free)

    @property
    def capacity_tokens(self) -> int:
        """Tokens of an unpruned sequence the whole cache holds."""
        blocks = self.lower.num_blocks if self.upper is None else min(self.lower.num_blocks, self.upper.num_blocks)
        return blocks * self.block_size

    @property
    def usage(self) -> float:
        """Fraction of the cache's bytes held."""
        if self.upper is None:
            return 1.0 - len(self.lower.free) / self.lower.num_blocks
        lower_w, upper_w = self.split, self.num_layers - self.split  # layers per block of each pool
        used = (self.lower.num_blocks - len(self.lower.free)) * lower_w + (self.upper.num_blocks - len(self.upper.free)) * upper_w
        return used / (self.lower.num_blocks * lower_w + self.upper.num_blocks * upper_w)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def need(self, seq: Sequence, total_tokens: int) -> BlockNeed:
        """Blocks `seq` still needs so that `total_tokens` of it fit."""
        lower = max(0, self.blocks_for(total_tokens) - len(seq.block_table))
        if self.upper is None:
            return BlockNeed(lower)
        return BlockNeed(lower, max(0, self.blocks_for(seq.upper_count(total_tokens)) - len(seq.upper_table)))

    def holding(self, seq: Sequence, total_tokens: int) -> BlockNeed:
        """Blocks `seq` holds once `total_tokens` of it fit."""
        upper = self.blocks_for(seq.upper_count(total_tokens)) if self.upper is not None else 0
        return BlockNeed(self.blocks_for(total_tokens), upper)

    def has_room(self, need: BlockNeed) -> bool:
        return need.lower <= len(self.lower.free) and (self.upper is None or need.upper <= len(self.upper.free))

    def could_ever_hold(self, need: BlockNeed) -> bool:
        """Whether `need` fits in the whole cache, all of it free."""
        return need.lower <= self.lower.num_blocks and (self.upper is None or need.upper <= self.upper.num_blocks)

    def allocate(self, seq: Sequence, total_tokens: int) -> None:
        """Grow `seq`'s tables to hold `total_tokens`; raises if the budget cannot."""
        need = self.need(seq, total_tokens)
        if not self.has_room(need):
            raise MemoryError(f"need {need} KV blocks; free: {len(self.lower.free)} lower, {self._upper_free()} upper")
        self.lower.take(seq, seq.block_table, need.lower)
        if self.upper is not None:
            self.upper.take(seq, seq.upper_table, need.upper)

    def fit_upper(self, seq: Sequence, total_tokens: int) -> None:
        """Give back upper blocks beyond what `total_tokens` need (after a prune packed the table)."""
        if self.upper is not None:
            self.upper.give_back(seq, seq.upper_table, self.blocks_for(seq.upper_count(total_tokens)))

    def truncate(self, seq: Sequence, total_tokens: int) -> None:
        """Give back blocks beyond what `total_tokens` need (e.g. rejected draft tokens)."""
        self.lower.give_back(seq, seq.block_table, self.blocks_for(total_tokens))
        self.fit_upper(seq, total_tokens)

    def free(self, seq: Sequence) -> None:
        self.lower.give_back(seq, seq.block_table, 0)
        if self.upper is not None:
            self.upper.give_back(seq, seq.upper_table, 0)

    def slots(self, seq: Sequence, start: int, end: int) -> torch.Tensor:
        """Cache slot ids of token offsets [start, end) of `seq` in the lower (or only) pool."""
        return self.slots_at(seq, torch.arange(start, end))

    def slots_at(self, seq: Sequence, offsets: torch.Tensor) -> torch.Tensor:
        """Cache slot ids of the token offsets `offsets` of `seq` in the lower (or only) pool."""
        return self._slots(seq.block_table, offsets)

    def upper_slots(self, seq: Sequence, index: torch.Tensor) -> torch.Tensor:
        """Slot ids of the upper table's entries at `index` (positions in `seq.upper_order`)."""
        return self._slots(seq.upper_table, index)

    def check_no_leaks(self) -> None:
        if len(self.lower.free) != self.lower.num_blocks or self.lower.owner:
            raise AssertionError(f"{self.lower.num_blocks - len(self.lower.free)} KV blocks still allocated")
        if self.upper is not None and (len(self.upper.free) != self.upper.num_blocks or self.upper.owner):
            raise AssertionError(f"{self.upper.num_blocks - len(self.upper.free)} upper KV blocks still allocated")

    def _upper_free(self) -> int:
        return len(self.upper.free) if self.upper is not None else 0

    def _slots(self, table: list[int], offsets: torch.Tensor) -> torch.Tensor:
        blocks = torch.tensor(table, dtype=torch.long)
        return blocks[offsets // self.block_size] * self.block_size + offsets % self.block_size
