"""KV block bookkeeping: allocation, prefix-cache hits, sharing, LRU reuse, and no leaks."""

from __future__ import annotations

import random

import pytest

from meshserve.worker.block_manager import BlockManager


def tokens(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def assert_all_free(manager: BlockManager) -> None:
    assert manager.num_free_blocks == manager.num_blocks
    assert all(block.ref_count == 0 for block in manager.blocks)


def test_allocate_then_free_returns_every_block():
    manager = BlockManager(num_blocks=8, block_size=4)
    allocation = manager.allocate(tokens(10))
    assert len(allocation.block_table) == 3 and allocation.num_cached_tokens == 0
    assert manager.num_free_blocks == 5
    manager.free(allocation.block_table)
    assert_all_free(manager)


def test_second_request_with_same_prefix_skips_its_computed_blocks():
    manager = BlockManager(num_blocks=8, block_size=4)
    prompt = tokens(10)
    first = manager.allocate(prompt)
    manager.mark_computed(first.block_table, prompt, len(prompt))
    shared = first.block_table[:2]
    manager.free(first.block_table)
    second = manager.allocate([*prompt[:8], 99, 98, 97])
    assert second.num_cached_tokens == 8
    assert second.block_table[:2] == shared
    assert manager.stats.hit_tokens == 8 and manager.stats.queried_tokens == 21


def test_blocks_not_yet_computed_are_never_hit():
    manager = BlockManager(num_blocks=8, block_size=4)
    manager.allocate(tokens(10))  # allocated, nothing computed
    assert manager.allocate(tokens(10)).num_cached_tokens == 0


def test_live_sequences_share_prefix_blocks_by_reference_count():
    manager = BlockManager(num_blocks=8, block_size=4)
    a = manager.allocate(tokens(9))
    manager.mark_computed(a.block_table, tokens(9), 9)
    b = manager.allocate(tokens(9))
    assert b.block_table[:2] == a.block_table[:2]
    assert [manager.blocks[i].ref_count for i in a.block_table] == [2, 2, 1]
    manager.free(a.block_table)
    manager.free(b.block_table)
    assert_all_free(manager)


def test_prompt_of_only_cached_full_blocks_recomputes_its_last_block():
    manager = BlockManager(num_blocks=8, block_size=4)
    a = manager.allocate(tokens(8))
    manager.mark_computed(a.block_table, tokens(8), 8)
    b = manager.allocate(tokens(8))
    assert b.num_cached_tokens == 4
    assert b.block_table[0] == a.block_table[0] and b.block_table[1] != a.block_table[1]


def test_equal_blocks_after_different_prefixes_do_not_match():
    manager = BlockManager(num_blocks=8, block_size=4)
    a = manager.allocate([1, 2, 3, 4, 5, 6, 7, 8, 0])
    manager.mark_computed(a.block_table, [1, 2, 3, 4, 5, 6, 7, 8, 0], 9)
    assert manager.allocate([9, 9, 9, 9, 5, 6, 7, 8, 0]).num_cached_tokens == 0


def test_least_recently_freed_cached_block_is_reused_first():
    manager = BlockManager(num_blocks=5, block_size=2)
    for prompt in ([1, 2, 0], [3, 4, 0]):  # each leaves one cached full block when freed
        allocation = manager.allocate(prompt)
        manager.mark_computed(allocation.block_table, prompt, len(prompt))
        manager.free(allocation.block_table)
    assert manager.cached_prefix_tokens([1, 2, 9]) == manager.cached_prefix_tokens([3, 4, 9]) == 2
    # Four of five blocks: the three never-hashed ones, then the least recently freed cached one.
    filler = manager.allocate([7] * 8)
    assert manager.cached_prefix_tokens([1, 2, 9]) == 0
    assert manager.cached_prefix_tokens([3, 4, 9]) == 2
    manager.free(filler.block_table)
    assert_all_free(manager)


def test_growing_past_the_pool_raises_memory_error():
    manager = BlockManager(num_blocks=2, block_size=4)
    allocation = manager.allocate(tokens(3))
    manager.grow(allocation.block_table, 8)
    assert len(allocation.block_table) == 2
    assert not manager.can_grow(allocation.block_table, 9)
    with pytest.raises(MemoryError):
        manager.grow(allocation.block_table, 9)
    with pytest.raises(MemoryError):
        manager.allocate(tokens(1))


def test_no_leaks_after_many_random_sequences():
    rng = random.Random(0)
    manager = BlockManager(num_blocks=64, block_size=4)
    live: list[tuple[list[int], list[int]]] = []
    system_prompt = tokens(12, start=500)
    for step in range(1000):
        if live and (rng.random() < 0.45 or not manager.can_allocate([0] * 40)):
            table, ids = live.pop(rng.randrange(len(live)))
            manager.free(table)
            continue
        prompt = (system_prompt if rng.random() < 0.5 else []) + [rng.randrange(50) for _ in range(rng.randint(1, 20))]
        allocation = manager.allocate(prompt)
        for index in range(allocation.num_cached_tokens // manager.block_size):
            hit = manager.blocks[allocation.block_table[index]]
            assert hit.token_ids == tuple(prompt[index * 4 : (index + 1) * 4]), "a hit block holds other tokens"
        ids = list(prompt)
        for _ in range(rng.randint(0, 12)):
            if not manager.can_grow(allocation.block_table, len(ids) + 1):
                break
            manager.mark_computed(allocation.block_table, ids, len(ids))
            ids.append(rng.randrange(50))
            manager.grow(allocation.block_table, len(ids))
        live.append((allocation.block_table, ids))
        references = sum(len(table) for table, _ in live)
        assert sum(block.ref_count for block in manager.blocks) == references, f"step {step}"
    for table, _ in live:
        manager.free(table)
    assert_all_free(manager)
    assert manager.stats.hit_rate > 0.1
