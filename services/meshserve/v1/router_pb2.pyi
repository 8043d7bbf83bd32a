from meshserve.v1 import common_pb2 as _common_pb2
from meshserve.v1 import worker_pb2 as _worker_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RouterStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class QueueStats(_message.Message):
    __slots__ = ("priority", "queued", "oldest_wait_ms", "recent_ttft_p50_ms", "recent_ttft_p99_ms", "ttft_objective_ms", "objective_attainment", "predicted_ttft_ms", "held_seats")
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    OLDEST_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    RECENT_TTFT_P50_MS_FIELD_NUMBER: _ClassVar[int]
    RECENT_TTFT_P99_MS_FIELD_NUMBER: _ClassVar[int]
    TTFT_OBJECTIVE_MS_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_ATTAINMENT_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    HELD_SEATS_FIELD_NUMBER: _ClassVar[int]
    priority: _common_pb2.Priority
    queued: int
    oldest_wait_ms: int
    recent_ttft_p50_ms: int
    recent_ttft_p99_ms: int
    ttft_objective_ms: int
    objective_attainment: float
    predicted_ttft_ms: int
    held_seats: int
    def __init__(self, priority: _Optional[_Union[_common_pb2.Priority, str]] = ..., queued: _Optional[int] = ..., oldest_wait_ms: _Optional[int] = ..., recent_ttft_p50_ms: _Optional[int] = ..., recent_ttft_p99_ms: _Optional[int] = ..., ttft_objective_ms: _Optional[int] = ..., objective_attainment: _Optional[float] = ..., predicted_ttft_ms: _Optional[int] = ..., held_seats: _Optional[int] = ...) -> None: ...

class WorkerStats(_message.Message):
    __slots__ = ("address", "up", "draining", "in_flight", "model", "load", "dispatched")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    UP_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    DISPATCHED_FIELD_NUMBER: _ClassVar[int]
    address: str
    up: bool
    draining: bool
    in_flight: int
    model: str
    load: _worker_pb2.LoadReport
    dispatched: int
    def __init__(self, address: _Optional[str] = ..., up: _Optional[bool] = ..., draining: _Optional[bool] = ..., in_flight: _Optional[int] = ..., model: _Optional[str] = ..., load: _Optional[_Union[_worker_pb2.LoadReport, _Mapping]] = ..., dispatched: _Optional[int] = ...) -> None: ...

class ParentStats(_message.Message):
    __slots__ = ("parent_id", "in_flight", "workers", "dispatched", "finished", "peak_in_flight", "peak_workers", "priority", "tenant", "client_request_id")
    PARENT_ID_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    DISPATCHED_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    PEAK_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    PEAK_WORKERS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    CLIENT_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    parent_id: str
    in_flight: int
    workers: _containers.RepeatedScalarFieldContainer[str]
    dispatched: int
    finished: int
    peak_in_flight: int
    peak_workers: int
    priority: _common_pb2.Priority
    tenant: str
    client_request_id: str
    def __init__(self, parent_id: _Optional[str] = ..., in_flight: _Optional[int] = ..., workers: _Optional[_Iterable[str]] = ..., dispatched: _Optional[int] = ..., finished: _Optional[int] = ..., peak_in_flight: _Optional[int] = ..., peak_workers: _Optional[int] = ..., priority: _Optional[_Union[_common_pb2.Priority, str]] = ..., tenant: _Optional[str] = ..., client_request_id: _Optional[str] = ...) -> None: ...

class RouterStats(_message.Message):
    __slots__ = ("queues", "workers", "dispatched", "shed", "deadline_exceeded", "failovers", "parents", "deadline_refused", "objective_shed")
    QUEUES_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    DISPATCHED_FIELD_NUMBER: _ClassVar[int]
    SHED_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_EXCEEDED_FIELD_NUMBER: _ClassVar[int]
    FAILOVERS_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_REFUSED_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_SHED_FIELD_NUMBER: _ClassVar[int]
    queues: _containers.RepeatedCompositeFieldContainer[QueueStats]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStats]
    dispatched: int
    shed: int
    deadline_exceeded: int
    failovers: int
    parents: _containers.RepeatedCompositeFieldContainer[ParentStats]
    deadline_refused: int
    objective_shed: int
    def __init__(self, queues: _Optional[_Iterable[_Union[QueueStats, _Mapping]]] = ..., workers: _Optional[_Iterable[_Union[WorkerStats, _Mapping]]] = ..., dispatched: _Optional[int] = ..., shed: _Optional[int] = ..., deadline_exceeded: _Optional[int] = ..., failovers: _Optional[int] = ..., parents: _Optional[_Iterable[_Union[ParentStats, _Mapping]]] = ..., deadline_refused: _Optional[int] = ..., objective_shed: _Optional[int] = ...) -> None: ...
