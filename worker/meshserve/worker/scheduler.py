"""Which tokens of which sequences the next engine step computes (iteration-level scheduling).

Every step has a token budget (`max_num_batched_tokens`) and a seat limit (`max_num_seqs`).
Decodes come first (one token per running sequence), so a long prompt is prefilled in chunks
between the decode steps of the others instead of stalling them. The rest of the budget goes to
prompt chunks by priority, then arrival, across running and waiting sequences alike: a HIGH
arrival's prefill starts at the next step even while a LOW prompt is still being prefilled.
Waiting sequences are admitted while seats, budget and KV blocks last.

When blocks run out the least important running sequence (lowest priority, then newest) is
preempted: its blocks are freed and it waits to recompute prompt + output so far (its full
blocks usually come back from the prefix cache). A waiting sequence may also preempt
running ones of strictly lower priority to get a seat or blocks.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from meshserve.worker.block_manager import BlockManager
from meshserve.worker.sequence import Sequence, Status


@dataclass
class ScheduledChunk:
    """Tokens [start, start + length) of a sequence, computed in this step."""

    sequence: Sequence
    start: int
    length: int

    @property
    def samples(self) -> bool:
        """The chunk reaches the sequence's last token, so the step samples its next one."""
        return self.start + self.length == self.sequence.num_tokens


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, not {max_num_seqs}")
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be at least 1, not {max_num_batched_tokens}")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: list[Sequence] = []  # sorted by rank
        self.running: list[Sequence] = []  # sorted by rank at every step
        self.preemptions = 0

    def add(self, sequence: Sequence) -> None:
        sequence.status = Status.WAITING
        bisect.insort(self.waiting, sequence, key=lambda s: s.rank)

    def remove(self, sequence: Sequence) -> None:
        """Takes a sequence out (finished, cancelled or failed) and frees its blocks."""
        if sequence.status == Status.RUNNING:
            self.running.remove(sequence)
            self.block_manager.free(sequence.block_table)
        elif sequence.status == Status.WAITING and sequence in self.waiting:
            self.waiting.remove(sequence)
        sequence.status = Status.FINISHED

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledChunk]:
        step = _Step(self.max_num_batched_tokens)
        self.running.sort(key=lambda s: s.rank)
        # Decodes first, one token each: every running stream advances every step.
        for sequence in list(self.running):
            if step.budget == 0:
                break
            if sequence.status == Status.RUNNING and sequence.num_tokens - sequence.num_computed_tokens == 1:
                self._schedule_running(sequence, 1, step)
        # Then prompt chunks, by rank across running and waiting sequences: an urgent arrival's prefill
        # takes the budget before a less important prompt still being prefilled.
        prefilling = [s for s in self.running if s.num_tokens - s.num_computed_tokens > 1]
        admitting = True
        while step.budget > 0:
            prefilling = [s for s in prefilling if s.status == Status.RUNNING and id(s) not in step.chunks]
            if admitting and self.waiting and (not prefilling or self.waiting[0].rank < prefilling[0].rank):
                admitting = self._admit_next(step)  # no room for it: the running prompts still go on
            elif prefilling:
                sequence = prefilling[0]
                self._schedule_running(
                    sequence, min(sequence.num_tokens - sequence.num_computed_tokens, step.budget), step
                )
                if id(sequence) not in step.chunks:  # it gave up its own blocks: nothing more fits
                    break
            else:
                break
        return list(step.chunks.values())

    def _schedule_running(self, sequence: Sequence, length: int, step: _Step) -> None:
        needed_tokens = sequence.num_computed_tokens + length
        while not self.block_manager.can_grow(sequence.block_table, needed_tokens):
            victim = self.running[-1]  # least important; may be this very sequence
            self._preempt(victim, step)
            if victim is sequence:
                return
        self.block_manager.grow(sequence.block_table, needed_tokens)
        step.add(ScheduledChunk(sequence, sequence.num_computed_tokens, length))

    def _admit_next(self, step: _Step) -> bool:
        """Admits the first waiting sequence and schedules its first chunk, preempting less important
        running ones for a seat or blocks; False when it cannot be admitted this step."""
        sequence = self.waiting[0]
        if id(sequence) in step.preempted:
            return False  # it just gave its blocks to a more important sequence; readmitting it would thrash
        while not self._admissible(sequence):
            victim = self._lower_priority_victim(sequence)
            if victim is None:
                return False
            self._preempt(victim, step)
        self.waiting.pop(0)
        allocation = self.block_manager.allocate(sequence.token_ids)
        sequence.block_table = allocation.block_table
        sequence.num_computed_tokens = allocation.num_cached_tokens
        if sequence.cached_prompt_tokens is None:
            sequence.cached_prompt_tokens = min(allocation.num_cached_tokens, len(sequence.prompt_ids))
        sequence.status = Status.RUNNING
        bisect.insort(self.running, sequence, key=lambda s: s.rank)
        length = min(sequence.num_tokens - sequence.num_computed_tokens, step.budget)
        step.add(ScheduledChunk(sequence, sequence.num_computed_tokens, length))
        return True

    def _admissible(self, sequence: Sequence) -> bool:
        return len(self.running) < self.max_num_seqs and self.block_manager.can_allocate(sequence.token_ids)

    def _lower_priority_victim(self, sequence: Sequence) -> Sequence | None:
        """The least important running sequence, if its priority is strictly lower than sequence's."""
        if self.running and self.running[-1].priority > sequence.priority:
            return self.running[-1]
        return None

    def _preempt(self, sequence: Sequence, step: _Step) -> None:
        step.drop(sequence)
        step.preempted.add(id(sequence))
        self.running.remove(sequence)
        self.block_manager.free(sequence.block_table)
        sequence.num_computed_tokens = 0
        sequence.num_preemptions += 1
        self.preemptions += 1
        self.add(sequence)

    def update(self, chunks: list[ScheduledChunk]) -> None:
        """Records that the step computed the chunks: their keys and values are now in the cache."""
        for chunk in chunks:
            sequence = chunk.sequence
            sequence.num_computed_tokens = chunk.start + chunk.length
            self.block_manager.mark_computed(sequence.block_table, sequence.token_ids, sequence.num_computed_tokens)


class _Step:
    """The chunks of the step being scheduled and the token budget left."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.chunks: dict[int, ScheduledChunk] = {}
        self.preempted: set[int] = set()

    def add(self, chunk: ScheduledChunk) -> None:
        self.chunks[id(chunk.sequence)] = chunk
        self.budget -= chunk.length

    def drop(self, sequence: Sequence) -> None:
        chunk = self.chunks.pop(id(sequence), None)
        if chunk is not None:
            self.budget += chunk.length
