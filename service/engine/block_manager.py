"""Fixed-size KV blocks handed out from a budget; a sequence's blocks form its block table."""

from __future__ import annotations

from collections import deque

import torch

from freelunch.engine.request import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._owner: dict[int, int] = {}  # block -> seq_id, to catch double frees and leaks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def extra_blocks(self, seq: Sequence, total_tokens: int) -> int:
        """Blocks `seq` still needs so that `total_tokens` of it fit."""
        return max(0, self.blocks_for(total_tokens) - len(seq.block_table))

    def allocate(self, seq: Sequence, total_tokens: int) -> None:
        """Grow `seq`'s table to hold `total_tokens`; raises if the budget cannot."""
        need = self.extra_blocks(seq, total_tokens)
        if need > len(self._free):
            raise MemoryError(f"need {need} KV blocks, {len(self._free)} free")
        for _ in range(need):
            b = self._free.popleft()
            self._owner[b] = seq.seq_id
            seq.block_table.append(b)

    def truncate(self, seq: Sequence, total_tokens: int) -> None:
        """Give back blocks beyond what `total_tokens` need (e.g. rejected draft tokens)."""
        keep = self.blocks_for(total_tokens)
        while len(seq.block_table) > keep:
            self._release(seq.block_table.pop(), seq)

    def free(self, seq: Sequence) -> None:
        while seq.block_table:
            self._release(seq.block_table.pop(), seq)

    def _release(self, block: int, seq: Sequence) -> None:
        # check before forgetting the owner, so that a refused release changes nothing
        if self._owner.get(block) != seq.seq_id:
            raise RuntimeError(f"block {block} released by a sequence that does not own it")
        del self._owner[block]
        self._free.append(block)

    def slots(self, seq: Sequence, start: int, end: int) -> torch.Tensor:
        """Cache slot ids of token offsets [start, end) of `seq`."""
        offsets = torch.arange(start, end)
        table = torch.tensor(seq.block_table, dtype=torch.long)
        return table[offsets // self.block_size] * self.block_size + offsets % self.block_size

    def check_no_leaks(self) -> None:
        if len(self._free) != self.num_blocks or self._owner:
            raise AssertionError(f"{self.num_blocks - len(self._free)} KV blocks still allocated")
