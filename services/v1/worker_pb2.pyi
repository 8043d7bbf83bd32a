from meshserve.v1 import common_pb2 as _common_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class DescribeModelRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetLoadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LoadReport(_message.Message):
    __slots__ = ("running_sequences", "waiting_sequences", "max_num_seqs", "sequences_finished", "sequences_cancelled", "generated_tokens")
    RUNNING_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    WAITING_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SEQS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FINISHED_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_CANCELLED_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    running_sequences: int
    waiting_sequences: int
    max_num_seqs: int
    sequences_finished: int
    sequences_cancelled: int
    generated_tokens: int
    def __init__(self, running_sequences: _Optional[int] = ..., waiting_sequences: _Optional[int] = ..., max_num_seqs: _Optional[int] = ..., sequences_finished: _Optional[int] = ..., sequences_cancelled: _Optional[int] = ..., generated_tokens: _Optional[int] = ...) -> None: ...
