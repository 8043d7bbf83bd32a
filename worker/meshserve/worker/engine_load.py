"""The engine's load: what it reports to schedulers (one type, copied into the LoadReport proto as it is)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineLoad:
    running_sequences: int
    waiting_sequences: int
    waiting_by_priority: tuple[int, ...]
    max_num_seqs: int
    max_num_batched_tokens: int
    sequences_finished: int
    sequences_cancelled: int
    generated_tokens: int
    free_kv_blocks: int
    total_kv_blocks: int
    kv_block_size: int
    tokens_per_second: float
    prefix_cache_hit_rate: float
    preemptions: int
    draining: bool
    step_seconds: float = 0.0
    steps: int = 0
