"""Hypothesis throws 2,000 generated requests at each internal API (fuzz_support.INTERNAL_REQUESTS) of a mesh
with mutual TLS, each called directly with the certificate of the role it lets in: the router (Generate, Stats,
ListModels), the worker (its stream's commands, DescribeModel, GetLoad) and the aggregator (Generate). Services
inside the mesh trust no caller either: never INTERNAL or UNKNOWN, never a service down, every refusal names its
field, in a call's status or in the stream."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator

import grpc
import pytest
from hypothesis import strategies as st

from fuzz_messages import fan_out_requests, link_commands, list_models_requests, raw_messages, token_requests
from fuzz_strategies import MODEL, mostly
from fuzz_support import (
    CALL_TIMEOUT_S,
    INTERNAL_REQUESTS,
    assert_reached_workers,
    call_label,
    check_error_status,
    check_rpc_error,
    fuzz,
    raw_stream,
    raw_unary,
    share,
)
from meshserve.common.enums import FINISH_REASON_NAMES
from meshserve.v1 import (
    aggregator_pb2,
    aggregator_pb2_grpc,
    common_pb2,
    router_pb2,
    router_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from tls_mesh import TlsMesh, running_tls_mesh

COMMANDS_PER_STREAM = 4
STREAMS_AT_ONCE = 8  # a batch of streams, each with its commands, is as much as one hypothesis example holds
STREAM_WAIT_S = 30.0  # every sequence a stream submitted ends well within this (a few tokens, or its timeout_ms)
# A request for a model no worker serves waits in the router's queue for its deadline: it gets a short one.
UNSERVED_TIMEOUT_S = 0.5


@pytest.fixture(scope="module")
def tls_mesh(cache_dir, model_dir, tmp_path_factory) -> Iterator[TlsMesh]:
    directory = tmp_path_factory.mktemp("fuzz-internal")
    with running_tls_mesh(
        cache_dir, directory, worker_args=("--max-num-seqs", "32"), aggregator_args=("--max-n", "8")
    ) as mesh:
        yield mesh
        mesh.assert_serving()
        mesh.assert_no_tracebacks()


def timeout_for(request: common_pb2.TokenRequest) -> float:
    return CALL_TIMEOUT_S if request.model in ("", MODEL) else UNSERVED_TIMEOUT_S


def stream_label(chunks: Iterator[common_pb2.StreamChunk]) -> str:
    """Reads a stream to its end; errors inside it (best-effort fan-out) are checked as a call's status is."""
    label = "OK"
    for chunk in chunks:
        if chunk.HasField("error"):
            label = "error in stream: " + check_error_status(chunk.error)
    return label


# ---- router ----------------------------------------------------------------------------------------------------


def test_router_answers_any_request_of_a_gateway(tls_mesh):
    with tls_mesh.channel("router") as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        methods = {
            "Generate": lambda r: stream_label(stub.Generate(r, timeout=timeout_for(r))),
            "Stats": lambda r: stub.Stats(r, timeout=CALL_TIMEOUT_S),
            "ListModels": lambda r: stub.ListModels(r, timeout=CALL_TIMEOUT_S),
        }
        raw = {
            "Generate": raw_stream(channel, "/meshserve.v1.Router/Generate"),
            "Stats": raw_unary(channel, "/meshserve.v1.Router/Stats"),
            "ListModels": raw_unary(channel, "/meshserve.v1.Router/ListModels"),
        }

        def send(example: tuple[str, object]) -> str:
            method, message = example
            if isinstance(message, bytes):
                return "bytes " + call_label(lambda: list(raw[method](message, timeout=UNSERVED_TIMEOUT_S)))
            return call_label(lambda: methods[method](message))

        calls = mostly(
            st.tuples(st.just("Generate"), token_requests),
            st.tuples(st.just("Stats"), st.builds(router_pb2.RouterStatsRequest))
            | st.tuples(st.just("ListModels"), list_models_requests),
        )
        raw_calls = st.one_of(
            st.tuples(st.just("Generate"), raw_messages(token_requests)),
            st.tuples(st.just("Stats"), raw_messages(st.builds(router_pb2.RouterStatsRequest))),
            st.tuples(st.just("ListModels"), raw_messages(list_models_requests)),
        )
        examples = mostly(calls, raw_calls, one_in=5)
        outcomes = fuzz(examples, send, INTERNAL_REQUESTS)
    assert_reached_workers(outcomes, ["OK"], 0.2)
    tls_mesh.assert_serving()


# ---- worker ----------------------------------------------------------------------------------------------------


def run_stream(stub: worker_pb2_grpc.WorkerStub, commands: list[worker_pb2.LinkCommand]) -> list[str]:
    """One router's stream: sends the commands, waits until every submitted sequence ended (but those a cancel
    named, which may end or not), then closes it. One label per command."""
    submitted: Counter = Counter()
    cancelled = set()
    for command in commands:
        if command.HasField("submit"):
            submitted[command.submit.sequence_id] += 1
        else:
            cancelled.add(command.cancel.sequence_id)
    awaited = Counter({key: n for key, n in submitted.items() if key not in cancelled})
    ended: Counter = Counter()
    all_ended = threading.Event()
    if not awaited:
        all_ended.set()

    def requests() -> Iterator[worker_pb2.LinkCommand]:
        yield from commands
        all_ended.wait(STREAM_WAIT_S)

    labels = []
    try:
        for event in stub.Connect(requests(), timeout=STREAM_WAIT_S + 5):
            for output in event.outputs:
                chunk = output.chunk
                if chunk.HasField("error"):
                    labels.append("submit: " + check_error_status(chunk.error))
                elif chunk.finish_reason:
                    labels.append("submit: " + FINISH_REASON_NAMES[chunk.finish_reason])
                else:
                    continue
                ended[output.sequence_id] += 1
                assert ended[output.sequence_id] <= submitted[output.sequence_id], (
                    f"sequence {output.sequence_id} ended more often than it was submitted"
                )
                if all(ended[key] >= n for key, n in awaited.items()):
                    all_ended.set()
    except grpc.RpcError as error:
        check_rpc_error(error)
        raise AssertionError(f"the stream ended with {error.code().name}: {error.details()}") from None
    missing = {key: n - ended[key] for key, n in awaited.items() if ended[key] < n}
    assert not missing, f"sequences that never ended (id: how many): {missing}"
    labels += ["cancel"] * sum(command.HasField("cancel") for command in commands)
    labels += ["submit: cancelled"] * (len(commands) - len(labels))
    return labels


def test_worker_answers_any_stream_and_request_of_a_router(tls_mesh):
    with tls_mesh.channel("worker") as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        streams = st.lists(link_commands, min_size=COMMANDS_PER_STREAM, max_size=COMMANDS_PER_STREAM)
        outcomes = fuzz(
            streams,
            lambda commands: run_stream(stub, commands),
            share(INTERNAL_REQUESTS, 0.85),
            batch=STREAMS_AT_ONCE,
            per_example=COMMANDS_PER_STREAM,
        )
        assert_reached_workers(outcomes, ["submit: length", "submit: stop"], 0.2)

        def send(example: tuple[str, bytes]) -> str:
            method, payload = example
            return call_label(lambda: raw_unary(channel, f"/meshserve.v1.Worker/{method}")(payload, timeout=5))

        describe = st.tuples(st.just("DescribeModel"), raw_messages(st.builds(worker_pb2.DescribeModelRequest)))
        load = st.tuples(st.just("GetLoad"), raw_messages(st.builds(worker_pb2.GetLoadRequest)))
        fuzz(describe | load, send, share(INTERNAL_REQUESTS, 0.1))
        # A stream whose command does not parse is refused, naming it.
        connect = channel.stream_stream(
            "/meshserve.v1.Worker/Connect", request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        commands = raw_messages(link_commands).map(lambda payload: [payload])
        fuzz(
            commands,
            lambda payloads: call_label(lambda: list(connect(iter(payloads), timeout=5))),
            share(INTERNAL_REQUESTS, 0.05),
        )
    tls_mesh.assert_serving()


# ---- aggregator -----------------------------------------------------------------------------------------------


def test_aggregator_answers_any_fan_out_of_a_gateway(tls_mesh):
    with tls_mesh.channel("aggregator") as channel:
        stub = aggregator_pb2_grpc.AggregatorStub(channel)
        generate = raw_stream(channel, "/meshserve.v1.Aggregator/Generate")

        def send(example: aggregator_pb2.FanOutRequest | bytes) -> str:
            if isinstance(example, bytes):
                return "bytes " + call_label(lambda: list(generate(example, timeout=CALL_TIMEOUT_S)))
            timeout = timeout_for(example.request)
            return call_label(lambda: stream_label(stub.Generate(example, timeout=timeout)))

        examples = mostly(fan_out_requests, raw_messages(fan_out_requests), one_in=5)
        outcomes = fuzz(examples, send, INTERNAL_REQUESTS)
    assert_reached_workers(outcomes, ["OK"], 0.15)
    tls_mesh.assert_serving()
