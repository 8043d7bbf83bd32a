"""Prometheus /metrics of every service, scraped over HTTP and parsed with the Prometheus text parser.

Known traffic goes through the mesh; counters and histograms must move by exactly what it implies.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc, router_pb2_grpc

SERVICES = ("gateway", "router", "aggregator", "worker")


@pytest.fixture(scope="module")
def endpoints(mesh) -> Iterator[dict[str, str]]:
    from meshserve.common.metrics import serve_metrics

    served = {name: serve_metrics(mesh.servers[name].metrics, "127.0.0.1", 0) for name in SERVICES}
    yield {name: f"http://127.0.0.1:{endpoint.port}/metrics" for name, endpoint in served.items()}
    for endpoint in served.values():
        endpoint.close()


def families(url: str) -> list:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return list(text_string_to_metric_families(response.read().decode()))


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample as {(sample name, sorted labels): value}."""
    samples = {}
    for family in families(url):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_every_service_serves_prometheus_text_with_meshserve_names(endpoints):
    for name, url in endpoints.items():
        found = families(url)
        assert found, f"{name} exposes no metrics"
        for family in found:
            assert family.name.startswith(f"meshserve_{name}_"), family.name
            assert family.documentation, f"{family.name} has no help text"
            if family.type in ("histogram", "gauge") and not family.name.endswith(("_ratio", "_size", "_width")):
                # Units in the name: seconds, or a count of things.
                assert family.name.endswith(
                    ("_seconds", "_sequences", "_blocks", "_depth", "_workers", "_seqs", "_second", "_draining")
                ), family.name


def test_counters_and_histograms_move_by_what_known_traffic_implies(endpoints, mesh):
    before = {name: scrape(url) for name, url in endpoints.items()}
    stub = inference_pb2_grpc.InferenceStub(mesh.channel(mesh.gateway))
    max_tokens = 5
    prompts = ["The first request", "A second one", "And a third"]
    usage = []
    priorities = [common_pb2.PRIORITY_HIGH, common_pb2.PRIORITY_NORMAL, common_pb2.PRIORITY_NORMAL]
    for prompt, priority in zip(prompts, priorities, strict=True):
        request = inference_pb2.GenerateRequest(
            prompt=prompt,
            priority=priority,
            sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
        )
        chunks = list(stub.GenerateStream(request, timeout=60))
        usage.append(chunks[-1].usage)
    # One fan-out through the aggregator, one request over the HTTP API.
    fan_out = inference_pb2.GenerateRequest(
        prompt="Two of them", n=2, sampling=common_pb2.SamplingParams(max_tokens=max_tokens, seed=3, ignore_eos=True)
    )
    fan_out_chunks = list(stub.GenerateStream(fan_out, timeout=60))
    assert fan_out_chunks[-1].usage.completion_tokens == 2 * max_tokens
    body = {"model": "meshserve-tiny", "prompt": "Over HTTP", "max_tokens": max_tokens, "ignore_eos": True}
    http_request = urllib.request.Request(
        mesh.servers["gateway"].http.url + "v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(http_request, timeout=60) as response:
        http_usage = json.loads(response.read())["usage"]
    # Bad requests are counted by their status code.
    with pytest.raises(grpc.RpcError) as error:
        stub.Generate(inference_pb2.GenerateRequest(prompt="x", model="no-such-model"), timeout=10)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    router = router_pb2_grpc.RouterStub(mesh.channel(mesh.router))
    with pytest.raises(grpc.RpcError) as error:
        list(router.Generate(common_pb2.TokenRequest(prompt_token_ids=[1, 2], priority=42), timeout=10))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = {name: scrape(url) for name, url in endpoints.items()}

    def delta(service: str, name: str, **labels: str) -> float:
        return value(after[service], name, **labels) - value(before[service], name, **labels)

    prompt_tokens = sum(u.prompt_tokens for u in usage)
    assert all(u.completion_tokens == max_tokens for u in usage)

    # gateway
    grpc_ok = {"model": "meshserve-tiny", "code": "OK", "api": "grpc"}
    assert delta("gateway", "meshserve_gateway_requests_total", priority="high", **grpc_ok) == 1
    assert delta("gateway", "meshserve_gateway_requests_total", priority="normal", **grpc_ok) == 3  # 2 + the fan-out
    assert (
        delta(
            "gateway",
            "meshserve_gateway_requests_total",
            model="meshserve-tiny",
            priority="normal",
            code="OK",
            api="http",
        )
        == 1
    )
    assert delta("gateway", "meshserve_gateway_requests_total", model="unknown", priority="normal", code="NOT_FOUND",
                 api="grpc") == 1  # fmt: skip
    tiny_normal = {"model": "meshserve-tiny", "priority": "normal"}
    assert delta("gateway", "meshserve_gateway_time_to_first_token_seconds_count", **tiny_normal) == 4
    assert delta("gateway", "meshserve_gateway_request_duration_seconds_count", **tiny_normal) == 4
    # Per token after each completion's first: 2 single requests, 2 fan-out indices, 1 over HTTP (normal).
    assert delta("gateway", "meshserve_gateway_inter_token_latency_seconds_count", **tiny_normal) == 5 * (
        max_tokens - 1
    )
    all_completion_tokens = (len(prompts) + 2 + 1) * max_tokens
    assert (
        delta("gateway", "meshserve_gateway_completion_tokens_total", model="meshserve-tiny") == all_completion_tokens
    )
    assert delta("gateway", "meshserve_gateway_prompt_tokens_total", model="meshserve-tiny") == (
        prompt_tokens + fan_out_chunks[-1].usage.prompt_tokens + http_usage["prompt_tokens"]
    )

    # aggregator
    assert delta("aggregator", "meshserve_aggregator_fanout_requests_total", kind="samples", code="OK") == 1
    assert delta("aggregator", "meshserve_aggregator_sub_requests_total", code="OK") == 2
    assert delta("aggregator", "meshserve_aggregator_fanout_width_count", kind="samples") == 1
    assert delta("aggregator", "meshserve_aggregator_fanout_width_sum", kind="samples") == 2

    # worker
    sequences = len(prompts) + 2 + 1
    assert delta("worker", "meshserve_worker_requests_total", code="OK") == sequences
    assert delta("worker", "meshserve_worker_generation_tokens_total") == all_completion_tokens
    assert delta("worker", "meshserve_worker_time_to_first_token_seconds_count", priority="high") == 1
    assert delta("worker", "meshserve_worker_time_to_first_token_seconds_count", priority="normal") == sequences - 1
    assert delta("worker", "meshserve_worker_inter_token_latency_seconds_count") == sequences * (max_tokens - 1)
    assert delta("worker", "meshserve_worker_batch_size_count") >= max_tokens  # at least one step per token
    assert delta("worker", "meshserve_worker_sequences_total", outcome="finished") == sequences
    assert 0 <= value(after["worker"], "meshserve_worker_kv_cache_usage_ratio") <= 1
    assert value(after["worker"], "meshserve_worker_running_sequences") == 0
    assert value(after["worker"], "meshserve_worker_waiting_sequences") == 0

    # router
    assert delta("router", "meshserve_router_requests_total", priority="high", code="OK") == 1
    assert delta("router", "meshserve_router_requests_total", priority="normal", code="OK") == sequences - 1
    assert delta("router", "meshserve_router_requests_total", priority="normal", code="INVALID_ARGUMENT") == 1
    assert delta("router", "meshserve_router_queue_wait_seconds_count", priority="high") == 1
    assert delta("router", "meshserve_router_queue_wait_seconds_count", priority="normal") == sequences - 1
    assert delta("router", "meshserve_router_dispatched_requests_total") == sequences
    for priority in ("critical", "high", "normal", "low", "batch"):
        assert value(after["router"], "meshserve_router_queue_depth", priority=priority) == 0
        assert ("meshserve_router_shed_requests_total", (("priority", priority),)) in after["router"]
    assert value(after["router"], "meshserve_router_workers", state="up") == 1
