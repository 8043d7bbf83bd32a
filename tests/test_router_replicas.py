"""Several routers: the gateway and the aggregator spread requests over them, and a stream whose router is
killed or frozen mid-way completes through another, every token exactly once (common/routers.py)."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import grpc
import pytest

from meshserve.common.channels import sync_channel, wait_until_serving
from meshserve.common.routers import router_targets
from meshserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc, router_pb2
from support import (
    HOST,
    WAIT_S,
    EventLoopThread,
    ServiceProcess,
    free_ports,
    in_process,
    in_process_workers,
    router_stub,
    service_env,
    start_service,
    stop_processes,
    wait_for,
    wait_for_workers_up,
    wait_until_ready,
)


@dataclass
class Replicas:
    gateway: str
    aggregator: str
    routers: list[ServiceProcess]

    def stats(self, router: ServiceProcess) -> router_pb2.RouterStats:
        return router_stub(router.address).Stats(router_pb2.RouterStatsRequest(), timeout=5)

    def serving(self) -> ServiceProcess:
        """The router a stream is running through now."""
        busy = [r for r in self.routers if any(w.in_flight for w in self.stats(r).workers)]
        assert len(busy) == 1, [r.address for r in busy]
        return busy[0]


@contextmanager
def replicas(loop_thread: EventLoopThread, cache_dir, tmp_path) -> Iterator[Replicas]:
    """Two in-process workers, two router processes over both (a test may kill them), and an in-process
    aggregator and gateway over both routers."""
    from meshserve.aggregator.server import start_aggregator
    from meshserve.common.config import AggregatorConfig, GatewayConfig
    from meshserve.gateway.server import start_gateway

    routers: list[ServiceProcess] = []
    with ExitStack() as stack:
        try:
            workers = stack.enter_context(in_process_workers(loop_thread, [8, 8]))
            addresses = ",".join(w.address for w in workers)
            env = service_env(cache_dir)
            for port in free_ports(2):
                args = ["router", "--port", str(port), "--workers", addresses, "--metrics-port", "0"]
                routers.append(start_service(args, f"{HOST}:{port}", env, tmp_path / f"router-{port}.log"))
            for router in routers:
                wait_until_ready(router)
                wait_for_workers_up(router_stub(router.address), 2)
            spec = ",".join(r.address for r in routers)
            aggregator = stack.enter_context(
                in_process(loop_thread, start_aggregator(AggregatorConfig(host=HOST, port=0, router=spec)))
            )
            config = GatewayConfig(host=HOST, port=0, http_port=-1, router=spec, aggregator=aggregator.address)
            gateway = stack.enter_context(in_process(loop_thread, start_gateway(config)))
            assert wait_until_serving(gateway.address, timeout=60)
            yield Replicas(gateway.address, aggregator.address, routers)
        finally:
            for router in routers:
                if router.process.poll() is None:
                    router.process.send_signal(signal.SIGCONT)
            stop_processes((r.process for r in routers), grace=0)


def long_request(**sampling) -> inference_pb2.GenerateRequest:
    params = {"max_tokens": 200, "ignore_eos": True, "temperature": 0.0, **sampling}
    return inference_pb2.GenerateRequest(prompt="Once upon a time", sampling=common_pb2.SamplingParams(**params))


def streamed(stub: inference_pb2_grpc.InferenceStub, request, on_token=None) -> tuple[list[int], str, list]:
    tokens: list[int] = []
    chunks = []
    for chunk in stub.GenerateStream(request, timeout=WAIT_S):
        tokens.extend(chunk.token_ids)
        chunks.append(chunk)
        if on_token is not None:
            on_token(tokens)
    return tokens, "".join(c.text for c in chunks), chunks


def test_a_router_list_is_checked_when_the_service_starts():
    assert router_targets("a:1, b:2") == ["a:1", "b:2"]
    assert router_targets("dns:///routers.mesh:50052") == ["dns:///routers.mesh:50052"]
    for bad in ("", "a:1,b", "http://a:1", "a:port"):
        with pytest.raises(ValueError, match="--router"):
            router_targets(bad)


@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"])
def test_a_stream_whose_router_fails_completes_exactly_through_the_other(loop_thread, cache_dir, tmp_path, fault):
    """Killed: its connection resets. Frozen: the connection stays open and silent, and the keep-alive
    (channels.KEEPALIVE_*) finds it. Either way the gateway resumes the stream on the other router from the
    tokens already relayed; the caller sees every token once and the same text."""
    with replicas(loop_thread, cache_dir, tmp_path) as mesh, sync_channel(mesh.gateway) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        reference, reference_text, _ = streamed(stub, long_request())
        failed: list[ServiceProcess] = []

        def fail_its_router(tokens: list[int]) -> None:
            if not failed and len(tokens) >= 10:
                failed.append(mesh.serving())
                failed[0].process.send_signal(getattr(signal, fault))

        started = time.monotonic()
        tokens, text, chunks = streamed(stub, long_request(), fail_its_router)
        elapsed = time.monotonic() - started
        assert failed, "the stream ended before its router was failed"
        assert tokens == reference and text == reference_text
        assert chunks[-1].final and chunks[-1].usage.completion_tokens == 200
        if fault == "SIGSTOP":
            assert elapsed < 5 + 30, elapsed  # the keep-alive's bound plus the stream, far from the deadline
        (other,) = [r for r in mesh.routers if r is not failed[0]]
        assert sum(w.dispatched for w in mesh.stats(other).workers) >= 2  # its share, and the resumed stream


def test_requests_spread_over_the_routers_and_fan_outs_survive_a_lost_router(loop_thread, cache_dir, tmp_path):
    with replicas(loop_thread, cache_dir, tmp_path) as mesh, sync_channel(mesh.gateway) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        short = inference_pb2.GenerateRequest(prompt="Hi", sampling=common_pb2.SamplingParams(max_tokens=2))
        for _ in range(6):
            stub.Generate(short, timeout=WAIT_S)
        assert all(mesh.stats(r).dispatched >= 2 for r in mesh.routers), [mesh.stats(r) for r in mesh.routers]
        # n=2 goes through the aggregator, whose sub-requests resume across routers too.
        fan_out = long_request()
        fan_out.n = 2
        reference = stub.Generate(fan_out, timeout=WAIT_S)
        killed: list[ServiceProcess] = []

        def kill_a_router(tokens: list[int]) -> None:
            if not killed and len(tokens) >= 20:
                killed.append(mesh.routers[0])
                killed[0].process.send_signal(signal.SIGKILL)

        tokens: dict[int, list[int]] = {0: [], 1: []}
        for chunk in stub.GenerateStream(fan_out, timeout=WAIT_S):
            tokens.setdefault(chunk.index, []).extend(chunk.token_ids)
            kill_a_router(tokens[0] + tokens[1])
        assert killed
        assert [tokens[c.index] for c in reference.completions] == [list(c.token_ids) for c in reference.completions]
        # The gateway's unary calls (models) go to the router that is left.
        wait_for(lambda: killed[0].process.poll() is not None, "the killed router to be reaped", 10)
        with pytest.raises(grpc.RpcError):
            router_stub(killed[0].address).Stats(router_pb2.RouterStatsRequest(), timeout=2)
        assert stub.ListModels(common_pb2.ListModelsRequest(names_only=True), timeout=10).models
