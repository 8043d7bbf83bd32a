from meshserve.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DescribeModelRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetLoadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LinkCommand(_message.Message):
    __slots__ = ("submit", "cancel")
    SUBMIT_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    submit: SubmitSequence
    cancel: CancelSequence
    def __init__(self, submit: _Optional[_Union[SubmitSequence, _Mapping]] = ..., cancel: _Optional[_Union[CancelSequence, _Mapping]] = ...) -> None: ...

class SubmitSequence(_message.Message):
    __slots__ = ("sequence_id", "request", "timeout_ms", "trace_context")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    sequence_id: int
    request: _common_pb2.TokenRequest
    timeout_ms: int
    trace_context: _containers.ScalarMap[str, str]
    def __init__(self, sequence_id: _Optional[int] = ..., request: _Optional[_Union[_common_pb2.TokenRequest, _Mapping]] = ..., timeout_ms: _Optional[int] = ..., trace_context: _Optional[_Mapping[str, str]] = ...) -> None: ...

class CancelSequence(_message.Message):
    __slots__ = ("sequence_id",)
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    sequence_id: int
    def __init__(self, sequence_id: _Optional[int] = ...) -> None: ...

class LinkEvent(_message.Message):
    __slots__ = ("outputs", "load")
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.RepeatedCompositeFieldContainer[SequenceChunk]
    load: LoadReport
    def __init__(self, outputs: _Optional[_Iterable[_Union[SequenceChunk, _Mapping]]] = ..., load: _Optional[_Union[LoadReport, _Mapping]] = ...) -> None: ...

class SequenceChunk(_message.Message):
    __slots__ = ("sequence_id", "chunk")
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    sequence_id: int
    chunk: _common_pb2.StreamChunk
    def __init__(self, sequence_id: _Optional[int] = ..., chunk: _Optional[_Union[_common_pb2.StreamChunk, _Mapping]] = ...) -> None: ...

class LoadReport(_message.Message):
    __slots__ = ("running_sequences", "waiting_sequences", "max_num_seqs", "sequences_finished", "sequences_cancelled", "generated_tokens", "free_kv_blocks", "total_kv_blocks", "kv_block_size", "tokens_per_second", "prefix_cache_hit_rate", "draining", "preemptions", "max_num_batched_tokens", "waiting_by_priority", "stream_sequences", "step_seconds", "steps")
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
    STREAM_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
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
    stream_sequences: int
    step_seconds: float
    steps: int
    def __init__(self, running_sequences: _Optional[int] = ..., waiting_sequences: _Optional[int] = ..., max_num_seqs: _Optional[int] = ..., sequences_finished: _Optional[int] = ..., sequences_cancelled: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., free_kv_blocks: _Optional[int] = ..., total_kv_blocks: _Optional[int] = ..., kv_block_size: _Optional[int] = ..., tokens_per_second: _Optional[float] = ..., prefix_cache_hit_rate: _Optional[float] = ..., draining: _Optional[bool] = ..., preemptions: _Optional[int] = ..., max_num_batched_tokens: _Optional[int] = ..., waiting_by_priority: _Optional[_Iterable[int]] = ..., stream_sequences: _Optional[int] = ..., step_seconds: _Optional[float] = ..., steps: _Optional[int] = ...) -> None: ...
