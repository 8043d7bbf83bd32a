"""Tenants, API keys and per-tenant rate limits, over HTTP and gRPC, on a gateway with a keys file."""

from __future__ import annotations

import functools
import io
import json
import os
import subprocess

import grpc
import openai
import pytest
from google.rpc import error_details_pb2

from http_gateway import running_gateway
from meshserve.common.errors import from_rpc_error
from meshserve.gateway.auth import ANONYMOUS, KeyStore, Tenant, hash_key, is_loopback, parse_keys
from meshserve.gateway.rate_limit import RateLimiter, TokenBucket
from meshserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc, router_pb2, router_pb2_grpc
from support import MESHSERVE, free_ports

TENANTS = [
    {"name": "acme", "max_priority": "high", "key_sha256": [hash_key("acme-key"), hash_key("acme-key-2")]},
    {"name": "slow", "requests_per_second": 0.2, "key_sha256": [hash_key("slow-key")]},
    {"name": "slow-grpc", "requests_per_second": 0.2, "key_sha256": [hash_key("slow-grpc-key")]},
    {"name": "frugal", "tokens_per_minute": 300, "key_sha256": [hash_key("frugal-key")]},
    {"name": "nightly", "max_priority": "low", "key_sha256": [hash_key("nightly-key")]},
]
SHORT = {"prompt": "Hello", "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "api-keys.json"
    path.write_text(json.dumps({"tenants": TENANTS}))
    return path


@pytest.fixture(scope="module")
def gateway(mesh, loop_thread, keys_file):
    with running_gateway(loop_thread, mesh, api_keys_file=str(keys_file)) as gateway:
        yield gateway


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def grpc_stub(gateway) -> inference_pb2_grpc.InferenceStub:
    return inference_pb2_grpc.InferenceStub(grpc.insecure_channel(gateway.grpc))


def grpc_key(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


def router_dispatched(mesh) -> int:
    stub = router_pb2_grpc.RouterStub(mesh.channel(mesh.router))
    return stub.Stats(router_pb2.RouterStatsRequest(), timeout=5).dispatched


@pytest.mark.parametrize("headers", [{}, bearer("wrong-key"), {"Authorization": "Basic YWNtZTprZXk="}, bearer("")])
def test_http_without_a_valid_key_is_401_and_reaches_no_router(gateway, mesh, headers):
    before = router_dispatched(mesh)
    for path in ("/v1/completions", "/v1/chat/completions"):
        status, _, raw = gateway.post(path, {**SHORT, "messages": [{"role": "user", "content": "x"}]}, headers)
        assert status == 401, raw
        error = json.loads(raw)["error"]
        assert error["type"] == "authentication_error" and "API key" in error["message"]
    status, _, _ = gateway.get("/v1/models", headers)
    assert status == 401
    assert router_dispatched(mesh) == before


def test_auth_comes_before_any_router_call(mesh, loop_thread, keys_file):
    # Nothing listens on the router's address: a 401 proves the gateway never tried it.
    with running_gateway(loop_thread, mesh, api_keys_file=str(keys_file), router="127.0.0.1:1") as lonely:
        status, _, _ = lonely.post("/v1/completions", {**SHORT, "model": "meshserve-tiny"}, bearer("nope"))
        assert status == 401
        status, _, raw = lonely.post("/v1/completions", {**SHORT, "model": "meshserve-tiny"}, bearer("acme-key"))
        assert status == 404 and "none yet" in json.loads(raw)["error"]["message"]


def test_grpc_without_a_valid_key_is_unauthenticated(gateway):
    stub = grpc_stub(gateway)
    request = inference_pb2.GenerateRequest(prompt="Hello", sampling=common_pb2.SamplingParams(max_tokens=2))
    for metadata in ([], grpc_key("wrong-key"), [("authorization", "acme-key")]):
        for call in (stub.Generate, lambda r, **kw: list(stub.GenerateStream(r, **kw))):
            with pytest.raises(grpc.RpcError) as caught:
                call(request, timeout=10, metadata=metadata)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        stub.ListModels(common_pb2.ListModelsRequest(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_valid_keys_work_on_both_apis_and_every_key_of_a_tenant(gateway):
    for key in ("acme-key", "acme-key-2"):
        client = openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0)
        assert client.completions.create(model="meshserve-tiny", **SHORT).choices
    request = inference_pb2.GenerateRequest(prompt="Hello", sampling=common_pb2.SamplingParams(max_tokens=2))
    reply = grpc_stub(gateway).Generate(request, timeout=30, metadata=grpc_key("acme-key"))
    assert reply.completions[0].token_ids


def test_priority_above_the_tenants_ceiling_is_refused_on_both_apis(gateway):
    client = openai.OpenAI(base_url=gateway.base_url, api_key="acme-key", max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as caught:
        client.completions.create(model="meshserve-tiny", **SHORT, extra_body={"priority": "critical"})
    assert caught.value.body["param"] == "priority"
    assert "at most high" in caught.value.body["message"]
    assert client.completions.create(model="meshserve-tiny", **SHORT, extra_body={"priority": "high"}).choices

    request = inference_pb2.GenerateRequest(
        prompt="Hello", priority=common_pb2.PRIORITY_CRITICAL, sampling=common_pb2.SamplingParams(max_tokens=2)
    )
    with pytest.raises(grpc.RpcError) as caught:
        grpc_stub(gateway).Generate(request, timeout=10, metadata=grpc_key("acme-key"))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    (info,) = [d for d in from_rpc_error(caught.value).details if isinstance(d, error_details_pb2.ErrorInfo)]
    assert info.reason == "PRIORITY_ABOVE_TENANT_CEILING" and info.metadata["max_priority"] == "high"


def test_admitted_requests_carry_the_tenant_and_a_default_priority_within_the_ceiling(mesh, loop_thread, keys_file):
    from meshserve.common.channels import aio_channel
    from meshserve.common.config import GatewayConfig
    from meshserve.common.models import ModelCatalog
    from meshserve.common.renewing_channel import RenewingChannel
    from meshserve.common.routers import Routers
    from meshserve.gateway.infer import Infer
    from meshserve.gateway.mesh_client import MeshClient

    async def admitted(key: str, priority: int) -> common_pb2.TokenRequest:
        routers = Routers(mesh.router)
        aggregator_channel = RenewingChannel(functools.partial(aio_channel, mesh.aggregator), None, "aggregator")
        try:
            client = MeshClient(routers, aggregator_channel)
            catalog = ModelCatalog(routers)
            await catalog.refresh()
            core = Infer(GatewayConfig(), catalog, client, KeyStore(str(keys_file)), RateLimiter())
            request = inference_pb2.GenerateRequest(prompt="Hello", priority=priority)
            admission = await core.admit(request, core.authenticate(f"Bearer {key}"))
            return admission.validated.token_request
        finally:
            await routers.close()
            await aggregator_channel.close()

    acme = loop_thread.run(admitted("acme-key", common_pb2.PRIORITY_UNSPECIFIED))
    assert (acme.tenant, acme.priority) == ("acme", common_pb2.PRIORITY_NORMAL)
    nightly = loop_thread.run(admitted("nightly-key", common_pb2.PRIORITY_UNSPECIFIED))
    assert (nightly.tenant, nightly.priority) == ("nightly", common_pb2.PRIORITY_LOW)
    assert loop_thread.run(admitted("nightly-key", common_pb2.PRIORITY_BATCH)).priority == common_pb2.PRIORITY_BATCH


def test_a_tenant_over_its_request_rate_gets_429_and_another_tenant_does_not(gateway):
    status, _, _ = gateway.post("/v1/completions", SHORT, bearer("slow-key"))
    assert status == 200
    status, headers, raw = gateway.post("/v1/completions", SHORT, bearer("slow-key"))
    assert status == 429, raw
    error = json.loads(raw)["error"]
    assert error["type"] == "rate_limit_error" and "requests per second" in error["message"]
    assert 1 <= int(headers["Retry-After"]) <= 5
    status, _, _ = gateway.post("/v1/completions", SHORT, bearer("acme-key"))
    assert status == 200, "one tenant's limit held up another tenant"


def test_grpc_rate_limit_is_resource_exhausted_with_retry_info(gateway):
    stub = grpc_stub(gateway)
    request = inference_pb2.GenerateRequest(prompt="Hello", sampling=common_pb2.SamplingParams(max_tokens=2))
    stub.Generate(request, timeout=30, metadata=grpc_key("slow-grpc-key"))
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(request, timeout=30, metadata=grpc_key("slow-grpc-key"))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    (retry,) = [d for d in from_rpc_error(caught.value).details if isinstance(d, error_details_pb2.RetryInfo)]
    assert 0 < retry.retry_delay.ToMilliseconds() <= 5000
    assert stub.Generate(request, timeout=30, metadata=grpc_key("acme-key")).completions


def test_a_tenant_over_its_tokens_per_minute_is_limited_by_tokens_not_requests(gateway):
    long = {"prompt": "Hello", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
    status, _, raw = gateway.post("/v1/completions", long, bearer("frugal-key"))
    assert status == 200, raw
    status, headers, raw = gateway.post("/v1/completions", long, bearer("frugal-key"))
    assert status == 429 and "tokens per minute" in json.loads(raw)["error"]["message"]
    assert int(headers["Retry-After"]) >= 10  # about 100 tokens short at 5 tokens a second
    status, _, raw = gateway.post("/v1/completions", {**long, "max_tokens": 20}, bearer("frugal-key"))
    assert status == 200, raw  # a smaller request still fits what is left
    status, _, _ = gateway.post("/v1/completions", long, bearer("acme-key"))
    assert status == 200


def test_token_bucket_charges_what_was_used_and_keeps_tenants_apart():
    now = [0.0]
    limits = RateLimiter(clock=lambda: now[0])
    frugal = Tenant("frugal", tokens_per_minute=600)  # 10 tokens a second, 600 at most
    reservation = limits.reserve(frugal, 500)
    reservation.settle(100)  # asked for 500, used 100: 400 come back
    limits.reserve(frugal, 500).settle(500)
    with pytest.raises(Exception, match=r"retry in 50\.00 s"):  # the bucket is empty: 500 short at 10 a second
        limits.reserve(frugal, 500)
    assert limits.reserve(Tenant("other", tokens_per_minute=600), 500)  # another tenant: its own bucket
    now[0] += 50
    limits.reserve(frugal, 500)
    # A request larger than the whole bucket runs when the bucket is full, and what it used beyond is debt.
    bucket = TokenBucket(per_second=1, capacity=10, now=0)
    assert bucket.take(50, now=0) == 0 and bucket.level == 0
    bucket.give_back(10 - 30, now=0)  # reserved 10, used 30
    assert bucket.take(1, now=0) == pytest.approx(21)


def test_request_rate_allows_a_burst_of_one_second():
    now = [0.0]
    limits = RateLimiter(clock=lambda: now[0])
    tenant = Tenant("busy", requests_per_second=3)
    for _ in range(3):
        limits.admit(tenant)
    with pytest.raises(Exception, match="3 requests per second"):
        limits.admit(tenant)
    now[0] += 0.34
    limits.admit(tenant)
    limits.admit(ANONYMOUS)  # no limits


def test_priority_ceiling_rules():
    acme = Tenant("acme", max_priority=common_pb2.PRIORITY_HIGH)
    assert acme.priority_for(common_pb2.PRIORITY_UNSPECIFIED) == common_pb2.PRIORITY_NORMAL
    assert acme.priority_for(common_pb2.PRIORITY_HIGH) == common_pb2.PRIORITY_HIGH
    assert acme.priority_for(common_pb2.PRIORITY_BATCH) == common_pb2.PRIORITY_BATCH
    assert acme.priority_for(42) == 42  # out of range: validation names it
    with pytest.raises(Exception, match="at most high, got critical"):
        acme.priority_for(common_pb2.PRIORITY_CRITICAL)
    batch_only = Tenant("nightly", max_priority=common_pb2.PRIORITY_BATCH)
    assert batch_only.priority_for(common_pb2.PRIORITY_UNSPECIFIED) == common_pb2.PRIORITY_BATCH


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ([], "JSON object"),
        ({"tenants": [{"name": "a", "key_sha256": ["abc"]}]}, "tenants[0].key_sha256[0]"),
        ({"tenants": [{"name": "a", "key_sha256": []}]}, "tenants[0].key_sha256"),
        ({"tenants": [{"name": "a b", "key_sha256": [hash_key("k")]}]}, "tenants[0].name"),
        ({"tenants": [{"name": "a", "max_priority": "top", "key_sha256": [hash_key("k")]}]}, "max_priority"),
        ({"tenants": [{"name": "a", "requests_per_second": -1, "key_sha256": [hash_key("k")]}]}, "requests_per"),
        ({"tenants": [{"name": "a", "request_per_second": 1, "key_sha256": [hash_key("k")]}]}, "unknown fields"),
        (
            {"tenants": [{"name": "a", "key_sha256": [hash_key("k")]}, {"name": "b", "key_sha256": [hash_key("k")]}]},
            "also a key of tenant 'a'",
        ),
    ],
)
def test_a_bad_keys_file_is_refused_naming_the_entry(data, problem):
    with pytest.raises(ValueError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        parse_keys(data)


def test_keys_file_changes_are_picked_up(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"tenants": [{"name": "a", "key_sha256": [hash_key("old")]}]}))
    keys = KeyStore(str(path), recheck_seconds=0)
    assert keys.authenticate("Bearer old").name == "a"
    path.write_text(json.dumps({"tenants": [{"name": "b", "key_sha256": [hash_key("new")]}]}))
    os.utime(path, (1, 1))  # a different mtime even within the clock's resolution
    assert keys.authenticate("bearer new").name == "b"
    with pytest.raises(Exception, match="invalid API key"):
        keys.authenticate("Bearer old")
    path.write_text("{ half written")
    os.utime(path, (2, 2))
    assert keys.authenticate("Bearer new").name == "b"  # a broken file keeps the keys that worked


def test_no_keys_on_a_public_address_refuses_to_start_unless_allowed(keys_file):
    from meshserve.common.config import GatewayConfig
    from meshserve.gateway.server import key_store

    # start_gateway calls key_store before it binds anything (the command's test below shows it end to end).
    with pytest.raises(SystemExit, match="--allow-unauthenticated"):
        key_store(GatewayConfig(host="0.0.0.0"))
    assert not key_store(GatewayConfig(host="0.0.0.0", allow_unauthenticated=True)).required
    assert key_store(GatewayConfig(host="0.0.0.0", api_keys_file=str(keys_file))).required
    assert not key_store(GatewayConfig(host="127.0.0.1")).required
    assert [is_loopback(h) for h in ("127.0.0.1", "::1", "[::1]", "localhost", "127.8.0.1")] == [True] * 5
    assert [is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "example.org", "")] == [False] * 5


def test_the_gateway_command_says_why_it_refuses_to_start():
    grpc_port, http_port = free_ports(2)
    result = subprocess.run(
        [*MESHSERVE, "gateway", "--host", "0.0.0.0", "--port", str(grpc_port),
         "--http-port", str(http_port), "--metrics-port", "0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "without API keys" in result.stderr and "--allow-unauthenticated" in result.stderr


def test_hash_key_prints_an_entry_that_authenticates_its_key(tmp_path, capsys, monkeypatch):
    from meshserve.cli.main import main

    assert main(["hash-key", "--tenant", "acme", "--max-priority", "high", "--tokens-per-minute", "6000"]) == 0
    out, err = capsys.readouterr()
    key = err.strip().rsplit(" ", 1)[1]
    entry = json.loads(out)
    assert entry["max_priority"] == "high" and entry["tokens_per_minute"] == 6000
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"tenants": [entry]}))
    assert KeyStore(str(path)).authenticate(f"Bearer {key}").name == "acme"
    monkeypatch.setattr("sys.stdin", io.StringIO("from-stdin\n"))
    assert main(["hash-key", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["key_sha256"] == [hash_key("from-stdin")]
