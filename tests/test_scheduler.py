"""Scheduling decisions alone (no model): budgets, chunking, who gets preempted; and the sampler's filters."""

from __future__ import annotations

import pytest
import torch

from meshserve.worker.block_manager import BlockManager
from meshserve.worker.sampler import apply_penalties, draw
from meshserve.worker.scheduler import Scheduler
from meshserve.worker.sequence import SamplingOptions, Sequence, Status

LOW, NORMAL, HIGH = 4, 3, 2


def sequence(prompt_len: int, priority: int = NORMAL) -> Sequence:
    return Sequence(
        request_id="r",
        prompt_ids=list(range(1, prompt_len + 1)),
        options=SamplingOptions(max_tokens=100),
        detokenizer=None,
        eos_token_ids=frozenset(),
        max_context_length=4096,
        emit=lambda output: None,
        priority=priority,
    )


def step(scheduler: Scheduler) -> dict[int, int]:
    """Schedules and completes one step, appending a token to each sequence that reached its end."""
    chunks = scheduler.schedule()
    scheduler.update(chunks)
    for chunk in chunks:
        if chunk.samples:
            chunk.sequence.output_ids.append(7)
    return {id(c.sequence): c.length for c in chunks}


def test_budget_splits_long_prompts_into_chunks_after_decodes():
    scheduler = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10)
    short, long = sequence(3), sequence(25)
    scheduler.add(short)
    scheduler.add(long)
    assert step(scheduler) == {id(short): 3, id(long): 7}
    assert step(scheduler) == {id(short): 1, id(long): 9}
    assert step(scheduler) == {id(short): 1, id(long): 9}  # 25 prompt tokens done: long samples now
    assert long.output_ids == [7]
    assert step(scheduler) == {id(short): 1, id(long): 1}


def test_seat_limit_holds_and_admission_follows_priority_then_arrival():
    scheduler = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=100)
    first, second, urgent = sequence(2), sequence(2), sequence(2, HIGH)
    for s in (first, second, urgent):
        scheduler.add(s)
    assert set(step(scheduler)) == {id(urgent), id(first)}
    assert second.status == Status.WAITING


def test_out_of_blocks_preempts_lowest_priority_then_newest():
    manager = BlockManager(6, 4)
    scheduler = Scheduler(manager, max_num_seqs=8, max_num_batched_tokens=100)
    normal, low_old, low_new = sequence(8), sequence(8, LOW), sequence(8, LOW)
    for s in (normal, low_old, low_new):
        scheduler.add(s)
    step(scheduler)  # 3 x 2 blocks: the pool is full; each now has 9 tokens
    assert manager.num_free_blocks == 0
    step(scheduler)  # every sequence needs a third block for its 10th token
    assert low_new.status == Status.WAITING and low_new.num_preemptions == 1
    assert normal.status == low_old.status == Status.RUNNING  # the victim's two blocks let both grow
    assert scheduler.preemptions == 1
    assert manager.num_free_blocks == 0


def test_higher_priority_waiting_takes_a_seat_from_lower_priority_running():
    scheduler = Scheduler(BlockManager(64, 4), max_num_seqs=1, max_num_batched_tokens=100)
    low = sequence(3, LOW)
    scheduler.add(low)
    step(scheduler)
    high = sequence(3, HIGH)
    scheduler.add(high)
    assert set(step(scheduler)) == {id(high)}
    assert low.status == Status.WAITING
    same = sequence(3, HIGH)
    scheduler.add(same)
    assert set(step(scheduler)) == {id(high)}, "equal priority waits its turn"


def test_removing_frees_every_block():
    manager = BlockManager(16, 4)
    scheduler = Scheduler(manager, max_num_seqs=4, max_num_batched_tokens=100)
    sequences = [sequence(9) for _ in range(3)]
    for s in sequences:
        scheduler.add(s)
    step(scheduler)
    for s in sequences:
        scheduler.remove(s)
    assert manager.num_free_blocks == 16 and not scheduler.has_work()


def test_penalties():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    options = SamplingOptions(max_tokens=1, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    apply_penalties(logits, prompt_ids=[0], output_ids=[1, 2, 2], options=options)
    # token 0: prompt only -> 2 / 2; token 1: -2 * 2 - 0.5 - 0.25; token 2: 1 / 2 - 0.5 - 0.5; token 3 untouched
    assert logits.tolist() == [1.0, -4.75, -0.5, 0.5]


def test_min_p_top_k_and_top_p_only_draw_allowed_tokens():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    generator = torch.Generator().manual_seed(0)
    draws = lambda **kw: {draw(logits, SamplingOptions(max_tokens=1, **kw), generator) for _ in range(300)}  # noqa: E731
    assert draws() == {0, 1, 2, 3}
    assert draws(min_p=0.2) == {0, 1, 2}  # 0.05 < 0.2 * 0.5
    assert draws(top_k=2) == {0, 1}
    assert draws(top_p=0.5) == {0}
    assert draws(temperature=0.01) == {0}


def test_kv_cache_memory_settings():
    from meshserve.worker.model_runner import CPU_AUTO_KV_CAP, kv_cache_bytes

    cpu = torch.device("cpu")
    assert kv_cache_bytes("512MiB", cpu) == 512 << 20
    assert kv_cache_bytes("2GB", cpu) == 2_000_000_000
    assert kv_cache_bytes("1.5KiB", cpu) == 1536
    assert kv_cache_bytes("65536", cpu) == 65536
    assert 0 < kv_cache_bytes("0.01", cpu) < kv_cache_bytes("0.02", cpu)
    assert 0 < kv_cache_bytes("auto", cpu) <= CPU_AUTO_KV_CAP
    for bad in ("", "lots", "-1", "0", "12XB", "MiB"):
        with pytest.raises(ValueError, match="kv_cache_memory"):
            kv_cache_bytes(bad, cpu)


def test_an_urgent_arrival_prefills_ahead_of_a_less_important_prompt_still_being_prefilled():
    """The budget after the decodes goes by rank: HIGH's whole prompt runs at the next step, before the
    LOW prompt that was mid-prefill gets any of it."""
    scheduler = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10)
    decoding, low = sequence(2, LOW), sequence(40, LOW)
    scheduler.add(decoding)
    scheduler.add(low)
    step(scheduler)  # decoding's prompt and 8 of low's
    urgent = sequence(6, HIGH)
    urgent.prompt_ids = list(range(100, 106))  # nothing in common with the others' cached prefixes
    scheduler.add(urgent)
    assert step(scheduler) == {id(decoding): 1, id(urgent): 6, id(low): 3}
    assert urgent.output_ids == [7]  # sampled at once: its first token in this very step
    assert step(scheduler) == {id(decoding): 1, id(urgent): 1, id(low): 8}
