"""Fixed-size KV blocks handed out from a budget; a sequence's blocks form its block table.

The cache may be split at a layer S into two pools of blocks: a block of the lower pool holds
`block_size` tokens of layers < S, one of the upper pool the same of layers >= S, and each
sequence has a table in each. A sequence whose tokens are dropped at prefill (at layer K <= S) keeps every
token below S but only the kept ones from S on, so the upper blocks it does not need serve other
requests: different KV lengths per layer, without a table per layer. Without a split there is
one pool and one table, as in a plain paged cache.

Prefix caching (on unless `cache_blocks` is 0). A full block of committed tokens is named by a
hash chained over its tokens, every token before it, and its row's cache key (what else changes
its KV: the tenant's salt, images, a routing override; a row without a key is never cached).
Blocks are reference-counted: a row that starts with a cached chain takes its blocks (one block
may serve many rows) and computes only the rest. A block no row holds keeps its content until
its memory is needed: free blocks are handed out first (the lowest-numbered first, so that the
cache's memory is touched only as far as the peak use reaches), then cached ones, least recently
used first. A cached block is never handed out while a row holds it, and only a full block of
committed tokens is ever shared, so a shared block is never written again.
"""

from __future__ import annotations

import hashlib
import heapq
from array import array
from collections import OrderedDict
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


@dataclass(slots=True)
class CacheStats:
    """Prefix-cache counters (vLLM's meanings): prompt tokens looked up and found, blocks evicted."""

    queries: int = 0
    hits: int = 0
    evictions: int = 0


class _Pool:
    def __init__(self, num_blocks: int, cache_blocks: int | None) -> None:
        self.num_blocks = num_blocks
        # held by no row, no content kept: a min-heap, so that the lowest block goes first and the
        # part of the cache ever written (resident memory, kv_cache.py) follows the peak use
        self.free: list[int] = list(range(num_blocks))
        self.holders: dict[int, list[int]] = {}  # block -> seq_ids holding it (catches double frees, leaks)
        # blocks held by no row whose content is kept for later rows, least recently used first
        self.cached: OrderedDict[int, None] = OrderedDict()
        self.cache_blocks = cache_blocks  # at most this many kept unheld (None: as many as are free)
        self.by_hash: dict[bytes, int] = {}
        self.hash_of: dict[int, bytes] = {}
        self.stats = CacheStats()

    @property
    def available(self) -> int:
        return len(self.free) + len(self.cached)

    def take(self, seq: Sequence, table: list[int], count: int) -> None:
        for _ in range(count):
            if self.free:
                block = heapq.heappop(self.free)
            else:  # the least recently used cached block gives its memory up
                block, _ = self.cached.popitem(last=False)
                self._forget(block)
                self.stats.evictions += 1
            self.holders[block] = [seq.seq_id]
            table.append(block)

    def share(self, seq: Sequence, table: list[int], blocks: list[int]) -> None:
        """Append cached `blocks` (found by hash) to `seq`'s table, held by it too."""
        for block in blocks:
            self.cached.pop(block, None)
            self.holders.setdefault(block, []).append(seq.seq_id)
            table.append(block)

    def give_back(self, seq: Sequence, table: list[int], keep: int) -> None:
        while len(table) > keep:
            block = table[-1]
            # check before forgetting the holder, so that a refused release changes nothing
            if seq.seq_id not in self.holders.get(block, ()):
                raise RuntimeError(f"block {block} released by a sequence that does not hold it")
            table.pop()
            holders = self.holders[block]
            holders.remove(seq.seq_id)
            if holders:
                continue
            del self.holders[block]
            if block in self.hash_of and self.cache_blocks != 0:
                self.cached[block] = None  # most recently used last
                if self.cache_blocks is not None and len(self.cached) > self.cache_blocks:
                    oldest, _ = self.cached.popitem(last=False)
                    self._forget(oldest)
                    heapq.heappush(self.free, oldest)
                    self.stats.evictions += 1
            else:
                self._forget(block)
                heapq.heappush(self.free, block)

    def register(self, block: int, key: bytes) -> None:
        """`block` holds the content named `key` (a full block of committed tokens)."""
        if key not in self.by_hash and block not in self.hash_of:
            self.by_hash[key] = block
            self.hash_of[block] = key

    def lookup(self, keys: list[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of `keys`."""
        blocks = []
        for key in keys:
            block = self.by_hash.get(key)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def _forget(self, block: int) -> None:
        key = self.hash_of.pop(block, None)
        if key is not None:
            del self.by_hash[key]


def chain_keys(seq: Sequence, block_size: int, count: int) -> list[bytes]:
    """The names of `seq`'s first `count` full blocks: each a hash of the previous one's name (the
    first: of the row's cache key, what else changes the KV) and its tokens."""
    return _chain(seq.cache_key or b"", seq, block_size, 0, count)


def _extend(seq: Sequence, block_size: int, start: int, count: int) -> list[bytes]:
    return _chain(seq.block_keys[start - 1], seq, block_size, start, count)


def _chain(previous: bytes, seq: Sequence, block_size: int, start: int, count: int) -> list[bytes]:
    keys = []
    for i in range(start, count):
        tokens = array("q", seq.token_ids[i * block_size : (i + 1) * block_size]).tobytes()
        previous = hashlib.blake2b(previous + tokens, digest_size=16).digest()
        keys.append(previous)
    return keys


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        upper_blocks: int = 0,
        layer_split: tuple[int, int] | None = None,
        cache_blocks: int | None = None,
    ) -> None:
        """`num_blocks` in the lower (or only) pool; with `layer_split` = (S, num_layers),
        `upper_blocks` more for the layers from S on. `cache_blocks`: unheld blocks whose content
        is kept for prefix caching (None: any free block; 0: prefix caching off)."""
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        if (layer_split is None) != (upper_blocks == 0) or upper_blocks < 0:
            raise ValueError("a split cache needs upper blocks, and only a split cache has them")
        self.block_size = block_size
        self.lower = _Pool(num_blocks, cache_blocks)
        self.upper = _Pool(upper_blocks, cache_blocks) if layer_split is not None else None
        self.caching = cache_blocks != 0
        self.split, self.num_layers = layer_split if layer_split is not None else (None, None)

    @property
    def num_blocks(self) -> int:
        return self.lower.num_blocks

    @property
    def num_free(self) -> int:
        """Blocks of the lower (or only) pool no row holds (free, or cached and evictable)."""
        return self.lower.available

    @property
    def capacity_tokens(self) -> int:
        """Tokens of a sequence with none dropped that the whole cache holds."""
        blocks = self.lower.num_blocks if self.upper is None else min(self.lower.num_blocks, self.upper.num_blocks)
        return blocks * self.block_size

    @property
    def usage(self) -> float:
        """Fraction of the cache's bytes held."""
        if self.upper is None:
            return 1.0 - self.lower.available / self.lower.num_blocks
        lower_w, upper_w = self.split, self.num_layers - self.split  # layers per block of each pool
        used = (self.lower.num_blocks - self.lower.available) * lower_w + (self.upper.num_blocks - self.upper.available) * upper_w
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
        return need.lower <= self.lower.available and (self.upper is None or need.upper <= self.upper.available)

    def could_ever_hold(self, need: BlockNeed) -> bool:
        """Whether `need` fits in the whole cache, all of it free."""
        return need.lower <= self.lower.num_blocks and (self.upper is None or need.upper <= self.upper.num_blocks)

    def allocate(self, seq: Sequence, total_tokens: int) -> None:
        """Grow `seq`'s tables to hold `total_tokens`; raises if the budget cannot."""
        need = self.need(seq, total_tokens)
        if not self.has_room(need):
            raise MemoryError(f"need {need} KV blocks; free: {self.lower.available} lower, {self._upper_free()} upper")
        self.lower.take(seq, seq.block_table, need.lower)
        if self.upper is not None:
            self.upper.take(seq, seq.upper_table, need.upper)

    def fit_upper(self, seq: Sequence, total_tokens: int) -> None:
        """Give back upper blocks beyond what `total_tokens` need (after a drop packed the table)."""
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

    # ---- prefix caching -------------------------------------------------------------------------
    def _keys(self, seq: Sequence, count: int) -> list[bytes]:
        """The names of `seq`'s first `count` full blocks (extended, never recomputed: the tokens
        of a full block never change)."""
        if len(seq.block_keys) < count:
            seq.block_keys = chain_keys(seq, self.block_size, count) if not seq.block_keys else (
                seq.block_keys + _extend(seq, self.block_size, len(seq.block_keys), count)
            )
        return seq.block_keys[:count]

    def attach_prefix(self, seq: Sequence) -> int:
        """A row about to be computed from its start takes the longest cached chain of its full
        blocks (all but one token at least stays to compute: its logits are needed) and starts
        after it. Returns the tokens found cached."""
        if not self.caching or seq.cache_key is None or seq.num_computed or seq.block_table:
            return 0
        _, lower, upper = self._found(seq)
        found = len(lower)
        self.lower.share(seq, seq.block_table, lower)
        if self.upper is not None:
            self.upper.share(seq, seq.upper_table, upper)
        seq.hashed_blocks = found
        seq.num_computed = found * self.block_size
        if seq.num_cached is None:  # (a recompute after preemption finds its own blocks: not a hit to report)
            seq.num_cached = seq.num_computed
        self.lower.stats.queries += seq.num_tokens
        self.lower.stats.hits += seq.num_computed
        return seq.num_computed

    def register_committed(self, seq: Sequence) -> None:
        """Name the full blocks of `seq`'s committed tokens, so that later rows find them."""
        # a request that stopped inside an accepted draft has KV past its last kept token
        full = min(seq.num_computed, seq.num_tokens) // self.block_size
        if not self.caching or seq.cache_key is None or seq.upper_packed or full <= seq.hashed_blocks:
            return
        keys = self._keys(seq, full)
        for i in range(seq.hashed_blocks, full):
            self.lower.register(seq.block_table[i], keys[i])
            if self.upper is not None:
                self.upper.register(seq.upper_table[i], keys[i])
        seq.hashed_blocks = full

    def _found(self, seq: Sequence) -> tuple[list[bytes], list[int], list[int]]:
        """The names of the blocks `seq` may find cached (all but its last token's), and the
        cached blocks of the longest prefix of them in each pool (the same length in both)."""
        keys = self._keys(seq, (seq.num_tokens - 1) // self.block_size)
        lower = self.lower.lookup(keys)
        if self.upper is None:
            return keys, lower, lower
        upper = self.upper.lookup(keys[: len(lower)])
        return keys, lower[: len(upper)], upper

    def first_missing(self, seq: Sequence) -> bytes | None:
        """The name of `seq`'s first block that is not cached (None: none it could take is missing,
        or the row is not cached)."""
        if not self.caching or seq.cache_key is None:
            return None
        keys, lower, _ = self._found(seq)
        return keys[len(lower)] if len(lower) < len(keys) else None

    def computing(self, seq: Sequence) -> list[bytes]:
        """The names of the full blocks a row is computing now (from its first uncomputed block to
        the last full one)."""
        if not self.caching or seq.cache_key is None:
            return []
        return self._keys(seq, seq.num_tokens // self.block_size)[seq.num_computed // self.block_size :]

    @property
    def cache_stats(self) -> CacheStats:
        stats = self.lower.stats
        return CacheStats(stats.queries, stats.hits, stats.evictions)

    @property
    def cached_blocks(self) -> int:
        return len(self.lower.by_hash)

    def check_no_leaks(self) -> None:
        """Every block is held by no row (cached content may stay)."""
        if self.lower.holders:
            raise AssertionError(f"{len(self.lower.holders)} KV blocks still held")
        if self.upper is not None and self.upper.holders:
            raise AssertionError(f"{len(self.upper.holders)} upper KV blocks still held")

    def _upper_free(self) -> int:
        return self.upper.available if self.upper is not None else 0

    def _slots(self, table: list[int], offsets: torch.Tensor) -> torch.Tensor:
        blocks = torch.tensor(table, dtype=torch.long)
        return blocks[offsets // self.block_size] * self.block_size + offsets % self.block_size
