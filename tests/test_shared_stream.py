"""One stream per router and worker: many sequences share it, each step's outputs travel together, a cancel
frees only its own sequence, and a worker killed under several sequences of one stream loses no token."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from meshserve.common.channels import sync_channel
from meshserve.common.config import WorkerConfig
from meshserve.v1 import common_pb2, router_pb2, worker_pb2, worker_pb2_grpc
from meshserve.worker.server import start_worker
from support import WAIT_S, in_process, in_process_workers, wait_for, workers_behind_a_router
from worker_client import LinkClient, generate_on_worker


@pytest.fixture(scope="module")
def worker(loop_thread):
    with in_process_workers(loop_thread, [8]) as (server,):
        yield server


def long_request(tokens: int, **sampling) -> common_pb2.TokenRequest:
    params = {"max_tokens": tokens, "ignore_eos": True, "temperature": 0.0, **sampling}
    return common_pb2.TokenRequest(prompt_token_ids=[5, 6, 7], sampling=common_pb2.SamplingParams(**params))


def test_every_sequence_of_a_stream_advances_in_one_message_per_step(worker):
    tokens = 24
    with sync_channel(worker.address) as channel, LinkClient(channel) as link:
        for sequence_id in (1, 2, 3, 4):
            link.submit(sequence_id, long_request(tokens))
        received = {sequence_id: 0 for sequence_id in (1, 2, 3, 4)}
        finished: set[int] = set()
        output_events = shared = 0
        for event in link.events():
            if event.outputs:
                output_events += 1
                shared += len({o.sequence_id for o in event.outputs}) > 1
            for output in event.outputs:
                assert not output.chunk.HasField("error"), output.chunk.error
                received[output.sequence_id] += len(output.chunk.token_ids)
                if output.chunk.finish_reason:
                    assert output.chunk.usage.completion_tokens == tokens
                    finished.add(output.sequence_id)
            if finished == set(received):
                break
    assert received == {sequence_id: tokens for sequence_id in received}
    # 96 tokens in about one message per engine step (24 decode steps, a few prefill steps), not one per token.
    assert output_events <= tokens + 8, output_events
    assert shared >= tokens // 2, shared


def test_cancelling_one_sequence_frees_only_it_at_the_next_step(worker):
    with sync_channel(worker.address) as channel, LinkClient(channel) as link:
        link.submit(1, long_request(400))
        link.submit(2, long_request(60))
        after_cancel = {1: 0, 2: 0}  # tokens received after the cancel was sent
        cancelled_at = None
        freed = False
        for event in link.events():
            for output in event.outputs:
                if cancelled_at is not None:
                    after_cancel[output.sequence_id] += len(output.chunk.token_ids)
                if output.sequence_id == 2 and output.chunk.finish_reason:
                    assert output.chunk.usage.completion_tokens == 60
                    break
            else:
                if cancelled_at is None and event.outputs:
                    link.cancel(1)
                    cancelled_at = time.monotonic()
                if cancelled_at is not None and event.HasField("load") and event.load.running_sequences == 1:
                    freed = True
                continue
            break
    assert cancelled_at is not None and freed, "the worker never reported the cancelled sequence gone"
    # Outputs of the steps that ran while the cancel was on its way (client -> worker -> engine process, a few
    # 1-token steps of the tiny model on a loaded machine) may still come; never the rest of its 400.
    assert after_cancel[1] <= 8, after_cancel
    assert after_cancel[2] >= 40


def test_a_sequence_id_still_open_on_the_stream_is_refused(worker):
    with sync_channel(worker.address) as channel, LinkClient(channel) as link:
        link.submit(7, long_request(30))
        link.submit(7, long_request(30))
        errors, finished = [], 0
        for event in link.events():
            for output in event.outputs:
                if output.chunk.HasField("error"):
                    errors.append(output.chunk.error)
                finished += bool(output.chunk.finish_reason)
            if errors and finished:
                break
    assert len(errors) == 1 and errors[0].code == 3 and "sequence_id" in errors[0].message, errors
    assert finished == 1  # the first one ran to its end


def test_a_worker_killed_under_several_sequences_of_one_stream_loses_no_token(loop_thread, cache_dir, tmp_path):
    requests = [long_request(300), long_request(300, temperature=0.9, seed=3), long_request(300, seed=4)]
    requests[2].sampling.temperature = 0.7
    with workers_behind_a_router(loop_thread, 2, cache_dir, tmp_path) as mesh:
        stub = mesh.router
        references = [[t for c in stub.Generate(r, timeout=WAIT_S) for t in c.token_ids] for r in requests]
        streams: list[list[int]] = [[] for _ in requests]
        started = [threading.Event() for _ in requests]
        errors: list[BaseException] = []

        def consume(i: int) -> None:
            try:
                for chunk in stub.Generate(requests[i], timeout=WAIT_S):
                    streams[i].extend(chunk.token_ids)
                    if len(streams[i]) >= 10:
                        started[i].set()
            except BaseException as exc:  # reported below
                errors.append(exc)
                started[i].set()

        threads = [threading.Thread(target=consume, args=(i,)) for i in range(len(requests))]
        for thread in threads:
            thread.start()
        assert all(event.wait(WAIT_S) for event in started)
        stats = stub.Stats(router_pb2.RouterStatsRequest(), timeout=5)
        busiest = max(stats.workers, key=lambda w: w.in_flight)
        assert busiest.in_flight >= 2, [w.in_flight for w in stats.workers]  # 3 streams on 2 workers
        mesh.process(busiest.address).send_signal(signal.SIGKILL)
        for thread in threads:
            thread.join(WAIT_S)
        assert not errors, errors
        assert streams == references
        assert stub.Stats(router_pb2.RouterStatsRequest(), timeout=5).failovers == busiest.in_flight


def test_a_router_that_closes_its_side_cancels_what_it_left_open(worker):
    with sync_channel(worker.address) as channel:
        with LinkClient(channel) as link:
            link.submit(1, long_request(500))
            next(e for e in link.events() if e.outputs)
        stub = worker_pb2_grpc.WorkerStub(channel)
        deadline = time.monotonic() + WAIT_S
        while stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=5).running_sequences and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=5).running_sequences == 0


def test_a_stream_interval_sends_that_many_tokens_per_message_but_the_first_and_the_end_at_once(loop_thread):
    config = WorkerConfig(host="127.0.0.1", port=0, threads=1, dtype="float32", stream_interval=4)
    with in_process(loop_thread, start_worker(config)) as server, sync_channel(server.address) as channel:
        chunks = generate_on_worker(channel, long_request(14))
    sizes = [len(chunk.token_ids) for chunk in chunks]
    assert sizes[0] == 1 and sum(sizes) == 14, sizes
    assert all(size == 4 for size in sizes[1:-1]) and 1 <= sizes[-1] <= 4, sizes
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH and chunks[-1].usage.completion_tokens == 14


def test_a_worker_that_goes_silent_mid_stream_is_left_and_the_stream_resumes_elsewhere(
    loop_thread, cache_dir, tmp_path
):
    """SIGSTOP: the process lives and its connection stays open, but it sends nothing, not even its heartbeat."""
    request = long_request(200, temperature=0.8, seed=9)
    with workers_behind_a_router(loop_thread, 2, cache_dir, tmp_path) as mesh:
        stub = mesh.router
        reference = [t for c in stub.Generate(request, timeout=WAIT_S) for t in c.token_ids]
        tokens: list[int] = []
        frozen = None
        try:
            started = time.monotonic()
            for chunk in stub.Generate(request, timeout=WAIT_S):
                tokens.extend(chunk.token_ids)
                if frozen is None and len(tokens) >= 10:
                    stats = stub.Stats(router_pb2.RouterStatsRequest(), timeout=5)
                    address = next(w.address for w in stats.workers if w.in_flight)
                    with sync_channel(address) as channel:
                        before = worker_pb2_grpc.WorkerStub(channel).GetLoad(worker_pb2.GetLoadRequest(), timeout=5)
                    frozen = mesh.process(address)
                    frozen.send_signal(signal.SIGSTOP)
            elapsed = time.monotonic() - started
        finally:
            if frozen is not None:
                frozen.send_signal(signal.SIGCONT)
        assert frozen is not None
        assert tokens == reference
        stats = stub.Stats(router_pb2.RouterStatsRequest(), timeout=5)
        assert stats.failovers == 1
        assert elapsed < 3.0 + 30, elapsed  # the silence (3 s) plus the rest of the stream, far from the deadline
        # Thawed, the worker finds its router's stream gone: it cancels the sequence instead of finishing it
        # for nobody (the router had left it), and is taken back as a worker.
        with sync_channel(address) as channel:
            worker = worker_pb2_grpc.WorkerStub(channel)

            def left_alone() -> worker_pb2.LoadReport | None:
                load = worker.GetLoad(worker_pb2.GetLoadRequest(), timeout=5)
                idle = load.running_sequences == 0 and load.waiting_sequences == 0
                return load if idle and load.sequences_cancelled == before.sequences_cancelled + 1 else None

            load = wait_for(left_alone, "the thawed worker to cancel the sequence it was left with", 30)
        assert load.sequences_finished == before.sequences_finished  # the abandoned one was not finished


def engine_process_of(worker_pid: int) -> int:
    """The worker's engine process: its child that runs multiprocessing's spawn main (not the resource tracker)."""
    # Per thread: the worker starts its engine from a thread of its own.
    children = [
        c for task in Path(f"/proc/{worker_pid}/task").iterdir() for c in (task / "children").read_text().split()
    ]
    for child in children:
        command = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
        if b"spawn_main" in command:
            return int(child)
    raise AssertionError(f"worker {worker_pid} has no engine process among {children}")


@pytest.mark.parametrize(
    ("fault", "logged"),
    [
        (signal.SIGKILL, "the engine process died"),
        # Alive but making no step: after --engine-stall-seconds the worker ends it as if it had died.
        (signal.SIGSTOP, "it is wedged"),
    ],
    ids=["dies", "wedges"],
)
def test_a_worker_whose_engine_fails_stops_and_its_streams_resume_elsewhere(
    loop_thread, cache_dir, tmp_path, fault, logged
):
    """Without a working engine the worker cannot serve: it stops by itself, non-zero, for its supervisor to
    replace it, and the router resumes its stream on the other worker exactly."""
    request = long_request(300, temperature=0.7, seed=21)
    stall = {"MESHSERVE_ENGINE_STALL_SECONDS": "2"}
    with workers_behind_a_router(loop_thread, 2, cache_dir, tmp_path, env=stall) as mesh:
        stub = mesh.router
        reference = [t for c in stub.Generate(request, timeout=WAIT_S) for t in c.token_ids]
        tokens: list[int] = []
        serving = None
        for chunk in stub.Generate(request, timeout=WAIT_S):
            tokens.extend(chunk.token_ids)
            if serving is None and len(tokens) >= 10:
                stats = stub.Stats(router_pb2.RouterStatsRequest(), timeout=5)
                address = next(w.address for w in stats.workers if w.in_flight)
                serving = mesh.process(address)
                os.kill(engine_process_of(serving.pid), fault)
        assert serving is not None
        assert tokens == reference
        assert serving.wait(WAIT_S) != 0
        assert logged in mesh.log(address)
        assert stub.Stats(router_pb2.RouterStatsRequest(), timeout=5).failovers == 1
