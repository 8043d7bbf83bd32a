"""Requests that would make the mesh work hard before any bound is checked: each is bounded first, and what work
remains (tokenising a long prompt) runs off the gateway's event loop, so other streams keep flowing."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from meshserve.common.errors import bad_request_fields
from meshserve.common.tokenizer import ModelTokenizer
from meshserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc

CLIENT_OPTIONS = [("grpc.max_send_message_length", 64 * 1024 * 1024)]


def stub_of(gateway) -> inference_pb2_grpc.InferenceStub:
    return inference_pb2_grpc.InferenceStub(grpc.insecure_channel(gateway.grpc, options=CLIENT_OPTIONS))


def test_map_reduce_with_tiny_chunks_is_refused_before_the_text_is_split(gateway, monkeypatch):
    """Split into 4-token chunks, 200 KB of words would be ~tens of thousands of tokeniser calls, then refused."""
    calls = [0]
    encode = ModelTokenizer.encode

    def counted(self, text, add_special_tokens=True):
        calls[0] += 1
        return encode(self, text, add_special_tokens)

    monkeypatch.setattr(ModelTokenizer, "encode", counted)
    text = " ".join(f"word{i}" for i in range(30_000))
    request = inference_pb2.GenerateRequest(
        map_reduce=inference_pb2.MapReduce(text=text, chunk_tokens=4), sampling=common_pb2.SamplingParams(max_tokens=4)
    )
    with pytest.raises(grpc.RpcError) as caught:
        stub_of(gateway).Generate(request, timeout=120)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert calls[0] < 20, f"the text was tokenised {calls[0]} times before the refusal (expected a handful)"
    assert bad_request_fields(caught.value) == ["map_reduce.text"], caught.value.details()
    assert "at least" in caught.value.details() and "map_reduce.chunk_tokens" in caught.value.details()


def test_a_batch_is_bounded_in_all_not_only_per_input(gateway):
    """Eight inputs of 600 KB each pass the per-prompt bound one by one; together they are refused unread."""
    inputs = [inference_pb2.BatchInput(prompt="y" * 600_000) for _ in range(8)]
    request = inference_pb2.GenerateRequest(
        batch=inference_pb2.BatchInputs(inputs=inputs), sampling=common_pb2.SamplingParams(max_tokens=1)
    )
    with pytest.raises(grpc.RpcError) as caught:
        stub_of(gateway).Generate(request, timeout=120)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(caught.value) == ["batch.inputs"], caught.value.details()[:300]
    status, _, raw = gateway.post("/v1/completions", {"prompt": ["y" * 600_000] * 8, "max_tokens": 1})
    assert status == 400 and b"in all" in raw, raw[:300]


async def _largest_gap(stop: asyncio.Event, gaps: list[float]) -> None:
    """How long the loop went without running this coroutine, at most, until `stop`."""
    last = time.perf_counter()
    for _ in range(1_000_000):
        if stop.is_set():
            return
        await asyncio.sleep(0.002)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now


def test_tokenising_a_huge_prompt_does_not_stall_the_gateways_loop(gateway, loop_thread, tokenizer):
    prompt = "The router picks a worker for every request. " * 45_000  # ~2 MB, under MAX_PROMPT_BYTES
    started = time.perf_counter()
    tokenizer.encode(prompt)
    tokenising = time.perf_counter() - started
    stop, gaps = asyncio.Event(), []
    probe = asyncio.run_coroutine_threadsafe(_largest_gap(stop, gaps), loop_thread.loop)
    try:
        request = inference_pb2.GenerateRequest(prompt=prompt, sampling=common_pb2.SamplingParams(max_tokens=1))
        with pytest.raises(grpc.RpcError) as caught:  # longer than the context: refused once tokenised
            stub_of(gateway).Generate(request, timeout=120)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        loop_thread.loop.call_soon_threadsafe(stop.set)
        probe.result(30)
    stall = max(gaps)
    # Relative: tokenised on the loop, the loop stops for about as long as tokenising takes.
    assert stall < tokenising / 2, f"the loop stalled {stall:.2f} s; tokenising the prompt takes {tokenising:.2f} s"
