"""meshserve.client against a real mesh: streams, whole answers, deadlines, retries and what is never retried."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from http_gateway import running_gateway
from meshserve.client import NO_RETRIES, AsyncClient, Client, MeshClientError, RetryPolicy, make_request
from meshserve.common.channels import wait_until_serving
from meshserve.common.errors import invalid_argument, resource_exhausted, unavailable
from meshserve.gateway.auth import hash_key
from meshserve.v1 import router_pb2
from support import HOST, in_process, router_stub, wait_for, worker_stats, workers_and_router

GREEDY = {"max_tokens": 24, "temperature": 0.0, "ignore_eos": True}
LONG = {"max_tokens": 1500, "temperature": 0.0, "ignore_eos": True}  # seconds of decoding on these CPUs


def gateway_requests(server: Any, code: str) -> float:
    """gRPC requests the gateway answered with `code`, over every model and priority."""
    return sum(
        sample.value
        for metric in server.metrics.collect()
        if metric.name == "meshserve_gateway_requests"
        for sample in metric.samples
        if sample.name.endswith("_total") and sample.labels["code"] == code and sample.labels["api"] == "grpc"
    )


def retries_logged(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "meshserve.client" and hasattr(r, "retry_code")]


# ---- streams and whole answers ---------------------------------------------------------------------------------


def test_stream_chunks_concatenate_to_the_whole_greedy_answer(gateway):
    with Client(gateway.grpc) as client:
        whole = client.generate("The mesh", **GREEDY)
        chunks = list(client.stream("The mesh", **GREEDY))
    assert whole.finish_reason == "length" and len(whole.token_ids) == 24 and whole.usage.completion_tokens == 24
    streamed = [c for c in chunks if not c.final]
    assert "".join(c.text for c in streamed) == whole.text
    assert [t for c in streamed for t in c.token_ids] == whole.token_ids
    assert streamed[-1].finish_reason == "length" and all(c.finish_reason is None for c in streamed[:-1])
    assert chunks[-1].final and chunks[-1].usage == whole.usage, chunks[-1]
    assert chunks[0].request_id and whole.request_id and whole.model == "meshserve-tiny"


def test_chat_messages_and_fan_out_come_back_typed(gateway):
    with Client(gateway.grpc) as client:
        chat = client.generate(messages=[{"role": "user", "content": "Hi!"}], **GREEDY)
        samples = client.generate("Hello", n=3, seed=7, max_tokens=8, ignore_eos=True)
        models = client.list_models()
    assert chat.text and chat.usage.prompt_tokens > 2
    assert [o.index for o in samples.outputs] == [0, 1, 2] and all(len(o.token_ids) == 8 for o in samples.outputs)
    assert samples.usage.completion_tokens == 24
    assert [m.name for m in models] == ["meshserve-tiny"] and not models[0].tokenizer_files


def test_leaving_a_stream_early_cancels_its_call(gateway):
    cancelled = gateway_requests(gateway.server, "CANCELLED")
    with Client(gateway.grpc) as client, client.stream("Go on", **LONG) as chunks:
        first = next(chunks)
    assert first.token_ids
    wait_for(lambda: gateway_requests(gateway.server, "CANCELLED") == cancelled + 1, "the gateway to see a cancel")


# ---- deadlines -------------------------------------------------------------------------------------------------


def test_a_deadline_that_expires_is_deadline_exceeded_and_not_retried(gateway):
    with Client(gateway.grpc, timeout=60) as client:
        with pytest.raises(MeshClientError) as unary:
            client.generate("Go on", timeout=0.01, **LONG)
        with pytest.raises(MeshClientError) as streamed:
            for _ in client.stream("Go on", timeout=0.5, **LONG):
                pass
    assert unary.value.code == grpc.StatusCode.DEADLINE_EXCEEDED, unary.value
    assert "deadline of 0.01 s" in str(unary.value) and unary.value.attempts == 1
    assert streamed.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and streamed.value.attempts == 1


# ---- what is and is not retried --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def limited_gateway(mesh, loop_thread, tmp_path_factory) -> Iterator[Any]:
    """A gateway whose tenant "limited" may send one request per second."""
    keys = tmp_path_factory.mktemp("client-keys") / "api-keys.json"
    tenants = [{"name": "limited", "requests_per_second": 1, "key_sha256": [hash_key("limited-key")]}]
    keys.write_text(json.dumps({"tenants": tenants}))
    with running_gateway(loop_thread, mesh, api_keys_file=str(keys)) as gateway:
        yield gateway


def test_a_rate_limited_call_waits_the_servers_retry_delay_then_succeeds(limited_gateway, caplog):
    caplog.set_level(logging.INFO, logger="meshserve.client")
    server = limited_gateway.server
    refused, answered = gateway_requests(server, "RESOURCE_EXHAUSTED"), gateway_requests(server, "OK")
    with Client(limited_gateway.grpc, api_key="limited-key") as client:
        client.generate("Hello", max_tokens=2)  # the tenant's one request of this second
        caplog.clear()
        started = time.monotonic()
        again = client.generate("Hello", max_tokens=2)
        waited = time.monotonic() - started
    assert again.outputs, "the retried call gave no answer"
    (retry,) = retries_logged(caplog)
    assert retry.retry_code == "RESOURCE_EXHAUSTED" and 0 < retry.retry_after_s <= retry.retry_delay_s
    assert waited >= retry.retry_delay_s, f"answered {waited:.2f} s after the call, before the retry's wait"
    assert gateway_requests(server, "RESOURCE_EXHAUSTED") == refused + 1
    assert gateway_requests(server, "OK") == answered + 2


def test_a_refusal_without_retries_carries_the_servers_retry_delay(limited_gateway):
    with Client(limited_gateway.grpc, api_key="limited-key", retry=NO_RETRIES) as client:
        with pytest.raises(MeshClientError) as caught:
            for _ in range(3):  # at one request per second, the second or third is refused
                client.generate("Hello", max_tokens=2)
    error = caught.value
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.attempts == 1
    assert error.retry_after is not None and 0 < error.retry_after <= 1.0, error.details


def test_errors_a_retry_cannot_fix_are_raised_at_once(limited_gateway, gateway, caplog):
    caplog.set_level(logging.INFO, logger="meshserve.client")
    with Client(limited_gateway.grpc, api_key="wrong-key") as client, pytest.raises(MeshClientError) as denied:
        client.generate("Hello", max_tokens=2)
    assert denied.value.code == grpc.StatusCode.UNAUTHENTICATED and denied.value.attempts == 1
    with Client(gateway.grpc) as client, pytest.raises(MeshClientError) as invalid:
        list(client.stream("Hello", max_tokens=2, temperature=-1.0))
    assert invalid.value.code == grpc.StatusCode.INVALID_ARGUMENT and invalid.value.attempts == 1
    assert [name for name, _ in invalid.value.field_violations] == ["sampling.temperature"], invalid.value
    assert not retries_logged(caplog)


@pytest.fixture
def two_workers_no_failover(model_dir, loop_thread) -> Iterator[SimpleNamespace]:
    """A gateway on a router over two workers that never resumes a stream elsewhere (--max-failovers 0): a
    worker that fails mid-stream fails the call with UNAVAILABLE, and a retry would find the other worker."""
    from meshserve.common.config import GatewayConfig
    from meshserve.gateway.server import start_gateway

    with workers_and_router(loop_thread, [4, 4], max_failovers=0) as (router, workers):
        config = GatewayConfig(host=HOST, port=0, http_port=-1, router=router.address, aggregator=f"{HOST}:1")
        with in_process(loop_thread, start_gateway(config)) as gateway:
            assert wait_until_serving(gateway.address, timeout=60), "the gateway never reported SERVING"
            yield SimpleNamespace(gateway=gateway, router=router_stub(router.address), workers=workers)


def test_a_stream_that_fails_after_its_first_token_is_not_retried(two_workers_no_failover, loop_thread):
    mesh = two_workers_no_failover
    dispatched = mesh.router.Stats(router_pb2.RouterStatsRequest(), timeout=5).dispatched
    received = 0
    retry = RetryPolicy(max_attempts=5, initial_backoff=0.01)
    with Client(mesh.gateway.address, retry=retry) as client, pytest.raises(MeshClientError) as caught:
        for chunk in client.stream("Go on", **LONG):
            if not received:  # the first tokens are here: stop the worker that makes them
                serving = wait_for(lambda: [a for a, w in worker_stats(mesh.router).items() if w.in_flight])
                (worker,) = [w for w in mesh.workers if w.address in serving]
                loop_thread.run(worker.stop(0))
            received += len(chunk.token_ids)
    error = caught.value
    assert error.code == grpc.StatusCode.UNAVAILABLE and error.attempts == 1, error
    assert 0 < error.tokens_received == received and f"after {received} tokens" in str(error), str(error)
    stats = mesh.router.Stats(router_pb2.RouterStatsRequest(), timeout=5)
    assert stats.dispatched == dispatched + 1, "the stream was sent again after it had produced tokens"
    with Client(mesh.gateway.address) as client:  # the other worker was there for a retry all along
        assert client.generate("Go on", **GREEDY).token_ids


# ---- asyncio ---------------------------------------------------------------------------------------------------


# The async tests run the client in the servers' loop (loop_thread), as a service would: grpc.aio keeps one poller
# per process, and clients in a second loop of the same process hit "Event loop is closed" callbacks.


def test_async_client_streams_the_whole_answer_and_cancels_on_aclose(gateway, loop_thread):
    async def main() -> tuple[Any, list[Any], Any]:
        async with AsyncClient(gateway.grpc) as client:
            whole = await client.generate("The mesh", **GREEDY)
            chunks = [chunk async for chunk in client.stream("The mesh", **GREEDY)]
            stream = client.stream("Go on", **LONG)
            first = await anext(stream)
            await stream.aclose()
            return whole, chunks, first

    cancelled = gateway_requests(gateway.server, "CANCELLED")
    whole, chunks, first = loop_thread.run(main())
    assert "".join(c.text for c in chunks) == whole.text and len(whole.token_ids) == 24
    assert [t for c in chunks for t in c.token_ids] == whole.token_ids and chunks[-1].final
    assert first.token_ids
    wait_for(lambda: gateway_requests(gateway.server, "CANCELLED") == cancelled + 1, "the gateway to see a cancel")


def test_async_deadline_is_deadline_exceeded(gateway, loop_thread):
    async def main() -> MeshClientError:
        async with AsyncClient(gateway.grpc, timeout=0.01) as client:
            with pytest.raises(MeshClientError) as expired:
                await client.generate("Go on", **LONG)
            return expired.value

    error = loop_thread.run(main())
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED and "deadline of 0.01 s" in str(error), error


def test_async_streams_refused_for_now_wait_and_then_stream(limited_gateway, loop_thread, caplog):
    caplog.set_level(logging.INFO, logger="meshserve.client")

    async def main() -> list[list[Any]]:
        async with AsyncClient(limited_gateway.grpc, api_key="limited-key") as client:

            async def read(prompt: str) -> list[Any]:
                return [chunk async for chunk in client.stream(prompt, max_tokens=2)]

            # Two at once for a tenant of one request per second: one at least is refused, waits and retries.
            return await asyncio.gather(read("Hello"), read("Hi"))

    answers = loop_thread.run(main())
    assert all(answer[-1].final and answer[-1].usage.completion_tokens == 2 for answer in answers), answers
    assert {r.retry_code for r in retries_logged(caplog)} == {"RESOURCE_EXHAUSTED"}


# ---- arguments -------------------------------------------------------------------------------------------------


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


def test_bad_tls_arguments_are_refused_naming_the_argument(tmp_path):
    with pytest.raises(ValueError, match=r"root_certificates: .* is not PEM"):
        Client(root_certificates=b"not a certificate")
    with pytest.raises(ValueError, match="root_certificates: cannot read"):
        Client(root_certificates=tmp_path / "missing.pem")
    with pytest.raises(ValueError, match="certificate_chain and private_key go together"):
        Client(certificate_chain=b"-----BEGIN CERTIFICATE-----\n")


def test_a_tls_client_never_falls_back_to_plaintext(gateway, tmp_path):
    cert, key = self_signed(tmp_path)
    # The gateway serves plaintext today: a TLS channel to it fails its handshake, as it should.
    with Client(gateway.grpc, root_certificates=cert, certificate_chain=cert, private_key=key, retry=NO_RETRIES) as c:
        with pytest.raises(MeshClientError) as caught:
            c.generate("Hello", max_tokens=2, timeout=10)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE, caught.value


def test_requests_are_checked_before_they_are_sent():
    with pytest.raises(ValueError, match="exactly one of prompt, messages or request"):
        make_request("Hi", messages=[("user", "Hi")])
    with pytest.raises(ValueError, match="bad sampling parameter"):
        make_request("Hi", max_tokenz=3)
    with pytest.raises(ValueError, match="priority must be one of critical, high"):
        make_request("Hi", priority="urgent")
    assert make_request(messages=[("user", "Hi")], priority="high", seed=3).sampling.seed == 3


def test_retry_policy_waits_for_retry_info_backs_off_and_stops():
    policy = RetryPolicy(max_attempts=3, initial_backoff=0.5, max_backoff=0.8, retry_info_jitter=0.2)

    def client_error(error: Any, attempts: int = 1, tokens: int = 0) -> MeshClientError:
        return MeshClientError(error.code, error.message, error.details, attempts=attempts, tokens_received=tokens)

    told = client_error(resource_exhausted("over the limit", 2.0))
    assert all(2.0 <= policy.delay(told, None) <= 2.4 for _ in range(50))
    backoffs = [policy.delay(client_error(unavailable("no worker"), attempts=2), None) for _ in range(50)]
    assert all(0 <= b <= 0.8 for b in backoffs) and len(set(backoffs)) > 1  # capped, and jittered
    assert policy.delay(client_error(unavailable("no worker"), attempts=3), None) is None  # the third was the last
    assert policy.delay(client_error(unavailable("no worker"), tokens=5), None) is None
    assert policy.delay(client_error(invalid_argument([("prompt", "empty")])), None) is None
    assert policy.delay(told, time.monotonic() + 1.0) is None  # its wait would pass the deadline


def test_a_whole_answer_the_mesh_cut_at_its_deadline_is_deadline_exceeded():
    # The gateway may answer OK with what came before the deadline ended the sequence ("cancelled"), racing the
    # caller's own expiry (here once in 24 calls with 0.01 s deadlines): the client reports the deadline all the same.
    from meshserve.client.base import ClientBase
    from meshserve.client.retry import Attempts
    from meshserve.v1 import common_pb2, inference_pb2

    cut = inference_pb2.GenerateResponse(
        completions=[inference_pb2.Completion(token_ids=[1, 2, 3], finish_reason=common_pb2.FINISH_REASON_CANCELLED)]
    )
    with pytest.raises(MeshClientError) as caught:
        ClientBase._completion(cut, Attempts(RetryPolicy(), 0.5))
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and "after 3 tokens" in str(caught.value)
    whole = inference_pb2.GenerateResponse(
        completions=[inference_pb2.Completion(token_ids=[1], finish_reason=common_pb2.FINISH_REASON_LENGTH)]
    )
    assert ClientBase._completion(whole, Attempts(RetryPolicy(), 0.5)).token_ids == [1]


def test_a_stream_the_mesh_cut_at_its_deadline_is_deadline_exceeded():
    # The stream's twin of the race above: the chunks that came are delivered, then the deadline is reported.
    from meshserve.client.client import ChunkStream
    from meshserve.client.retry import Attempts
    from meshserve.v1 import common_pb2, inference_pb2

    class Call(list):
        def cancel(self) -> None:
            pass

    def start(messages):
        return lambda timeout: Call(messages)

    cut = [
        inference_pb2.GenerateStreamResponse(token_ids=[1, 2]),
        inference_pb2.GenerateStreamResponse(token_ids=[3], finish_reason=common_pb2.FINISH_REASON_CANCELLED),
    ]
    chunks = ChunkStream(start(cut), Attempts(RetryPolicy(), 0.5))
    assert [next(chunks).token_ids, next(chunks).token_ids] == [[1, 2], [3]]
    with pytest.raises(MeshClientError) as caught:
        next(chunks)
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and caught.value.tokens_received == 3
    whole = [inference_pb2.GenerateStreamResponse(token_ids=[1], finish_reason=common_pb2.FINISH_REASON_LENGTH)]
    assert [c.token_ids for c in ChunkStream(start(whole), Attempts(RetryPolicy(), 0.5))] == [[1]]
