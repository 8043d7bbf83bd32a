"""KV-cache blocks: a fixed pool, block tables, prefix caching by chained block hashes, LRU reuse of free blocks.

A sequence's cache salt starts its chain of hashes: prompts with different salts (tenants, unless the operator
shares the cache) never share a block, so no one can learn from a fast first token what another sent.

The block manager only does bookkeeping (which block holds which tokens); the tensors
live in the model runner's pool and are indexed by the block ids handed out here.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

NO_HASH = -1


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    # Set once the block is full: hash of its tokens chained with the previous block's hash.
    hash: int = NO_HASH
    token_ids: tuple[int, ...] = ()


@dataclass
class Allocation:
    block_table: list[int]
    # Leading prompt tokens whose keys and values are already in the cache (prefix hit).
    num_cached_tokens: int


@dataclass
class PrefixCacheStats:
    queried_tokens: int = 0
    hit_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


@dataclass
class BlockManager:
    num_blocks: int
    block_size: int = 16
    # Off: no block is ever shared or found again (every prompt is computed in full).
    prefix_caching: bool = True
    blocks: list[Block] = field(init=False)
    stats: PrefixCacheStats = field(init=False, default_factory=PrefixCacheStats)

    def __post_init__(self) -> None:
        if self.num_blocks < 1 or self.block_size < 1:
            raise ValueError(f"need at least one block of one token, got {self.num_blocks} x {self.block_size}")
        self.blocks = [Block(i) for i in range(self.num_blocks)]
        self._cached: dict[int, int] = {}  # block hash -> block id, for full blocks (in use or free)
        # Free blocks, the next to be reused first: never-hashed ones, then cached ones least recently freed.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(self.num_blocks))

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def cached_prefix_tokens(self, token_ids: Sequence[int], salt: str = "") -> int:
        """How many leading tokens a new sequence would find in the cache (no side effects)."""
        return len(self._lookup(token_ids, salt)) * self.block_size

    def can_allocate(self, token_ids: Sequence[int], salt: str = "") -> bool:
        hits = self._lookup(token_ids, salt)
        # Taking a cached block that is currently free removes it from the free pool too.
        free_after_hits = self.num_free_blocks - sum(1 for i in hits if self.blocks[i].ref_count == 0)
        return self.blocks_needed(len(token_ids)) - len(hits) <= free_after_hits

    def allocate(self, token_ids: Sequence[int], salt: str = "") -> Allocation:
        """Blocks for a new (or recomputed) sequence, reusing the cached blocks of its longest cached prefix
        among those cached under the same salt."""
        if not token_ids:
            raise ValueError("a sequence needs at least one token")
        if not self.can_allocate(token_ids, salt):
            raise MemoryError(f"{self.blocks_needed(len(token_ids))} blocks needed, {self.num_free_blocks} free")
        table = [self._take(block_id).block_id for block_id in self._lookup(token_ids, salt)]
        num_cached_tokens = len(table) * self.block_size
        while len(table) < self.blocks_needed(len(token_ids)):
            table.append(self._take(self._pop_free()).block_id)
        self.stats.queried_tokens += len(token_ids)
        self.stats.hit_tokens += num_cached_tokens
        return Allocation(table, num_cached_tokens)

    def _lookup(self, token_ids: Sequence[int], salt: str) -> list[int]:
        """Block ids of the longest cached prefix of token_ids.

        The last token is always computed (its logits are needed): a prompt made only of full
        cached blocks still recomputes its last block, into a block of its own.
        """
        hits: list[int] = []
        if not self.prefix_caching:
            return hits
        prefix_hash = salt_hash(salt)
        for index in range((len(token_ids) - 1) // self.block_size):
            chunk = tuple(token_ids[index * self.block_size : (index + 1) * self.block_size])
            prefix_hash = chain_hash(prefix_hash, chunk)
            cached_id = self._cached.get(prefix_hash)
            if cached_id is None or self.blocks[cached_id].token_ids != chunk:
                break
            hits.append(cached_id)
        return hits

    def can_grow(self, block_table: list[int], num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) - len(block_table) <= self.num_free_blocks

    def grow(self, block_table: list[int], num_tokens: int) -> None:
        """Adds fresh blocks until the table holds num_tokens."""
        if not self.can_grow(block_table, num_tokens):
            raise MemoryError(f"no free KV block for {num_tokens} tokens")
        while len(block_table) < self.blocks_needed(num_tokens):
            block_table.append(self._take(self._pop_free()).block_id)

    def mark_computed(
        self, block_table: list[int], token_ids: Sequence[int], num_computed_tokens: int, salt: str = ""
    ) -> None:
        """Makes the full blocks whose keys and values are now written findable by later sequences.

        Only computed blocks are published: a block merely allocated holds no keys yet, and a
        sequence that hit it would read garbage.
        """
        if not self.prefix_caching:
            return
        full_blocks = num_computed_tokens // self.block_size
        first = full_blocks
        while first > 0 and self.blocks[block_table[first - 1]].hash == NO_HASH:
            first -= 1
        prefix_hash = self.blocks[block_table[first - 1]].hash if first > 0 else salt_hash(salt)
        for index in range(first, full_blocks):
            chunk = tuple(token_ids[index * self.block_size : (index + 1) * self.block_size])
            prefix_hash = chain_hash(prefix_hash, chunk)
            block = self.blocks[block_table[index]]
            block.hash, block.token_ids = prefix_hash, chunk
            self._cached.setdefault(prefix_hash, block.block_id)

    def free(self, block_table: list[int]) -> None:
        """Releases a sequence's blocks; cached ones stay findable until they are reused."""
        for block_id in reversed(block_table):
            block = self.blocks[block_id]
            assert block.ref_count > 0, f"block {block_id} freed more often than taken"
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
                if block.hash == NO_HASH:
                    self._free.move_to_end(block_id, last=False)
        block_table.clear()

    def _pop_free(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash != NO_HASH:  # evict: its contents are about to be overwritten
            if self._cached.get(block.hash) == block_id:
                del self._cached[block.hash]
            block.hash, block.token_ids = NO_HASH, ()
        return block_id

    def _take(self, block_id: int) -> Block:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            self._free.pop(block_id, None)
        block.ref_count += 1
        return block


def salt_hash(salt: str) -> int:
    """Where a chain of block hashes starts: the unsalted chain at NO_HASH, a salted one at its salt's hash."""
    return hash(("salt", salt)) if salt else NO_HASH


def chain_hash(prefix_hash: int, token_ids: tuple[int, ...]) -> int:
    """Equal blocks at different offsets (or after different prefixes) never share a hash."""
    return hash((prefix_hash, token_ids))
