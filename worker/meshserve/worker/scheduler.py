"""Which tokens of which sequences the next engine step computes (iteration-level scheduling).

Every step has a token budget (`max_num_batched_tokens`) and a seat limit (`max_num_seqs`).
Decodes come first (one token per running sequence), so a long prompt is prefilled in chunks
between the decode steps of the others instead of stalling them. The rest of the budget goes to
prompt chunks by priority, then arrival, across running and waiting sequences alike: a HIGH
arrival's prefill starts at the next step even while a LOW prompt is still being prefilled.
Waiting sequences are admitted while seats, budget and KV blocks last.

A waiting sequence may preempt running ones of strictly lower priority. For a seat, the victim
keeps its KV blocks while it waits (paused), so it resumes where it stopped without recomputing
anything. When blocks run out, the least important holder gives them up: a paused sequence, or
the least important running one (lowest priority, then newest); it then waits to recompute prompt
+ output so far (its full blocks usually come back from the prefix cache).

`steps` counts the steps that computed something; each sequence notes the step count when it
arrived, when its first chunk was scheduled and when its first token was sampled (priority tests and
traces read urgency in steps, not seconds).
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
        self.steps = 0

    @property
    def paused(self) -> list[Sequence]:
        """Waiting sequences that kept their KV blocks when they gave up their seat."""
        return [s for s in self.waiting if s.block_table]

    def add(self, sequence: Sequence) -> None:
        sequence.status = Status.WAITING
        if sequence.added_step is None:
            sequence.added_step = self.steps
        bisect.insort(self.waiting, sequence, key=lambda s: s.rank)

    def remove(self, sequence: Sequence) -> None:
        """Takes a sequence out (finished, cancelled or failed) and frees its blocks."""
        if sequence.status == Status.RUNNING:
            self.running.remove(sequence)
            self.block_manager.free(sequence.block_table)
        elif sequence.status == Status.WAITING and sequence in self.waiting:
            self.waiting.remove(sequence)
            self.block_manager.free(sequence.block_table)  # a paused one's
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
        chunks = list(step.chunks.values())
        if chunks:
            self.steps += 1
            for chunk in chunks:
                if chunk.sequence.first_scheduled_step is None:
                    chunk.sequence.first_scheduled_step = self.steps
        return chunks

    def _schedule_running(self, sequence: Sequence, length: int, step: _Step) -> None:
        needed_tokens = sequence.num_computed_tokens + length
        while not self.block_manager.can_grow(sequence.block_table, needed_tokens):
            paused = self._least_important_paused(than=None)
            victim = self.running[-1]  # least important running; may be this very sequence
            if paused is not None and paused.rank > victim.rank:
                self._drop_kv(paused)
                continue
            self._preempt(victim, step)
            if victim is sequence:
                return
        self.block_manager.grow(sequence.block_table, needed_tokens)
        step.add(ScheduledChunk(sequence, sequence.num_computed_tokens, length))

    def _admit_next(self, step: _Step) -> bool:
        """Admits the first waiting sequence and schedules its first chunk (a paused one goes on from its kept
        blocks), preempting less important running ones for a seat or blocks; False when it cannot be
        admitted this step."""
        sequence = self.waiting[0]
        if id(sequence) in step.preempted:
            return False  # it just gave its seat or blocks to a more important sequence; readmitting it would thrash
        while len(self.running) >= self.max_num_seqs:
            victim = self._lower_priority_victim(sequence)
            if victim is None:
                return False
            self._preempt(victim, step, keep_kv=True)  # a seat is all it needs: the victim keeps its blocks
        while not self._fits(sequence):
            paused = self._least_important_paused(than=sequence)
            if paused is not None:
                self._drop_kv(paused)
                continue
            victim = self._lower_priority_victim(sequence)
            if victim is None:
                if sequence.block_table:  # its own kept blocks may be what stands in the way: start afresh
                    self._drop_kv(sequence)
                    continue
                return False
            self._preempt(victim, step)
        self.waiting.pop(0)
        if sequence.block_table:  # paused: its computed tokens are still in its blocks
            self.block_manager.grow(sequence.block_table, sequence.num_tokens)
        else:
            allocation = self.block_manager.allocate(sequence.token_ids, sequence.cache_salt)
            sequence.block_table = allocation.block_table
            sequence.num_computed_tokens = allocation.num_cached_tokens
            if sequence.cached_prompt_tokens is None:
                sequence.cached_prompt_tokens = min(allocation.num_cached_tokens, len(sequence.prompt_ids))
        sequence.status = Status.RUNNING
        bisect.insort(self.running, sequence, key=lambda s: s.rank)
        length = min(sequence.num_tokens - sequence.num_computed_tokens, step.budget)
        step.add(ScheduledChunk(sequence, sequence.num_computed_tokens, length))
        return True

    def _fits(self, sequence: Sequence) -> bool:
        if sequence.block_table:
            return self.block_manager.can_grow(sequence.block_table, sequence.num_tokens)
        return self.block_manager.can_allocate(sequence.token_ids, sequence.cache_salt)

    def _lower_priority_victim(self, sequence: Sequence) -> Sequence | None:
        """The least important running sequence, if its priority is strictly lower than sequence's."""
        if self.running and self.running[-1].priority > sequence.priority:
            return self.running[-1]
        return None

    def _least_important_paused(self, than: Sequence | None) -> Sequence | None:
        """The paused sequence whose kept blocks matter least (other than `than`)."""
        paused = [s for s in self.waiting if s.block_table and s is not than]
        return max(paused, key=lambda s: s.rank, default=None)

    def _drop_kv(self, sequence: Sequence) -> None:
        """A paused sequence gives its kept blocks back: it will recompute what it had."""
        self.block_manager.free(sequence.block_table)
        sequence.num_computed_tokens = 0

    def _preempt(self, sequence: Sequence, step: _Step, keep_kv: bool = False) -> None:
        step.drop(sequence)
        step.preempted.add(id(sequence))
        self.running.remove(sequence)
        if not keep_kv:
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
            self.block_manager.mark_computed(
                sequence.block_table, sequence.token_ids, sequence.num_computed_tokens, sequence.cache_salt
            )


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
