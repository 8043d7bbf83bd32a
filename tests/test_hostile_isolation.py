"""What one tenant can learn of, or do to, another's requests: request ids are the mesh's own (the caller's is a
label), the prefix cache is salted per tenant, web pages of other sites cannot drive a loopback gateway, and the
model list leaves out the tokenizer files unless asked."""

from __future__ import annotations

import json
import uuid

import grpc
import pytest

from http_gateway import running_gateway
from meshserve.common.errors import MeshError
from meshserve.gateway.auth import hash_key
from meshserve.gateway.http_origin import BrowserGuard
from meshserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc, router_pb2
from meshserve.worker.block_manager import BlockManager
from support import router_stub

KEYS = {"alpha": "alpha-key", "beta": "beta-key"}
# Longer than several 16-token blocks, so a cache hit shows in usage.cached_prompt_tokens.
LONG_PROMPT = "The quarterly report of the northern region says that " * 8
GREEDY = common_pb2.SamplingParams(max_tokens=2, temperature=0.0)


def keys_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("keys") / "api-keys.json"
    tenants = [{"name": name, "max_priority": "high", "key_sha256": [hash_key(key)]} for name, key in KEYS.items()]
    path.write_text(json.dumps({"tenants": tenants}))
    return str(path)


@pytest.fixture(scope="module")
def tenants(mesh, loop_thread, tmp_path_factory):
    with running_gateway(loop_thread, mesh, api_keys_file=keys_file(tmp_path_factory)) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def shared_cache(mesh, loop_thread, tmp_path_factory):
    path = keys_file(tmp_path_factory)
    with running_gateway(loop_thread, mesh, api_keys_file=path, prefix_cache_scope="shared") as gateway:
        yield gateway


def generate(gateway, tenant: str, request: inference_pb2.GenerateRequest) -> inference_pb2.GenerateResponse:
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(gateway.grpc))
    return stub.Generate(request, metadata=[("authorization", f"Bearer {KEYS[tenant]}")], timeout=120)


def cached_tokens(gateway, tenant: str, prompt: str, salt: str = "") -> int:
    request = inference_pb2.GenerateRequest(prompt=prompt, sampling=GREEDY, cache_salt=salt)
    return generate(gateway, tenant, request).usage.cached_prompt_tokens


# ---- request ids ------------------------------------------------------------------------------------------------


def test_a_callers_request_id_is_echoed_but_the_mesh_keeps_its_own(tenants, mesh):
    """Two tenants choosing the same id (and one choosing a sub-request's shape) stay two parents in the router's
    Stats, each labelled with the id its caller chose."""
    label = f"shared-{uuid.uuid4().hex[:8]}/0-1"
    fan_out = common_pb2.SamplingParams(max_tokens=2, temperature=1.0, seed=1)
    replies = [
        generate(tenants, tenant, inference_pb2.GenerateRequest(prompt="Hi", n=2, sampling=fan_out, request_id=label))
        for tenant in KEYS
    ]
    assert [r.request_id for r in replies] == [label, label]
    stats = router_stub(mesh.router).Stats(router_pb2.RouterStatsRequest(), timeout=10)
    parents = [p for p in stats.parents if p.client_request_id == label]
    assert sorted(p.tenant for p in parents) == ["alpha", "beta"], parents
    assert len({p.parent_id for p in parents}) == 2 and label not in {p.parent_id for p in parents}
    assert all(p.finished == 2 for p in parents), "each parent has exactly its own two children"


def test_a_request_without_an_id_gets_the_mesh_id_back(tenants):
    reply = generate(tenants, "alpha", inference_pb2.GenerateRequest(prompt="Hi", sampling=GREEDY))
    assert len(reply.request_id) == 32 and int(reply.request_id, 16) >= 0


def test_http_echoes_the_callers_request_id(tenants):
    body = {"prompt": "Hi", "max_tokens": 2, "temperature": 0}
    headers = {"Authorization": f"Bearer {KEYS['beta']}", "X-Request-Id": "mine-1"}
    status, response_headers, data = tenants.post("/v1/completions", body, headers)
    assert status == 200, data
    assert response_headers["X-Request-Id"] == "mine-1" and json.loads(data)["id"] == "cmpl-mine-1"


# ---- the prefix cache ---------------------------------------------------------------------------------------------


def test_one_tenant_never_hits_another_tenants_cached_prompt(tenants):
    prompt = f"{uuid.uuid4().hex} {LONG_PROMPT}"
    assert cached_tokens(tenants, "alpha", prompt) == 0
    assert cached_tokens(tenants, "beta", prompt) == 0, "beta would learn from the timing that alpha sent it"
    assert cached_tokens(tenants, "alpha", prompt) >= 32, "alpha's own repeat still hits"


def test_a_callers_salt_narrows_sharing_within_its_tenant(tenants):
    prompt = f"{uuid.uuid4().hex} {LONG_PROMPT}"
    assert cached_tokens(tenants, "alpha", prompt, salt="user-1") == 0
    assert cached_tokens(tenants, "alpha", prompt, salt="user-2") == 0
    assert cached_tokens(tenants, "alpha", prompt, salt="user-1") >= 32


def test_the_openai_body_takes_a_cache_salt(tenants):
    prompt = f"{uuid.uuid4().hex} {LONG_PROMPT}"
    headers = {"Authorization": f"Bearer {KEYS['alpha']}"}

    def cached(salt: str) -> int:
        body = {"prompt": prompt, "max_tokens": 1, "cache_salt": salt}
        status, _, data = tenants.post("/v1/completions", body, headers)
        assert status == 200, data
        return json.loads(data)["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0)

    assert cached("a") == 0 and cached("b") == 0 and cached("a") >= 32


def test_an_operator_may_share_the_cache_across_tenants(shared_cache):
    prompt = f"{uuid.uuid4().hex} {LONG_PROMPT}"
    assert cached_tokens(shared_cache, "alpha", prompt) == 0
    assert cached_tokens(shared_cache, "beta", prompt) >= 32


def test_a_salt_longer_than_the_bound_is_refused(tenants):
    with pytest.raises(grpc.RpcError) as error:
        generate(tenants, "alpha", inference_pb2.GenerateRequest(prompt="Hi", sampling=GREEDY, cache_salt="s" * 257))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cache_salt" in error.value.details()


def test_blocks_cached_under_one_salt_are_invisible_under_another():
    manager = BlockManager(num_blocks=16, block_size=4)
    prompt = list(range(13))
    first = manager.allocate(prompt, "tenant-a")
    manager.mark_computed(first.block_table, prompt, len(prompt), "tenant-a")
    assert manager.cached_prefix_tokens(prompt, "tenant-a") == 12
    assert manager.cached_prefix_tokens(prompt, "tenant-b") == manager.cached_prefix_tokens(prompt) == 0
    assert manager.allocate(prompt, "tenant-b").num_cached_tokens == 0


# ---- pages of other sites -------------------------------------------------------------------------------------


def test_a_page_of_another_site_cannot_post_to_a_loopback_gateway(gateway):
    body = {"prompt": "Hi", "max_tokens": 1}
    status, _, data = gateway.post("/v1/completions", body, {"Origin": "https://evil.example"})
    assert status == 403 and "Origin" in json.loads(data)["error"]["message"], data
    status, _, data = gateway.post("/v1/completions", body, {"Origin": "null"})
    assert status == 403, data


def test_the_gateways_own_page_and_plain_clients_pass(gateway):
    body = {"prompt": "Hi", "max_tokens": 1}
    assert gateway.post("/v1/completions", body, {"Origin": f"http://{gateway.http}"})[0] == 200
    assert gateway.post("/v1/completions", body)[0] == 200  # no Origin: not a browser


def test_a_rebound_host_name_is_refused_on_loopback(gateway):
    status, _, data = gateway.get("/v1/models", {"Host": "attacker.example:8080"})
    assert status == 403 and "Host" in json.loads(data)["error"]["message"], data
    port = gateway.http.rsplit(":", 1)[1]
    assert gateway.get("/v1/models", {"Host": f"localhost:{port}"})[0] == 200


@pytest.mark.parametrize(
    ("bound", "headers", "allowed"),
    [
        ("127.0.0.1", {"Host": "127.0.0.1:8080", "Origin": "http://app.example:3000"}, True),  # allowed origin
        ("127.0.0.1", {"Host": "127.0.0.1:8080", "Origin": "http://app.example:3001"}, False),  # other port
        ("127.0.0.1", {"Host": "[::1]:8080"}, True),
        ("127.0.0.1", {"Host": "127.9.9.9"}, True),
        ("127.0.0.1", {"Host": "mesh.internal:8080"}, True),  # an allowed host
        ("127.0.0.1", {"Host": "localhost.evil.example"}, False),
        ("127.0.0.1", {"Host": ""}, False),
        ("0.0.0.0", {"Host": "mesh.example.com"}, True),  # served on a network: names are real
        ("0.0.0.0", {"Host": "mesh.example.com", "Origin": "https://mesh.example.com"}, True),  # same origin
        ("0.0.0.0", {"Host": "mesh.example.com", "Origin": "https://evil.example"}, False),
    ],
)
def test_browser_guard_decisions(bound, headers, allowed):
    guard = BrowserGuard(bound, "http://app.example:3000", "mesh.internal")

    class Request:
        def __init__(self, headers):
            self.headers = headers

    try:
        guard.check(Request(headers))  # type: ignore[arg-type]
        passed = True
    except MeshError as refused:
        assert refused.code == grpc.StatusCode.PERMISSION_DENIED
        passed = False
    assert passed == allowed


# ---- the model list -------------------------------------------------------------------------------------------


def test_the_model_list_is_names_only_unless_the_files_are_asked_for(tenants):
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(tenants.grpc))
    metadata = [("authorization", f"Bearer {KEYS['alpha']}")]
    plain = stub.ListModels(common_pb2.ListModelsRequest(), metadata=metadata, timeout=10)
    assert plain.models and not plain.models[0].tokenizer_files
    asked = common_pb2.ListModelsRequest(include_tokenizer_files=True)
    files = stub.ListModels(asked, metadata=metadata, timeout=10).models[0].tokenizer_files
    assert "tokenizer.json" in files or "tokenizer_config.json" in files


def test_the_router_refuses_a_model_no_worker_serves_at_once(mesh):
    from meshserve.v1 import router_pb2_grpc

    stub = router_pb2_grpc.RouterStub(grpc.insecure_channel(mesh.router))
    request = common_pb2.TokenRequest(request_id="r", model="not-served", prompt_token_ids=[1, 2], sampling=GREEDY)
    with pytest.raises(grpc.RpcError) as error:
        list(stub.Generate(request, timeout=30))  # it would wait out this deadline in the queue
    assert error.value.code() == grpc.StatusCode.NOT_FOUND and "not-served" in error.value.details()
