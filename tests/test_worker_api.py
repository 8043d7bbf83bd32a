"""The engine's features as users see them over gRPC: logprobs, cached prompt tokens, load streams, limits."""

from __future__ import annotations

import threading

import grpc
import pytest

from meshserve.common.errors import MeshError, bad_request_fields
from meshserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc, worker_pb2, worker_pb2_grpc
from worker_client import generate_on_worker, violated_fields


def test_logprobs_and_top_alternatives_reach_the_caller(mesh):
    stub = inference_pb2_grpc.InferenceStub(mesh.channel(mesh.gateway))
    sampling = common_pb2.SamplingParams(max_tokens=5, temperature=0.0, logprobs=True, top_logprobs=3)
    request = inference_pb2.GenerateRequest(prompt="Tell me a story", sampling=sampling)
    [completion] = stub.Generate(request, timeout=60).completions
    assert [lp.token_id for lp in completion.logprobs] == list(completion.token_ids)
    for lp in completion.logprobs:
        assert len(lp.top_logprobs) == 3
        assert lp.top_logprobs[0].token_id == lp.token_id  # greedy picks the most likely
        assert lp.logprob == pytest.approx(lp.top_logprobs[0].logprob)
        assert lp.logprob <= 0
    streamed = [lp for c in stub.GenerateStream(request, timeout=60) for lp in c.logprobs]
    assert [lp.token_id for lp in streamed] == list(completion.token_ids)


def test_a_repeated_long_prompt_is_served_from_the_prefix_cache(mesh):
    stub = inference_pb2_grpc.InferenceStub(mesh.channel(mesh.gateway))
    system = "You are a careful assistant for the mesh. " * 12
    sampling = common_pb2.SamplingParams(max_tokens=3, temperature=0.0)
    first = stub.Generate(
        inference_pb2.GenerateRequest(prompt=system + "First question?", sampling=sampling), timeout=60
    )
    second = stub.Generate(inference_pb2.GenerateRequest(prompt=system + "Another one?", sampling=sampling), timeout=60)
    assert second.usage.cached_prompt_tokens >= 32
    assert second.usage.cached_prompt_tokens < second.usage.prompt_tokens
    assert first.usage.cached_prompt_tokens < second.usage.cached_prompt_tokens


@pytest.mark.parametrize(
    ("sampling", "field"),
    [
        ({"min_p": 1.5}, "sampling.min_p"),
        ({"repetition_penalty": 0.0}, "sampling.repetition_penalty"),
        ({"presence_penalty": 3.0}, "sampling.presence_penalty"),
        ({"frequency_penalty": -2.5}, "sampling.frequency_penalty"),
        ({"logprobs": True, "top_logprobs": 21}, "sampling.top_logprobs"),
        ({"top_logprobs": 2}, "sampling.top_logprobs"),
    ],
)
def test_bad_sampling_fields_are_invalid_argument(mesh, sampling, field):
    stub = inference_pb2_grpc.InferenceStub(mesh.channel(mesh.gateway))
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(inference_pb2.GenerateRequest(prompt="hi", sampling=sampling), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in bad_request_fields(caught.value)


def test_a_router_s_stream_carries_the_worker_s_load_while_work_runs(mesh):
    worker = worker_pb2_grpc.WorkerStub(mesh.channel(mesh.worker))
    inference = inference_pb2_grpc.InferenceStub(mesh.channel(mesh.gateway))
    reports: list[worker_pb2.LoadReport] = []
    done = threading.Event()

    def commands():  # a router that submits nothing: it only listens to the load
        done.wait(60)
        yield from ()

    link = worker.Connect(commands(), timeout=60)

    def generate() -> None:
        sampling = common_pb2.SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
        inference.Generate(inference_pb2.GenerateRequest(prompt="hello", sampling=sampling, n=3), timeout=60)

    thread = threading.Thread(target=generate)
    try:
        for event in link:
            assert not event.outputs  # other routers' sequences never show on this stream
            reports.append(event.load)
            if len(reports) == 1:
                thread.start()
            if (not thread.is_alive() and event.load.running_sequences == 0) or len(reports) > 500:
                break
    finally:
        done.set()
        link.cancel()
    thread.join(60)
    first = reports[0]
    assert first.total_kv_blocks > 0 and first.kv_block_size == 16 and first.max_num_seqs == 8
    assert max(r.running_sequences for r in reports) >= 1
    assert min(r.free_kv_blocks for r in reports) < first.total_kv_blocks
    assert reports[-1].free_kv_blocks == first.total_kv_blocks
    assert reports[-1].generated_tokens >= first.generated_tokens + 180
    assert max(r.tokens_per_second for r in reports) > 0
    assert not any(r.draining for r in reports)


@pytest.fixture(scope="module")
def small_worker(loop_thread):
    """A worker whose KV pool holds 256 tokens (16 blocks of 16)."""
    from meshserve.common.config import WorkerConfig
    from meshserve.worker.server import start_worker

    server = loop_thread.run(
        start_worker(WorkerConfig(host="127.0.0.1", port=0, threads=1, kv_cache_memory="1MiB", dtype="float32"))
    )
    yield server
    loop_thread.run(server.stop(0))


def test_prompt_beyond_the_kv_pool_is_resource_exhausted(small_worker):
    from meshserve.common.channels import sync_channel

    channel = sync_channel(small_worker.address)
    stub = worker_pb2_grpc.WorkerStub(channel)
    load = stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=10)
    capacity = load.total_kv_blocks * load.kv_block_size
    assert capacity == 256
    too_long = common_pb2.TokenRequest(
        prompt_token_ids=[5] * 250, sampling=common_pb2.SamplingParams(max_tokens=10, temperature=0.0)
    )
    with pytest.raises(MeshError) as caught:
        generate_on_worker(channel, too_long, timeout=10)
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "256" in caught.value.message and "--kv-cache-memory" in caught.value.message
    fits = common_pb2.TokenRequest(
        prompt_token_ids=[5] * 240, sampling=common_pb2.SamplingParams(max_tokens=16, temperature=0.0)
    )
    chunks = generate_on_worker(channel, fits)
    assert chunks[-1].finish_reason in (common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_STOP)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_a_resumed_sequence_continues_exactly_where_it_stopped(mesh, temperature):
    """Failover support: prompt + the tokens already sent, and the worker goes on with the same tokens."""
    channel = mesh.channel(mesh.worker)
    sampling = common_pb2.SamplingParams(max_tokens=20, temperature=temperature, seed=11, ignore_eos=True)
    sampling.repetition_penalty = 1.3  # penalties see the resumed tokens as output
    request = common_pb2.TokenRequest(prompt_token_ids=[5, 6, 7, 8, 9], sampling=sampling)
    full = [t for chunk in generate_on_worker(channel, request) for t in chunk.token_ids]
    assert len(full) == 20
    resumed = common_pb2.TokenRequest(prompt_token_ids=[5, 6, 7, 8, 9], sampling=sampling, resume_token_ids=full[:8])
    chunks = generate_on_worker(channel, resumed)
    assert [t for chunk in chunks for t in chunk.token_ids] == full[8:]
    assert chunks[-1].usage.completion_tokens == 20


def test_a_resume_with_every_token_gets_the_end_it_missed(mesh):
    """A worker died after sending a stream's last token and before its end: the resumed sequence on the
    next worker ends normally (finish, usage, the text held back), never with an error."""
    channel = mesh.channel(mesh.worker)
    prompt = [5, 6, 7, 8, 9]
    greedy = common_pb2.SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    first = generate_on_worker(channel, common_pb2.TokenRequest(prompt_token_ids=prompt, sampling=greedy))
    tokens = [t for chunk in first for t in chunk.token_ids]
    text = "".join(chunk.text for chunk in first)
    # Every token, and a stop string held back the last one's text: the end must bring it.
    held = common_pb2.SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, stop=[text[-1] + "\u2603"])
    for sampling in (greedy, held):
        resumed = common_pb2.TokenRequest(prompt_token_ids=prompt, sampling=sampling, resume_token_ids=tokens)
        chunks = generate_on_worker(channel, resumed)
        assert [t for chunk in chunks for t in chunk.token_ids] == []
        assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (5, 6)
    assert "".join(c.text for c in chunks) == text[-1], "the held-back text arrives with the end"
    # A stop token among the resumed tokens: the stream stops there, as it would have.
    stops = common_pb2.SamplingParams(max_tokens=6, temperature=0.0, stop_token_ids=[999])
    resumed = common_pb2.TokenRequest(prompt_token_ids=prompt, sampling=stops, resume_token_ids=[*tokens[:2], 999])
    chunks = generate_on_worker(channel, resumed)
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_STOP
    assert chunks[-1].usage.completion_tokens == 3
    # More tokens than the request allows is no failover but a lie: refused, naming the field.
    lie = common_pb2.TokenRequest(prompt_token_ids=prompt, sampling=greedy, resume_token_ids=[*tokens, tokens[0]])
    with pytest.raises(MeshError) as caught:
        generate_on_worker(channel, lie)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(caught.value) == ["resume_token_ids"]
