"""The aggregator's test mesh (gateway -> aggregator -> router -> two workers, all in this process) and the
requests the aggregator tests send through it; the fixture is conftest.py's `fan_out_mesh`."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from contextlib import contextmanager

from meshserve.common.tokenizer import ModelTokenizer
from meshserve.v1 import (
    aggregator_pb2_grpc,
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from support import EventLoopThread, in_process_mesh

MAX_FANOUT = 32
TENANT_MAX_IN_FLIGHT = 40
WAIT_S = 60
LONG = 1500  # max_tokens of sub-requests that must be cancelled, never finished


class FanOutMesh:
    def __init__(self, gateway: str, aggregator: str, router: str, workers: list[str]) -> None:
        from meshserve.common.channels import sync_channel

        self.channels = [sync_channel(a) for a in (gateway, aggregator, router, *workers)]
        self.inference = inference_pb2_grpc.InferenceStub(self.channels[0])
        self.aggregator = aggregator_pb2_grpc.AggregatorStub(self.channels[1])
        self.router = router_pb2_grpc.RouterStub(self.channels[2])
        self.workers = [worker_pb2_grpc.WorkerStub(c) for c in self.channels[3:]]

    def loads(self) -> list[worker_pb2.LoadReport]:
        return [w.GetLoad(worker_pb2.GetLoadRequest(), timeout=5) for w in self.workers]

    def parent(self, request_id: str) -> router_pb2.ParentStats | None:
        """The parent its caller named `request_id` (the mesh's own id is another)."""
        stats = self.router.Stats(router_pb2.RouterStatsRequest(), timeout=5)
        return next((p for p in stats.parents if request_id in (p.client_request_id, p.parent_id)), None)

    def idle(self) -> bool:
        return all(load.running_sequences == 0 and load.waiting_sequences == 0 for load in self.loads())

    def quiet(self, settle_s: float = 1.0) -> bool:
        """Idle workers, nothing queued at the router or in flight to a worker, and no sequence leaving the
        workers for `settle_s` (a sub-request cancelled upstream may still reach a worker and end there)."""
        stats = self.router.Stats(router_pb2.RouterStatsRequest(), timeout=5)
        in_flight = sum(w.in_flight for w in stats.workers) + sum(q.queued for q in stats.queues)
        if in_flight or not self.idle():
            return False
        ended = [(load.sequences_finished, load.sequences_cancelled) for load in self.loads()]
        time.sleep(settle_s)
        return ended == [(load.sequences_finished, load.sequences_cancelled) for load in self.loads()]


@contextmanager
def running_fan_out_mesh(loop_thread: EventLoopThread) -> Iterator[FanOutMesh]:
    """Two workers (8 seats, one torch thread each), a router, an aggregator with small bounds, a gateway."""
    aggregator = {"max_n": MAX_FANOUT, "tenant_max_in_flight": TENANT_MAX_IN_FLIGHT}
    with in_process_mesh(loop_thread, seats=[8, 8], aggregator=aggregator, gateway={"http_port": -1}) as mesh:
        fan_out_mesh = FanOutMesh(mesh.gateway, mesh.aggregator, mesh.router, mesh.workers)
        try:
            yield fan_out_mesh
        finally:
            for channel in fan_out_mesh.channels:
                channel.close()


def sampling(max_tokens: int, **fields) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True, **fields)


def stream(mesh: FanOutMesh, request: inference_pb2.GenerateRequest, timeout: float = WAIT_S):
    """(tokens by index in arrival order, last message of each index, final message) of a streamed call."""
    tokens: dict[int, list[int]] = {}
    last: dict[int, inference_pb2.GenerateStreamResponse] = {}
    final = None
    for message in mesh.inference.GenerateStream(request, timeout=timeout):
        assert final is None, "a message came after the final one"
        if message.final:
            final = message
            continue
        assert message.index not in last or not last[message.index].finish_reason, (
            f"index {message.index} got a message after its finish"
        )
        tokens.setdefault(message.index, []).extend(message.token_ids)
        last[message.index] = message
    assert final is not None, "the stream ended without its final message"
    return tokens, last, final


def alone(mesh: FanOutMesh, params: common_pb2.SamplingParams, **input_fields) -> inference_pb2.Completion:
    """One input sent by itself (no fan-out) through the gateway."""
    reply = mesh.inference.Generate(inference_pb2.GenerateRequest(sampling=params, **input_fields), timeout=WAIT_S)
    assert len(reply.completions) == 1
    return reply.completions[0]


def with_seed(params: common_pb2.SamplingParams, seed: int, **changes) -> common_pb2.SamplingParams:
    copy = common_pb2.SamplingParams()
    copy.CopyFrom(params)
    copy.seed = seed
    for name, value in changes.items():
        setattr(copy, name, value)
    return copy


def long_text(tokenizer: ModelTokenizer, tokens: int) -> str:
    """Paragraphs of pseudo-English sentences, at least `tokens` tokens long."""
    rng = random.Random(42)
    words = (
        "the river mesh worker router token stream engine batch cache model prompt signal harbor lantern "
        "quiet valley morning copper garden under over through bright slow"
    ).split()
    paragraphs: list[str] = []
    while len(tokenizer.encode("\n\n".join(paragraphs))) < tokens:
        sentences = [
            " ".join(rng.choice(words) for _ in range(rng.randint(6, 18))).capitalize() + "."
            for _ in range(rng.randint(3, 8))
        ]
        paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs)


def too_long_batch(policy: int) -> inference_pb2.GenerateRequest:
    """Three inputs; the middle one is longer than the model's context."""
    return inference_pb2.GenerateRequest(
        failure_policy=policy,
        batch=inference_pb2.BatchInputs(
            inputs=[
                inference_pb2.BatchInput(prompt="First", sampling=sampling(6, temperature=0.0)),
                inference_pb2.BatchInput(token_ids=inference_pb2.TokenIds(ids=[7] * 2100)),
                inference_pb2.BatchInput(prompt="Third", sampling=sampling(6, temperature=0.0)),
            ]
        ),
    )
