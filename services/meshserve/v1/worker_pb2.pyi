from meshserve.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class DescribeModelRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetLoadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchLoadRequest(_message.Message):
    __slots__ = ("interval_ms",)
    INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    interval_ms: int
    def __init__(self, interval_ms: _Optional[int] = ...) -> None: ...

class LoadReport(_message.Message):
    __slots__ = ("running_sequences", "waiting_sequences", "max_num_seqs", "sequences_finished", "sequences_cancelled", "generated_tokens", "free_kv_blocks", "total_kv_blocks", "kv_block_size", "tokens_per_second", "prefix_cache_hit_rate", "draining", "preemptions", "max_num_batched_tokens", "waiting_by_priority")
    RUNNING_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    WAITING_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SEQS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FINISHED_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_CANCELLED_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FREE_KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_BATCHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WAITING_BY_PRIORITY_FIELD_NUMBER: _ClassVar[int]
    running_sequences: int
    waiting_sequences: int
    max_num_seqs: int
    sequences_finished: int
    sequences_cancelled: int
    generated_tokens: int
    free_kv_blocks: int
    total_kv_blocks: int
    kv_block_size: int
    tokens_per_second: float
    prefix_cache_hit_rate: float
    draining: bool
    preemptions: int
    max_num_batched_tokens: int
    waiting_by_priority: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, running_sequences: _Optional[int] = ..., waiting_sequences: _Optional[int] = ..., max_num_seqs: _Optional[int] = ..., sequences_finished: _Optional[int] = ..., sequences_cancelled: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., free_kv_blocks: _Optional[int] = ..., total_kv_blocks: _Optional[int] = ..., kv_block_size: _Optional[int] = ..., tokens_per_second: _Optional[float] = ..., prefix_cache_hit_rate: _Optional[float] = ..., draining: _Optional[bool] = ..., preemptions: _Optional[int] = ..., max_num_batched_tokens: _Optional[int] = ..., waiting_by_priority: _Optional[_Iterable[int]] = ...) -> None: ...
