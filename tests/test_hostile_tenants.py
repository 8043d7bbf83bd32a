"""What one tenant or one connection can take from the others: quotas charged for all that was generated, a bounded
share of the router's queue, a deadline for every gRPC call, and HTTP connections that cannot be held open."""

from __future__ import annotations

import json
import select
import socket
import time

import grpc
import pytest

from http_gateway import running_gateway
from meshserve.common.config import GatewayConfig, RouterConfig
from meshserve.common.errors import MeshError
from meshserve.gateway.auth import Tenant, hash_key
from meshserve.gateway.rate_limit import RateLimiter
from meshserve.router.queue import RequestQueue
from meshserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from support import wait_for
from test_router_queue import CRITICAL, NORMAL, FakeClock, in_a_loop, waiting

KEY = "quota-key"
TOKENS_PER_MINUTE = 1_000_000


@pytest.fixture(scope="module")
def keyed(mesh, loop_thread, tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "api-keys.json"
    tenant = {"name": "metered", "tokens_per_minute": TOKENS_PER_MINUTE, "key_sha256": [hash_key(KEY)]}
    path.write_text(json.dumps({"tenants": [tenant]}))
    with running_gateway(loop_thread, mesh, api_keys_file=str(path)) as gateway:
        limits = gateway.server.infer.limits
        limits.clock = lambda: 0.0  # no refill: what a request is charged stays visible in the bucket
        yield gateway


def charged(gateway, loop_thread, call) -> float:
    """Tokens the tenant's bucket lost while `call` ran (a fresh bucket each time)."""
    limits = gateway.server.infer.limits
    loop_thread.run(_forget(limits))
    call()
    return TOKENS_PER_MINUTE - limits._tokens["metered"].level


async def _forget(limits: RateLimiter) -> None:
    limits._tokens.clear()


def generated_tokens(gateway) -> float:
    return sum(
        sample.value
        for metric in gateway.server.metrics.collect()
        for sample in metric.samples
        if sample.name == "meshserve_gateway_inter_token_latency_seconds_count"
    )


def test_a_cancelled_call_is_charged_what_was_generated_not_only_its_prompt(keyed, loop_thread, tokenizer):
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(keyed.grpc))
    prompt = "Once upon a time"
    sampling = common_pb2.SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    before = generated_tokens(keyed)

    def cancelled_half_way() -> None:
        future = stub.Generate.future(
            inference_pb2.GenerateRequest(prompt=prompt, sampling=sampling),
            metadata=[("authorization", f"Bearer {KEY}")],
            timeout=120,
        )
        wait_for(lambda: generated_tokens(keyed) - before >= 20, "20 tokens to reach the gateway", timeout=60)
        future.cancel()
        wait_for(lambda: "metered" in keyed.server.infer.limits._tokens and _settled(keyed), "the charge to settle")

    spent = charged(keyed, loop_thread, cancelled_half_way)
    prompt_tokens = len(tokenizer.encode(prompt))
    assert spent >= prompt_tokens + 20, f"charged {spent} tokens; the prompt is {prompt_tokens} and 20+ were generated"


def _settled(gateway) -> bool:
    bucket = gateway.server.infer.limits._tokens["metered"]
    return TOKENS_PER_MINUTE - bucket.level < 400  # the reservation (prompt + max_tokens) was given back


def test_a_batch_reserves_its_prompts_too(keyed, loop_thread, tokenizer):
    prompts = ["The router picks a worker for every request " * 20, "KV blocks are " * 40]
    request = inference_pb2.GenerateRequest(
        batch=inference_pb2.BatchInputs(inputs=[inference_pb2.BatchInput(prompt=p) for p in prompts]),
        sampling=common_pb2.SamplingParams(max_tokens=1),
    )
    infer = keyed.server.infer
    tenant = infer.authenticate(f"Bearer {KEY}")
    admission = loop_thread.run(infer.admit(request, tenant))
    admission.reservation.settle(0)
    prompt_tokens = sum(len(tokenizer.encode(p)) for p in prompts)
    assert admission.reservation.reserved >= prompt_tokens + 2, (admission.reservation.reserved, prompt_tokens)


def test_each_gateway_enforces_its_share_of_a_tenants_limits():
    limits = RateLimiter(clock=lambda: 0.0, replicas=4)
    tenant = Tenant("shared", tokens_per_minute=4000)
    limits.reserve(tenant, 1000)
    with pytest.raises(Exception, match="1000 tokens per minute"):
        limits.reserve(tenant, 1)


@in_a_loop
async def test_one_tenant_cannot_fill_the_router_queue_and_get_others_critical_refused():
    """Alone, a tenant may use the whole queue; once it is full, another tenant's arrival takes the place of
    the hog's newest request (the hog over its share), whatever its class; within its share, nobody's is taken."""
    clock = FakeClock()
    queue = RequestQueue(8, 10.0, clock=clock, tenant_share=RouterConfig().tenant_queue_share)
    hogs = [waiting(clock, f"hog{i}", NORMAL, tenant="hog") for i in range(8)]
    for pending in hogs:
        queue.push(pending)  # nobody else waits: the whole queue is the hog's to use
    urgent = waiting(clock, "urgent", CRITICAL, tenant="victim")
    queue.push(urgent)  # not refused: the hog's newest made room
    assert len(queue) == 8 and hogs[-1].assigned.done()
    with pytest.raises(MeshError, match="over its share"):
        hogs[-1].assigned.result()
    for i in range(3):
        queue.push(waiting(clock, f"other{i}", NORMAL, tenant="victim"))
    assert sum(p.assigned.done() for p in hogs) == 4  # down to its share (4 of 8), and no further
    with pytest.raises(MeshError, match="queue is full"):
        queue.push(waiting(clock, "one-more", NORMAL, tenant="victim"))  # the victim at its share, the hog too


def test_a_grpc_call_without_a_deadline_gets_the_gateways_longest(mesh, loop_thread):
    assert GatewayConfig().max_request_seconds <= 600
    with running_gateway(loop_thread, mesh, max_request_seconds=0.5) as gateway:
        stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(gateway.grpc))
        sampling = common_pb2.SamplingParams(max_tokens=2000, temperature=0.0, ignore_eos=True)
        with pytest.raises(grpc.RpcError) as caught:  # no timeout: it would run until it ends
            stub.Generate(inference_pb2.GenerateRequest(prompt="Once upon a time", sampling=sampling))
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, caught.value.details()


def closed_by_server(sock: socket.socket, trickle: bytes, every: float = 0.1, tries: int = 300) -> bytes | None:
    """Sends `trickle` a byte at a time until the server closes the connection; what it answered, or None if it
    never closed it."""
    answer = b""
    for i in range(tries):
        readable, _, _ = select.select([sock], [], [], every)
        if readable:
            data = sock.recv(65536)
            if not data:
                return answer
            answer += data
        try:
            sock.sendall(trickle[i % len(trickle) : i % len(trickle) + 1])
        except OSError:
            return answer
    return None


def test_slow_headers_and_trickled_bodies_are_cut(mesh, loop_thread):
    with running_gateway(loop_thread, mesh, http_keepalive_seconds=1.0, http_body_seconds=1.0) as gateway:
        host, port = gateway.http.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            assert closed_by_server(sock, b"X-Slow: aaaaaaaaaaaaaaaaaaaa\r\n") is not None, "slow headers held on"
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100000\r\n\r\n{"
            )
            answer = closed_by_server(sock, b'"a"')
            assert answer is not None, "a trickled body held the connection"
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
            assert b"http-body-seconds" in answer


def test_open_connections_are_bounded(mesh, loop_thread):
    with running_gateway(loop_thread, mesh, http_max_connections=4) as gateway:
        host, port = gateway.http.rsplit(":", 1)
        sockets = [socket.create_connection((host, int(port)), timeout=10) for _ in range(8)]
        try:
            time.sleep(0.5)  # let the server accept them all
            closed = []
            for sock in sockets:
                readable, _, _ = select.select([sock], [], [], 0.2)
                closed.append(bool(readable) and sock.recv(1) == b"")
            assert sum(closed) == 4, f"expected the 4 over the limit closed, got {closed}"
        finally:
            for sock in sockets:
                sock.close()
        wait_for(lambda: answers(gateway), "the API to answer once those connections closed")


def answers(gateway) -> bool:
    try:
        return gateway.get("/v1/models")[0] == 200
    except OSError:  # still over the limit: closed as it arrived
        return False
