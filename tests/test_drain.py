"""Graceful drain on real processes, as Kubernetes does it: SIGTERM to a worker pod under streaming load.

What the chart relies on (terminationGracePeriodSeconds a little above --drain-seconds): the worker reports
draining at once so the router sends it nothing new, lets every stream it holds finish, and exits well within
its drain timeout instead of waiting it out.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field

import grpc

from meshserve.v1 import common_pb2, router_pb2
from support import WAIT_S, token_request, wait_for, worker_stats, workers_behind_a_router

DRAIN_SECONDS = 40
STREAM_TOKENS = 300
STREAMS = 6


@dataclass
class Stream:
    """One streaming request run on a thread: the tokens it got, how it ended, or its error."""

    tokens: list[int] = field(default_factory=list)
    finish: int = 0
    error: grpc.RpcError | None = None
    done_at: float = 0.0
    thread: threading.Thread | None = None

    def run(self, stub, request) -> None:
        def consume() -> None:
            try:
                for chunk in stub.Generate(request, timeout=WAIT_S):
                    self.tokens.extend(chunk.token_ids)
                    self.finish = chunk.finish_reason or self.finish
            except grpc.RpcError as exc:
                self.error = exc
            self.done_at = time.monotonic()

        self.thread = threading.Thread(target=consume)
        self.thread.start()


def test_sigterm_drains_a_streaming_worker_and_new_work_goes_elsewhere(loop_thread, cache_dir, tmp_path):
    env = {
        "MESHSERVE_DRAIN_SECONDS": str(DRAIN_SECONDS),
        "MESHSERVE_MAX_NUM_SEQS": str(STREAMS),
    }
    streams: list[Stream] = []
    with workers_behind_a_router(loop_thread, 2, cache_dir, tmp_path, env) as mesh:
        stub, addresses = mesh.router, mesh.addresses
        for i in range(STREAMS):
            stream = Stream()
            stream.run(stub, token_request([5, 6, 7 + i], STREAM_TOKENS))
            streams.append(stream)
        wait_for(lambda: all(len(s.tokens) >= 5 for s in streams), "every stream's first tokens")
        in_flight = {address: w.in_flight for address, w in worker_stats(stub).items()}
        draining = max(addresses, key=lambda a: in_flight[a])
        other = next(a for a in addresses if a != draining)
        drained = mesh.process(draining)
        assert in_flight[draining] >= 1, in_flight

        drained.send_signal(signal.SIGTERM)
        terminated_at = time.monotonic()
        wait_for(lambda: worker_stats(stub)[draining].draining, "the router to see the worker draining", 5)
        dispatched_before = worker_stats(stub)[draining].dispatched
        in_flight_on_draining = worker_stats(stub)[draining].in_flight

        new_requests = [Stream() for _ in range(4)]
        for i, stream in enumerate(new_requests):
            stream.run(stub, token_request([9, 10 + i], 4))
        for stream in [*streams, *new_requests]:
            stream.thread.join(WAIT_S)
        drained.wait(DRAIN_SECONDS + 10)
        exited_at = time.monotonic()
        stats = stub.Stats(router_pb2.RouterStatsRequest(), timeout=5)

    log = mesh.log(draining)
    # Every stream that was running, on the draining worker too, ended normally and whole, without a failover.
    assert in_flight_on_draining >= 1
    for stream in streams:
        assert stream.error is None, f"a stream was cut: {stream.error}\n{log}"
        assert (len(stream.tokens), stream.finish) == (STREAM_TOKENS, common_pb2.FINISH_REASON_LENGTH)
    assert stats.failovers == 0
    # New work went to the other worker only.
    assert all(s.error is None and len(s.tokens) == 4 for s in new_requests)
    workers = {w.address: w for w in stats.workers}
    assert workers.get(draining) is None or workers[draining].dispatched == dispatched_before
    assert workers[other].dispatched >= 4 + (STREAMS - in_flight[draining])
    # The process exits once its streams are done, well within the drain timeout, and cleanly.
    assert drained.returncode == 0, log
    last_stream_done = max(s.done_at for s in streams)
    assert exited_at - terminated_at < DRAIN_SECONDS, f"exit took {exited_at - terminated_at:.1f} s\n{log}"
    assert exited_at - last_stream_done < 10, f"exit {exited_at - last_stream_done:.1f} s after the last stream\n{log}"
