from meshserve.v1 import common_pb2 as _common_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FanOutRequest(_message.Message):
    __slots__ = ("request", "n")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    request: _common_pb2.TokenRequest
    n: int
    def __init__(self, request: _Optional[_Union[_common_pb2.TokenRequest, _Mapping]] = ..., n: _Optional[int] = ...) -> None: ...
