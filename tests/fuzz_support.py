"""What the fuzz suites share: how many requests each API gets, a runner that sends hypothesis's examples a batch
at a time, and what every answer must be (a status a caller can act on, a refusal naming its field).

Counts are the security issue's: 10,000 generated requests per public API (gRPC, HTTP) and 2,000 per internal
API (router, worker, aggregator). MESHSERVE_FUZZ_SCALE multiplies them all (0.05 for a quick local run, 5 for a
long one). Time stays bounded: every request has a short deadline, and most are refused before a worker runs.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
from google.rpc import error_details_pb2
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from meshserve.common.errors import MeshError, bad_request_fields
from meshserve.v1 import common_pb2

T = TypeVar("T")

SCALE = float(os.environ.get("MESHSERVE_FUZZ_SCALE", "1"))
PUBLIC_REQUESTS = math.ceil(10_000 * SCALE)  # per public API
INTERNAL_REQUESTS = math.ceil(2_000 * SCALE)  # per internal API
BATCH = 16  # requests of one hypothesis example, sent at once: the worker batches what reaches it
CALL_TIMEOUT_S = 5.0  # a valid request's generation is a few tokens; this bounds any that is not

# What a caller may be told; UNKNOWN, INTERNAL, DATA_LOSS (a server fault) or UNAVAILABLE (a service down) is a bug.
CLIENT_CODES = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.DEADLINE_EXCEEDED,  # a valid request that runs longer than the fuzzer waits
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,  # a sequence past its own timeout_ms, or one the fuzzer cancelled
    }
)


def share(total: int, fraction: float) -> int:
    """This test's part of an API's requests, at least one batch."""
    return max(BATCH, math.ceil(total * fraction))


def fuzz(
    strategy: st.SearchStrategy[T],
    send: Callable[[T], str | list[str]],
    requests: int,
    batch: int = BATCH,
    per_example: int = 1,
) -> Counter:
    """Sends at least `requests` requests, `batch` examples of `strategy` at a time from threads; `send` makes one
    call, checks its answer (raising AssertionError) and returns a label of the outcome (a list of `per_example`
    labels when an example is several requests: the commands of one stream). Returns the labels' counts: how many
    were sent, and how far they got. A failing example is shrunk and reported by hypothesis."""
    outcomes: Counter = Counter()
    with ThreadPoolExecutor(batch, thread_name_prefix="fuzz") as pool:

        @settings(
            max_examples=math.ceil(requests / (batch * per_example)),
            deadline=None,
            database=None,  # nothing written to disk: CI and every run start fresh
            suppress_health_check=list(HealthCheck),
            phases=[Phase.generate, Phase.shrink],
            print_blob=True,
        )
        @given(st.lists(strategy, min_size=batch, max_size=batch))
        def run(examples: list[T]) -> None:
            futures = [pool.submit(send, example) for example in examples]
            failures = []
            for example, future in zip(examples, futures, strict=True):
                try:
                    label = future.result()
                except AssertionError as exc:
                    failures.append((example, exc))
                    continue
                for one in [label] if isinstance(label, str) else label:
                    outcomes[one] += 1
                    event(one)
            if failures:
                example, exc = failures[0]
                raise AssertionError(f"{len(failures)} of {batch} failed; the first: {exc}\nrequest: {example!r}")

        run()
    total = sum(outcomes.values())
    print(f"{total} requests: {dict(outcomes.most_common())}")  # shown with pytest -s or -rP
    assert total >= requests, f"sent {total} requests, not the {requests} asked for: {dict(outcomes)}"
    return outcomes


def assert_reached_workers(outcomes: Counter, ok_labels: Iterable[str], at_least: float) -> None:
    """Enough examples were valid to run on a worker: the fuzzer looked past the first check."""
    ok = sum(outcomes[label] for label in ok_labels)
    total = sum(outcomes.values())
    assert ok >= at_least * total, f"only {ok} of {total} requests succeeded: {dict(outcomes)}"


# ---- what an answer must be ------------------------------------------------------------------------------------


def names_its_fields(message: str, fields: list[str], what: str) -> None:
    assert fields, f"{what} without a BadRequest field violation: {message!r}"
    assert all(field in message for field in fields), f"{what}: the message does not name {fields}: {message!r}"


def check_rpc_error(error: grpc.RpcError, allowed: frozenset[grpc.StatusCode] = CLIENT_CODES) -> str:
    """A call's error status: a code the caller can act on, with a message; INVALID_ARGUMENT names the field."""
    code = error.code()
    assert code in allowed, f"{code}: {error.details()}"
    assert error.details(), f"{code} without a message"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        names_its_fields(error.details(), bad_request_fields(error), "INVALID_ARGUMENT")
    return code.name


def check_error_status(status: common_pb2.ErrorStatus, allowed: frozenset[grpc.StatusCode] = CLIENT_CODES) -> str:
    """An error inside a stream (one sequence of a worker's stream, one index of a best-effort fan-out)."""
    error = MeshError.of_status(status)
    assert error.code in allowed, f"{error.code} in the stream: {status.message}"
    assert error.message, f"{error.code} in the stream without a message"
    if error.code == grpc.StatusCode.INVALID_ARGUMENT:
        fields = [
            v.field for d in error.details if isinstance(d, error_details_pb2.BadRequest) for v in d.field_violations
        ]
        names_its_fields(error.message, fields, "INVALID_ARGUMENT in the stream")
    return error.code.name


def call_label(call: Callable[[], Any], allowed: frozenset[grpc.StatusCode] = CLIENT_CODES) -> str:
    """OK, or the checked error's code name."""
    try:
        call()
    except grpc.RpcError as error:
        return check_rpc_error(error, allowed)
    return "OK"


def raw_unary(channel: grpc.Channel, method: str) -> Callable[..., bytes]:
    """A unary method called with bytes as they are (no serializer): what a client with a bug would send."""
    return channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)


def raw_stream(channel: grpc.Channel, method: str) -> Callable[..., Iterable[bytes]]:
    return channel.unary_stream(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
