"""The engine's scheduler under priority, without a model: a seat given up keeps its KV, blocks come back from
paused sequences first, and an urgent arrival starts and samples within the steps the README promises."""

from __future__ import annotations

from meshserve.worker.block_manager import BlockManager
from meshserve.worker.scheduler import Scheduler
from meshserve.worker.sequence import Status
from test_scheduler import HIGH, LOW, sequence, step


def distinct(s, base: int):
    s.prompt_ids = list(range(base, base + len(s.prompt_ids)))  # no prefix shared with the others
    return s


def test_a_sequence_that_gives_up_its_seat_keeps_its_kv_and_resumes_without_recomputing():
    manager = BlockManager(64, 4)
    scheduler = Scheduler(manager, max_num_seqs=1, max_num_batched_tokens=100)
    low = distinct(sequence(10, LOW), 100)
    scheduler.add(low)
    for _ in range(3):
        step(scheduler)  # prefill, then two decodes: 12 of its 13 tokens computed
    computed, blocks = low.num_computed_tokens, list(low.block_table)
    high = distinct(sequence(5, HIGH), 200)
    scheduler.add(high)
    assert step(scheduler) == {id(high): 5}
    assert low.status == Status.WAITING and low.num_preemptions == 1
    assert low.num_computed_tokens == computed and low.block_table[: len(blocks)] == blocks, "paused with its KV"
    scheduler.remove(high)
    assert step(scheduler) == {id(low): 1}, "it resumes with one decode token, nothing recomputed"
    assert low.status == Status.RUNNING


def test_blocks_come_from_a_paused_sequence_before_a_running_one_is_preempted():
    manager = BlockManager(8, 4)
    scheduler = Scheduler(manager, max_num_seqs=2, max_num_batched_tokens=100)
    low = distinct(sequence(7, LOW), 100)  # 2 blocks
    other = distinct(sequence(7, LOW), 300)  # 2 blocks
    scheduler.add(low)
    scheduler.add(other)
    step(scheduler)
    high = distinct(sequence(14, HIGH), 200)  # 4 blocks
    scheduler.add(high)
    step(scheduler)  # takes other's seat (newest LOW); other keeps its 2 blocks: 8 of 8 used
    assert other.status == Status.WAITING and other.block_table
    assert manager.num_free_blocks == 0
    for _ in range(3):
        step(scheduler)  # high reaches 17 tokens and needs a fifth block
    assert other.block_table == [] and other.num_computed_tokens == 0, "the paused one gave its blocks back"
    assert low.status == Status.RUNNING and high.status == Status.RUNNING


def test_a_high_arrival_into_a_full_batch_prefills_at_the_next_step_and_samples_in_it():
    scheduler = Scheduler(BlockManager(256, 4), max_num_seqs=4, max_num_batched_tokens=16)
    lows = [distinct(sequence(30, LOW), 1000 * (i + 1)) for i in range(6)]  # 4 run, 2 wait
    for low in lows:
        scheduler.add(low)
    for _ in range(8):
        step(scheduler)
    waiting = [s for s in lows if s.status == Status.WAITING]
    assert len(waiting) == 2
    high = distinct(sequence(10, HIGH), 50)
    scheduler.add(high)
    arrived = scheduler.steps
    step(scheduler)
    assert high.added_step == arrived and high.first_scheduled_step == arrived + 1
    assert high.first_token_step is None or high.first_token_step == high.first_scheduled_step
    assert high.output_ids == [7], "its whole prompt fit the step's budget: its first token came in that step"
    assert all(not s.output_ids for s in waiting), "before any LOW that was waiting"
