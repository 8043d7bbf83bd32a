"""The aggregator end to end: gateway -> aggregator -> router -> two workers, all real gRPC servers on loopback.

Every fan-out is checked against the same sub-requests sent alone through the gateway.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from meshserve.aggregator.chunking import split_text
from meshserve.common.errors import bad_request_fields, from_rpc_error
from meshserve.common.tokenizer import ModelTokenizer
from meshserve.v1 import (
    aggregator_pb2,
    aggregator_pb2_grpc,
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)

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
        stats = self.router.Stats(router_pb2.RouterStatsRequest(), timeout=5)
        return next((p for p in stats.parents if p.parent_id == request_id), None)

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


@pytest.fixture(scope="module")
def mesh(model_dir, loop_thread):
    """Two workers (8 seats, one torch thread each), a router, an aggregator with small bounds, a gateway."""
    from meshserve.aggregator.server import start_aggregator
    from meshserve.common.channels import wait_until_serving
    from meshserve.common.config import AggregatorConfig, GatewayConfig, RouterConfig, WorkerConfig
    from meshserve.gateway.server import start_gateway
    from meshserve.router.server import start_router
    from meshserve.worker.server import start_worker

    host = "127.0.0.1"
    workers = [
        loop_thread.run(start_worker(WorkerConfig(host=host, port=0, max_num_seqs=8, threads=1))) for _ in range(2)
    ]
    router = loop_thread.run(
        start_router(RouterConfig(host=host, port=0, workers=",".join(w.address for w in workers)))
    )
    aggregator = loop_thread.run(
        start_aggregator(
            AggregatorConfig(
                host=host,
                port=0,
                router=router.address,
                max_n=MAX_FANOUT,
                tenant_max_in_flight=TENANT_MAX_IN_FLIGHT,
            )
        )
    )
    gateway = loop_thread.run(
        start_gateway(
            GatewayConfig(host=host, port=0, http_port=-1, router=router.address, aggregator=aggregator.address)
        )
    )
    try:
        assert wait_until_serving(gateway.address, timeout=WAIT_S), "the gateway never reported SERVING"
        fan_out_mesh = FanOutMesh(gateway.address, aggregator.address, router.address, [w.address for w in workers])
        assert wait_for(
            lambda: (
                sum(w.up for w in fan_out_mesh.router.Stats(router_pb2.RouterStatsRequest(), timeout=5).workers) == 2
            )
        ), "the router never saw both workers up"
        yield fan_out_mesh
        for channel in fan_out_mesh.channels:
            channel.close()
    finally:
        for server in (gateway, aggregator, router, *workers):
            loop_thread.run(server.stop(0))


@pytest.fixture(scope="module")
def tokenizer(model_dir) -> ModelTokenizer:
    return ModelTokenizer.from_dir(model_dir)


def wait_for(condition, timeout: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


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


def test_n4_seeded_each_index_equals_its_derived_seed_alone(mesh):
    params = sampling(12, temperature=1.0, seed=1234)
    request = inference_pb2.GenerateRequest(prompt="Once upon a time", sampling=params, n=4)
    tokens, last, final = stream(mesh, request)
    assert sorted(tokens) == [0, 1, 2, 3]
    for index in range(4):
        expected = alone(mesh, with_seed(params, 1234 + index), prompt="Once upon a time")
        # Tokens concatenated in arrival order: equal only if no chunk of the index was reordered.
        assert tokens[index] == list(expected.token_ids), f"index {index} differs from seed {1234 + index} alone"
        assert last[index].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert last[index].usage.completion_tokens == 12
    assert len({tuple(t) for t in tokens.values()}) == 4, "four seeds gave identical samples"
    prompt_tokens = last[0].usage.prompt_tokens
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (prompt_tokens, 48)


def test_indices_interleave_as_they_come(mesh):
    """A short index finishes while a long one still streams: no head-of-line blocking by the slow index."""
    batch = inference_pb2.BatchInputs(
        inputs=[
            inference_pb2.BatchInput(prompt="The slow one", sampling=sampling(120, temperature=0.0)),
            inference_pb2.BatchInput(prompt="The fast one", sampling=sampling(2, temperature=0.0)),
        ]
    )
    order = [
        (m.index, bool(m.finish_reason))
        for m in mesh.inference.GenerateStream(inference_pb2.GenerateRequest(batch=batch), timeout=WAIT_S)
        if not m.final
    ]
    fast_done = order.index((1, True))
    slow_done = order.index((0, True))
    assert fast_done < slow_done
    assert any(index == 0 for index, _ in order[fast_done + 1 :]), "index 0 sent nothing after index 1 finished"


def test_best_of_4_returns_the_highest_mean_logprob(mesh):
    params = sampling(8, temperature=1.5, seed=77)
    request = inference_pb2.GenerateRequest(prompt="The river", sampling=params, n=1, best_of=4)
    tokens, last, final = stream(mesh, request)
    assert sorted(tokens) == [0]
    candidates = [alone(mesh, with_seed(params, 77 + j, logprobs=True), prompt="The river") for j in range(4)]
    means = [sum(lp.logprob for lp in c.logprobs) / len(c.logprobs) for c in candidates]
    best = max(range(4), key=lambda j: (means[j], -j))
    assert len({round(m, 5) for m in means}) == 4, f"candidates tie, the check would prove nothing: {means}"
    assert tokens[0] == list(candidates[best].token_ids), f"chose another than candidate {best} of means {means}"
    assert last[0].mean_logprob == pytest.approx(means[best], abs=1e-4)
    assert not last[0].logprobs, "log-probabilities were not asked for"
    # Every candidate's tokens are paid for.
    assert final.usage.completion_tokens == 4 * 8


def test_order_by_score_returns_every_sample_best_first(mesh):
    params = sampling(6, temperature=1.5, seed=5)
    request = inference_pb2.GenerateRequest(prompt="Lanterns", sampling=params, n=3, order_by_score=True)
    reply = mesh.inference.Generate(request, timeout=WAIT_S)
    assert [c.index for c in reply.completions] == [0, 1, 2]
    scores = [c.mean_logprob for c in reply.completions]
    assert scores == sorted(scores, reverse=True)
    samples = {tuple(alone(mesh, with_seed(params, 5 + j), prompt="Lanterns").token_ids) for j in range(3)}
    assert {tuple(c.token_ids) for c in reply.completions} == samples


def test_dedupe_leaves_out_identical_completions(mesh):
    greedy = sampling(6, temperature=0.0)
    request = inference_pb2.GenerateRequest(prompt="Copper", sampling=greedy, n=3, dedupe=True)
    tokens, _, final = stream(mesh, request)
    assert list(tokens) == [0], "three greedy samples are identical: one should remain"
    assert tokens[0] == list(alone(mesh, greedy, prompt="Copper").token_ids)
    assert final.usage.completion_tokens == 18


def test_batch_of_8_each_index_equals_its_prompt_alone(mesh):
    prompts = [f"Prompt number {i} about the {word}" for i, word in enumerate("abcdefgh")]
    params = [sampling(3 + i, temperature=0.0 if i % 2 else 0.8, seed=100 + i) for i in range(8)]
    batch = inference_pb2.BatchInputs(
        inputs=[inference_pb2.BatchInput(prompt=p, sampling=s) for p, s in zip(prompts, params, strict=True)]
    )
    tokens, last, final = stream(mesh, inference_pb2.GenerateRequest(batch=batch))
    assert sorted(tokens) == list(range(8))
    for i in range(8):
        assert tokens[i] == list(alone(mesh, params[i], prompt=prompts[i]).token_ids), f"index {i}"
        assert last[i].usage.completion_tokens == 3 + i
    assert final.usage.completion_tokens == sum(3 + i for i in range(8))
    assert final.usage.prompt_tokens == sum(last[i].usage.prompt_tokens for i in range(8))


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


def test_map_reduce_over_10x_the_context_equals_the_steps_by_hand(mesh, tokenizer):
    context = 2048
    text = long_text(tokenizer, 10 * context)
    map_template = "Summarize: {chunk}\nSummary:"
    reduce_template = "Combine these summaries:\n{outputs}\nFinal summary:"
    map_params = sampling(5, temperature=0.0)
    reduce_params = sampling(10, temperature=0.0)
    request = inference_pb2.GenerateRequest(
        request_id="map-reduce-10x",
        sampling=reduce_params,
        map_reduce=inference_pb2.MapReduce(
            text=text,
            map_template=map_template,
            reduce_template=reduce_template,
            chunk_tokens=1024,
            map_sampling=map_params,
        ),
    )
    tokens, last, final = stream(mesh, request, timeout=120)
    assert list(tokens) == [0]
    assert last[0].finish_reason == common_pb2.FINISH_REASON_LENGTH

    chunks = split_text(text, lambda s: len(tokenizer.encode(s, add_special_tokens=False)), 1024)
    assert len(chunks) >= 20
    assert " ".join(chunks).split() == text.split(), "the chunks lost or reordered words"
    children = mesh.parent("map-reduce-10x")
    assert children is not None and children.in_flight == 0
    assert children.dispatched == len(chunks) + 1  # every map call and the reduce
    assert children.peak_workers >= 2, "the map calls never ran on two workers at once"
    assert children.peak_in_flight >= 2

    with ThreadPoolExecutor(8) as pool:
        map_outputs = list(
            pool.map(lambda c: alone(mesh, map_params, prompt=map_template.replace("{chunk}", c)), chunks)
        )
    reduce_prompt = reduce_template.replace("{outputs}", "\n\n".join(o.text.strip() for o in map_outputs))
    by_hand = alone(mesh, reduce_params, prompt=reduce_prompt)
    assert tokens[0] == list(by_hand.token_ids)
    assert final.usage.completion_tokens == 5 * len(chunks) + 10
    map_prompt_tokens = sum(len(tokenizer.encode(map_template.replace("{chunk}", c))) for c in chunks)
    assert final.usage.prompt_tokens == map_prompt_tokens + by_hand.usage.prompt_tokens


def test_map_reduce_defaults_summarise(mesh, tokenizer):
    text = long_text(tokenizer, 3000)
    request = inference_pb2.GenerateRequest(
        sampling=sampling(8, temperature=0.0), map_reduce=inference_pb2.MapReduce(text=text)
    )
    reply = mesh.inference.Generate(request, timeout=120)
    assert len(reply.completions) == 1 and len(reply.completions[0].token_ids) == 8
    # Two chunks (default budget 1024 tokens) of up to 128 summary tokens each, then the reduce.
    assert reply.usage.prompt_tokens > 3000 and reply.usage.completion_tokens > 8


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


def test_best_effort_reports_the_failed_index_and_finishes_the_others(mesh):
    tokens, last, final = stream(mesh, too_long_batch(common_pb2.FAILURE_POLICY_BEST_EFFORT))
    assert last[1].finish_reason == common_pb2.FINISH_REASON_ERROR
    assert last[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "batch.inputs[1]" in last[1].error.message and "context" in last[1].error.message
    assert tokens.get(1, []) == []
    for index, prompt in ((0, "First"), (2, "Third")):
        assert last[index].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert tokens[index] == list(alone(mesh, sampling(6, temperature=0.0), prompt=prompt).token_ids)
    assert final.usage.completion_tokens == 12
    reply = mesh.inference.Generate(too_long_batch(common_pb2.FAILURE_POLICY_BEST_EFFORT), timeout=WAIT_S)
    assert [c.index for c in reply.completions] == [0, 1, 2]
    assert [len(c.errors) for c in reply.completions] == [0, 1, 0]


def test_fail_fast_cancels_the_siblings_and_returns_the_error(mesh):
    before = mesh.loads()
    request = too_long_batch(common_pb2.FAILURE_POLICY_FAIL_FAST)
    for item in (request.batch.inputs[0], request.batch.inputs[2]):
        item.sampling.max_tokens = LONG
    with pytest.raises(grpc.RpcError) as caught:
        stream(mesh, request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "batch.inputs[1]" in caught.value.details()
    assert any(f.startswith("batch.inputs[1].") for f in bad_request_fields(caught.value))
    # Left running, the siblings would take far longer than this and generate 2 x LONG tokens.
    assert wait_for(mesh.idle, timeout=5), "a sibling of the failed input kept running"
    generated = sum(a.generated_tokens - b.generated_tokens for a, b in zip(mesh.loads(), before, strict=True))
    assert generated < LONG // 4


def test_cancelling_the_parent_frees_every_worker_slot(mesh):
    # Siblings an earlier test cancelled may still be on their way to a worker: count from a quiet mesh.
    assert wait_for(mesh.quiet, timeout=20)
    before = mesh.loads()
    request = inference_pb2.GenerateRequest(
        request_id="cancel-me", prompt="Garden", sampling=sampling(LONG, temperature=1.0, seed=3), n=6
    )
    call = mesh.inference.GenerateStream(request, timeout=WAIT_S)
    next(call)
    assert wait_for(lambda: (p := mesh.parent("cancel-me")) is not None and p.in_flight == 6)
    assert len(mesh.parent("cancel-me").workers) == 2, "six children should spread over both workers"
    call.cancel()
    assert wait_for(mesh.idle, timeout=5), "worker slots stayed taken after the parent was cancelled"
    after = mesh.loads()
    cancelled = sum(a.sequences_cancelled - b.sequences_cancelled for a, b in zip(after, before, strict=True))
    finished = sum(a.sequences_finished - b.sequences_finished for a, b in zip(after, before, strict=True))
    assert (cancelled, finished) == (6, 0), (before, after)
    assert wait_for(lambda: mesh.parent("cancel-me").in_flight == 0)


def test_the_parent_deadline_bounds_every_sub_request(mesh):
    request = inference_pb2.GenerateRequest(prompt="Valley", sampling=sampling(LONG, temperature=1.0), n=4)
    with pytest.raises(grpc.RpcError) as caught:
        stream(mesh, request, timeout=1.0)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_for(mesh.idle, timeout=10), "sub-requests outlived the parent's deadline"


def test_priority_and_tenant_of_the_parent_reach_every_sub_request(mesh, tokenizer):
    parent = common_pb2.TokenRequest(
        request_id="low-tenant-t1",
        model="meshserve-tiny",
        prompt_token_ids=tokenizer.encode("Morning"),
        sampling=sampling(3, temperature=1.0),
        priority=common_pb2.PRIORITY_LOW,
        tenant="t1",
    )
    messages = list(mesh.aggregator.Generate(aggregator_pb2.FanOutRequest(request=parent, n=3), timeout=WAIT_S))
    assert messages[-1].final
    children = mesh.parent("low-tenant-t1")
    assert (children.priority, children.tenant, children.dispatched) == (common_pb2.PRIORITY_LOW, "t1", 3)
    request = inference_pb2.GenerateRequest(
        request_id="high-parent", prompt="Urgent", sampling=sampling(2), n=2, priority=common_pb2.PRIORITY_HIGH
    )
    mesh.inference.Generate(request, timeout=WAIT_S)
    assert mesh.parent("high-parent").priority == common_pb2.PRIORITY_HIGH


def test_fan_out_over_the_limit_is_invalid_argument_naming_the_field(mesh, tokenizer):
    cases = [
        (inference_pb2.GenerateRequest(prompt="x", n=1, best_of=MAX_FANOUT + 1), "best_of"),
        (inference_pb2.GenerateRequest(prompt="x", n=MAX_FANOUT + 1), "n"),
        (
            inference_pb2.GenerateRequest(
                best_of=2,
                batch=inference_pb2.BatchInputs(inputs=[inference_pb2.BatchInput(prompt="x")] * (MAX_FANOUT // 2 + 1)),
            ),
            "batch.inputs",
        ),
        (
            inference_pb2.GenerateRequest(
                map_reduce=inference_pb2.MapReduce(text=long_text(tokenizer, 4000), chunk_tokens=64)
            ),
            "map_reduce.text",
        ),
    ]
    for request, field in cases:
        request.sampling.max_tokens = 2
        with pytest.raises(grpc.RpcError) as caught:
            mesh.inference.Generate(request, timeout=WAIT_S)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
        assert bad_request_fields(caught.value) == [field], caught.value.details()
        assert str(MAX_FANOUT) in caught.value.details()


def test_a_tenant_over_its_concurrent_fan_out_is_resource_exhausted(mesh, tokenizer):
    def fan_out(tenant: str, n: int, max_tokens: int) -> aggregator_pb2.FanOutRequest:
        parent = common_pb2.TokenRequest(
            request_id=f"{tenant}-{n}",
            model="meshserve-tiny",
            prompt_token_ids=tokenizer.encode("Harbor"),
            sampling=sampling(max_tokens, temperature=1.0),
            tenant=tenant,
        )
        return aggregator_pb2.FanOutRequest(request=parent, n=n)

    # 24 sub-requests of tenant a hold its budget (16 run, 8 wait for a seat) for a few seconds.
    holding = mesh.aggregator.Generate(fan_out("a", 24, 100), timeout=WAIT_S)
    try:
        next(holding)
        with pytest.raises(grpc.RpcError) as caught:
            list(mesh.aggregator.Generate(fan_out("a", 17, 2), timeout=WAIT_S))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "'a'" in caught.value.details() and str(TENANT_MAX_IN_FLIGHT) in caught.value.details()
        retry = [d for d in from_rpc_error(caught.value).details if d.DESCRIPTOR.name == "RetryInfo"]
        assert retry and retry[0].retry_delay.ToMilliseconds() > 0
        # Another tenant is not held back by a's fan-outs (its sub-requests wait only for seats).
        other = list(mesh.aggregator.Generate(fan_out("b", 4, 2), timeout=WAIT_S))
        assert other[-1].final and other[-1].usage.completion_tokens == 8
    finally:
        holding.cancel()
    assert wait_for(mesh.idle)
    # Once a's first request is gone, its budget is free again.
    assert list(mesh.aggregator.Generate(fan_out("a", 17, 2), timeout=WAIT_S))[-1].final


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"prompt": "hi", "n": 3, "best_of": 2}, "best_of"),
        ({"prompt": "hi", "failure_policy": 9}, "failure_policy"),
        ({"batch": {"inputs": []}}, "batch.inputs"),
        ({"batch": {"inputs": [{"prompt": "ok"}, {"prompt": ""}]}}, "batch.inputs[1].prompt"),
        (
            {"batch": {"inputs": [{"prompt": "ok", "sampling": {"temperature": -1}}]}},
            "batch.inputs[0].sampling.temperature",
        ),
        ({"batch": {"inputs": [{"token_ids": {"ids": [10**6]}}]}}, "batch.inputs[0].token_ids"),
        ({"map_reduce": {"text": "  "}}, "map_reduce.text"),
        ({"map_reduce": {"text": "Some text.", "map_template": "no placeholder"}}, "map_reduce.map_template"),
        ({"map_reduce": {"text": "Some text.", "reduce_template": "none"}}, "map_reduce.reduce_template"),
        ({"map_reduce": {"text": "Some text.", "chunk_tokens": 5000}}, "map_reduce.chunk_tokens"),
        ({"map_reduce": {"text": "Some text.", "map_sampling": {"top_p": 2.0}}}, "map_reduce.map_sampling.top_p"),
    ],
)
def test_bad_fan_out_fields_are_invalid_argument_naming_the_field(mesh, request_fields, field):
    with pytest.raises(grpc.RpcError) as caught:
        mesh.inference.Generate(inference_pb2.GenerateRequest(**request_fields), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert field in bad_request_fields(caught.value), caught.value.details()
