from meshserve.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FanOutRequest(_message.Message):
    __slots__ = ("request", "n", "best_of", "inputs", "map_reduce", "dedupe", "order_by_score", "failure_policy")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    BEST_OF_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    MAP_REDUCE_FIELD_NUMBER: _ClassVar[int]
    DEDUPE_FIELD_NUMBER: _ClassVar[int]
    ORDER_BY_SCORE_FIELD_NUMBER: _ClassVar[int]
    FAILURE_POLICY_FIELD_NUMBER: _ClassVar[int]
    request: _common_pb2.TokenRequest
    n: int
    best_of: int
    inputs: _containers.RepeatedCompositeFieldContainer[FanOutInput]
    map_reduce: MapReduceTask
    dedupe: bool
    order_by_score: bool
    failure_policy: _common_pb2.FailurePolicy
    def __init__(self, request: _Optional[_Union[_common_pb2.TokenRequest, _Mapping]] = ..., n: _Optional[int] = ..., best_of: _Optional[int] = ..., inputs: _Optional[_Iterable[_Union[FanOutInput, _Mapping]]] = ..., map_reduce: _Optional[_Union[MapReduceTask, _Mapping]] = ..., dedupe: _Optional[bool] = ..., order_by_score: _Optional[bool] = ..., failure_policy: _Optional[_Union[_common_pb2.FailurePolicy, str]] = ...) -> None: ...

class FanOutInput(_message.Message):
    __slots__ = ("prompt_token_ids", "sampling")
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _common_pb2.SamplingParams
    def __init__(self, prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ...) -> None: ...

class MapReduceTask(_message.Message):
    __slots__ = ("text", "map_template", "reduce_template", "chunk_tokens", "map_sampling")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MAP_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    REDUCE_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAP_SAMPLING_FIELD_NUMBER: _ClassVar[int]
    text: str
    map_template: str
    reduce_template: str
    chunk_tokens: int
    map_sampling: _common_pb2.SamplingParams
    def __init__(self, text: _Optional[str] = ..., map_template: _Optional[str] = ..., reduce_template: _Optional[str] = ..., chunk_tokens: _Optional[int] = ..., map_sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ...) -> None: ...
