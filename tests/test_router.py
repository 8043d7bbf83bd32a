"""The router with real workers on loopback: priority, fair share, shedding, deadlines, affinity, failover."""

from __future__ import annotations

import itertools
import signal
import threading
from contextlib import contextmanager

import grpc
import pytest
from grpc_status import rpc_status

from meshserve.v1 import common_pb2, router_pb2
from support import (
    WAIT_S,
    in_process_router,
    in_process_workers,
    router_stub,
    token_request,
    wait_for,
    wait_for_workers_up,
    worker_stats,
    workers_and_router,
    workers_behind_a_router,
)


@contextmanager
def router_with_workers(loop_thread, max_num_seqs: list[int], **router_config):
    """In-process workers (one torch thread each) and a router in front of them: the router's stub."""
    with workers_and_router(loop_thread, max_num_seqs, **router_config) as (router, _):
        yield router_stub(router.address)


class Recorder:
    """Runs requests on threads and numbers their first tokens and completions in the order they happen."""

    def __init__(self, stub) -> None:
        self.stub = stub
        self.counter = itertools.count()
        self.lock = threading.Lock()
        self.first_token: dict[str, int] = {}
        self.completed: dict[str, int] = {}
        self.errors: dict[str, grpc.RpcError] = {}
        self.threads: list[threading.Thread] = []

    def send(self, name: str, request, timeout: float = WAIT_S) -> None:
        def run() -> None:
            try:
                for chunk in self.stub.Generate(request, timeout=timeout):
                    if chunk.token_ids and name not in self.first_token:
                        with self.lock:
                            self.first_token[name] = next(self.counter)
                with self.lock:
                    self.completed[name] = next(self.counter)
            except grpc.RpcError as exc:
                self.errors[name] = exc

        thread = threading.Thread(target=run)
        thread.start()
        self.threads.append(thread)

    def join(self) -> None:
        for thread in self.threads:
            thread.join(WAIT_S)


def test_high_priority_starts_before_queued_low(loop_thread):
    with router_with_workers(loop_thread, [2]) as stub:
        recorder = Recorder(stub)
        for i in range(20):
            recorder.send(f"low{i}", token_request([5 + i, 6, 7], 60, common_pb2.PRIORITY_LOW))
        wait_for(lambda: len(recorder.first_token) >= 2, "the first tokens of two LOW requests", WAIT_S)
        started_before = set(recorder.first_token)
        for i in range(2):
            recorder.send(f"high{i}", token_request([9, 9 + i], 5, common_pb2.PRIORITY_HIGH))
        recorder.join()
    assert not recorder.errors
    later_lows = [recorder.first_token[f"low{i}"] for i in range(20) if f"low{i}" not in started_before]
    assert len(later_lows) >= 16
    for i in range(2):
        assert recorder.first_token[f"high{i}"] < min(later_lows)


def test_a_flooding_tenant_does_not_starve_another(loop_thread):
    with router_with_workers(loop_thread, [2]) as stub:
        recorder = Recorder(stub)
        for i in range(40):
            recorder.send(f"a{i}", token_request([5, 6, 7 + i], 8, tenant="a"))
        wait_for(lambda: len(recorder.first_token) >= 2, "the first tokens of two of tenant a's requests", WAIT_S)
        for i in range(4):
            recorder.send(f"b{i}", token_request([8, 9 + i], 8, tenant="b"))
        recorder.join()
    assert not recorder.errors
    a_done = sorted(recorder.completed[f"a{i}"] for i in range(40))
    b_done = [recorder.completed[f"b{i}"] for i in range(4)]
    # Fair share: B's four are served alongside A's backlog, well before A's last ten finish.
    assert max(b_done) < a_done[30]


def test_full_queue_sheds_batch_and_low_but_takes_high(loop_thread):
    with router_with_workers(loop_thread, [1], max_queued=3) as stub:
        recorder = Recorder(stub)
        recorder.send("running", token_request([5, 6], 400, common_pb2.PRIORITY_NORMAL))
        wait_for(lambda: "running" in recorder.first_token, "the running request's first token", WAIT_S)
        for i in range(3):
            recorder.send(f"queued{i}", token_request([7, i + 3], 4, common_pb2.PRIORITY_LOW))
        wait_for(lambda: queued(stub) == 3, "three queued LOW requests", WAIT_S)
        for priority in (common_pb2.PRIORITY_BATCH, common_pb2.PRIORITY_LOW):
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.Generate(token_request([8], 4, priority), timeout=10))
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "shed" in caught.value.details()
            assert retry_info(caught.value) is not None
        recorder.send("high", token_request([9, 10], 4, common_pb2.PRIORITY_HIGH))
        recorder.join()
        stats = stub.Stats(router_pb2.RouterStatsRequest(), timeout=5)
    assert "high" in recorder.completed and "running" in recorder.completed
    # The HIGH request took the place of the newest LOW one, which was told why.
    assert set(recorder.errors) == {"queued2"}
    assert recorder.errors["queued2"].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stats.shed == 3


def queued(stub) -> int:
    return sum(q.queued for q in stub.Stats(router_pb2.RouterStatsRequest(), timeout=5).queues)


def retry_info(error: grpc.RpcError):
    from google.rpc import error_details_pb2

    status = rpc_status.from_call(error)
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            return detail
    return None


def test_a_deadline_shorter_than_the_queue_wait_never_reaches_a_worker(loop_thread):
    with router_with_workers(loop_thread, [1]) as stub:
        recorder = Recorder(stub)
        # Long enough to hold the only seat past the 0.3 s deadline below even on the compiled fast path
        # (1,800 tokens at 0.5 ms or more each).
        recorder.send("running", token_request([5, 6], 1800))
        wait_for(lambda: "running" in recorder.first_token, "the running request's first token", WAIT_S)
        before = stub.Stats(router_pb2.RouterStatsRequest(), timeout=5)
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Generate(token_request([7, 8], 4), timeout=0.3))
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        after = wait_for(
            lambda: (stats := stub.Stats(router_pb2.RouterStatsRequest(), timeout=5)).deadline_exceeded and stats,
            "the router to count the deadline exceeded in its queue",
            timeout=5,
        )
        recorder.join()
    assert after.dispatched == before.dispatched
    assert after.deadline_exceeded == 1
    assert sum(q.queued for q in after.queues) == 0


def test_prefix_affinity_still_spreads_load(loop_thread):
    system = list(range(10, 90))  # one shared system prompt
    with router_with_workers(loop_thread, [2, 2, 2]) as stub:
        recorder = Recorder(stub)
        for i in range(6):
            recorder.send(f"r{i}", token_request([*system, 100 + i], 40))
        recorder.join()
        stats = stub.Stats(router_pb2.RouterStatsRequest(), timeout=5)
    assert not recorder.errors
    assert all(w.dispatched >= 1 for w in stats.workers), [w.dispatched for w in stats.workers]


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 0.9, "seed": 5}], ids=["greedy", "seeded"])
def test_a_killed_worker_mid_stream_is_resumed_elsewhere_without_a_gap(loop_thread, cache_dir, tmp_path, sampling):
    with workers_behind_a_router(loop_thread, 3, cache_dir, tmp_path) as mesh:
        stub = mesh.router
        params = {"max_tokens": 600, "ignore_eos": True, **sampling}
        request = common_pb2.TokenRequest(prompt_token_ids=[5, 6, 7, 8], sampling=common_pb2.SamplingParams(**params))
        reference = [t for chunk in stub.Generate(request, timeout=WAIT_S) for t in chunk.token_ids]
        assert len(reference) == 600

        tokens: list[int] = []
        finish = None
        killed = False
        for chunk in stub.Generate(request, timeout=WAIT_S):
            tokens.extend(chunk.token_ids)
            finish = chunk.finish_reason or finish
            if len(tokens) >= 20 and not killed:  # once: a just-killed process still polls as alive
                stats = stub.Stats(router_pb2.RouterStatsRequest(), timeout=5)
                serving = next(w.address for w in stats.workers if w.in_flight)
                mesh.process(serving).send_signal(signal.SIGKILL)
                killed = True
        assert tokens == reference
        assert finish == common_pb2.FINISH_REASON_LENGTH
        assert stub.Stats(router_pb2.RouterStatsRequest(), timeout=5).failovers == 1


def test_dns_discovery_finds_workers_behind_a_name(loop_thread):
    """localhost resolves to the loopback addresses; the worker listens on 127.0.0.1 and serves through it."""
    with (
        in_process_workers(loop_thread, [2]) as (worker,),
        in_process_router(loop_thread, f"dns:///localhost:{worker.port}", discovery_seconds=0.2) as router,
    ):
        stub = router_stub(router.address)
        wait_for_workers_up(stub, 1)
        chunks = list(stub.Generate(token_request([5, 6], 3), timeout=WAIT_S))
        assert sum(len(c.token_ids) for c in chunks) == 3
        addresses = {w.address for w in stub.Stats(router_pb2.RouterStatsRequest(), timeout=5).workers}
        assert f"127.0.0.1:{worker.port}" in addresses


def test_static_workers_and_bad_entries():
    from meshserve.router.discovery import Source, parse_sources

    assert parse_sources("127.0.0.1:1, [::1]:2,dns:///workers.llm:50061,k8s:///llm/meshserve-worker:grpc") == [
        Source("static", "127.0.0.1", "1"),
        Source("static", "[::1]", "2"),
        Source("dns", "workers.llm", "50061"),
        Source("k8s", "llm/meshserve-worker", "grpc"),
    ]
    for bad in ("", "nohost", "dns:///name:http", "k8s:///service-only:80", "ftp:///x:1"):
        with pytest.raises(ValueError, match="worker"):
            parse_sources(bad)


def test_kubernetes_discovery_reads_ready_endpoints_of_the_service():
    """Without a cluster: the EndpointSlice API answered by the kubernetes client's own models."""
    from kubernetes.client import (
        DiscoveryV1EndpointPort,
        V1Endpoint,
        V1EndpointConditions,
        V1EndpointSlice,
        V1EndpointSliceList,
    )

    from meshserve.router.discovery import resolve_endpoint_slices

    class FakeDiscoveryApi:
        """Stands in for the cluster's API server only (not for any meshserve service)."""

        def list_namespaced_endpoint_slice(self, namespace, label_selector):
            assert (namespace, label_selector) == ("llm", "kubernetes.io/service-name=meshserve-worker")
            endpoints = [
                V1Endpoint(addresses=["10.0.0.5"], conditions=V1EndpointConditions(ready=True)),
                V1Endpoint(addresses=["10.0.0.6"], conditions=V1EndpointConditions(ready=False)),  # draining
                V1Endpoint(addresses=["fd00::7"], conditions=V1EndpointConditions(ready=True)),
            ]
            ports = [
                DiscoveryV1EndpointPort(name="grpc", port=50061),
                DiscoveryV1EndpointPort(name="metrics", port=9090),
            ]
            return V1EndpointSliceList(items=[V1EndpointSlice(address_type="IPv4", endpoints=endpoints, ports=ports)])

    found = resolve_endpoint_slices("llm", "meshserve-worker", "grpc", api=FakeDiscoveryApi())
    assert found == {"10.0.0.5:50061", "[fd00::7]:50061"}
    assert resolve_endpoint_slices("llm", "meshserve-worker", "9000", api=FakeDiscoveryApi()) == {
        "10.0.0.5:9000",
        "[fd00::7]:9000",
    }


def test_a_draining_worker_gets_no_new_work(loop_thread):
    with workers_and_router(loop_thread, [2, 2]) as (router, workers):
        stub = router_stub(router.address)
        for drain in workers[0].on_drain:  # what SIGTERM does first, without stopping the server
            drain()
        draining = workers[0].address
        wait_for(lambda: worker_stats(stub)[draining].draining, "the router to see the worker draining", timeout=10)
        stats = worker_stats(stub)
        assert stats[draining].draining and not stats[draining].up
        recorder = Recorder(stub)
        for i in range(4):
            recorder.send(f"r{i}", token_request([5, 6 + i], 4))
        recorder.join()
        assert not recorder.errors and len(recorder.completed) == 4
        stats = worker_stats(stub)
        assert stats[workers[0].address].dispatched == 0
        assert stats[workers[1].address].dispatched == 4


def test_a_workers_load_counts_every_routers_sequences_and_what_this_one_sent_since():
    """Two routers share a worker: its report counts both routers' sequences; this router adds only what it
    sent that the report had not seen (its in-flight beyond the report's share of its own stream)."""
    from meshserve.router.workers import WorkerEndpoint
    from meshserve.v1 import worker_pb2

    worker = WorkerEndpoint("w:1", channel=None)  # type: ignore[arg-type]
    worker.in_flight = 5  # this router's: 3 the worker had counted when it reported, 2 sent since
    worker.load = worker_pb2.LoadReport(running_sequences=7, waiting_sequences=1, stream_sequences=3, max_num_seqs=8)
    assert worker.busy == 8 + 2  # 4 of another router's, 3 + 2 of ours, 1 waiting
    worker.connected = True
    assert not worker.has_room()
    worker.load.stream_sequences = 5
    assert worker.busy == 8 and not worker.has_room()
    worker.load.running_sequences, worker.load.waiting_sequences = 5, 0
    assert worker.busy == 5 and worker.has_room()
