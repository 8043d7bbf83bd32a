"""Egress NetworkPolicies: each pod may connect only to the services it calls, the cluster DNS, the API server (the
router, for kubernetes discovery), the OTLP collector when traces are exported, and what the operator adds; every
rule names its peers and its ports, so none opens everything by omission."""

from __future__ import annotations

import copy
import json
from typing import Any
from urllib.parse import urlsplit

import pytest

from chart_checks import (
    CALLERS,
    CHART,
    COMPONENTS,
    KUBE_VERSIONS,
    VALUE_SETS,
    config_env,
    deployments_by_component,
    helm,
    objects,
    of_kind,
    render,
    selects,
    validate_objects,
)

# Whom each component calls: CALLERS turned round (the same pairs as the ingress policies and the TLS roles).
CALLEES = {c: {callee for callee, callers in CALLERS.items() if c in callers} for c in COMPONENTS}
KUBE_DNS = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
    "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
}
ANY_POD = {"namespaceSelector": {}}
# The chart's defaults for the router's egress to the API server (no pod selector can name it).
API_CIDRS, API_PORTS = ("0.0.0.0/0", "::/0"), (443, 6443)
Allowed = set[tuple[str, str, str, int]]  # (peer kind, peer, protocol, port)


def peer_names(peer: dict[str, Any], pod_labels: dict[str, dict[str, str]]) -> list[tuple[str, str]]:
    """("pod", component) for a same-namespace selector of release pods, ("cidr", cidr), else ("peer", its JSON)."""
    if set(peer) == {"podSelector"}:
        selected = [c for c, labels in pod_labels.items() if selects(peer["podSelector"], labels)]
        if selected:
            return [("pod", c) for c in selected]
    if set(peer) == {"ipBlock"} and not peer["ipBlock"].get("except"):
        return [("cidr", peer["ipBlock"]["cidr"])]
    return [("peer", json.dumps(peer, sort_keys=True))]


def egress_allowed(docs: list[dict[str, Any]]) -> dict[str, Allowed]:
    """What each component's pods may connect to, from the one egress policy that selects them."""
    deployments = deployments_by_component(docs)
    pod_labels = {c: d["spec"]["template"]["metadata"]["labels"] for c, d in deployments.items()}
    policies = [p for p in of_kind(docs, "NetworkPolicy").values() if "Egress" in p["spec"]["policyTypes"]]
    allowed = {}
    for component, labels in pod_labels.items():
        covering = [p for p in policies if selects(p["spec"]["podSelector"], labels)]
        assert len(covering) == 1, f"{component} is selected by {len(covering)} egress NetworkPolicies"
        spec = covering[0]["spec"]
        assert spec["policyTypes"] == ["Egress"], spec["policyTypes"]
        allowed[component] = set()
        for rule in spec["egress"]:
            # A rule without `to` allows every destination, one without `ports` every port.
            assert rule.get("to") and rule.get("ports"), f"{component}: a rule that leaves peers or ports open: {rule}"
            for peer in rule["to"]:
                for kind, name in peer_names(peer, pod_labels):
                    allowed[component] |= {(kind, name, p.get("protocol", "TCP"), p["port"]) for p in rule["ports"]}
    return allowed


def peer(kind_peer: dict[str, Any], protocol: str, port: int) -> tuple[str, str, str, int]:
    return ("peer", json.dumps(kind_peer, sort_keys=True), protocol, port)


def expected_egress(
    docs: list[dict[str, Any]],
    api_cidrs: tuple[str, ...] = API_CIDRS,
    api_ports: tuple[int, ...] = API_PORTS,
    otlp_to: tuple[dict[str, Any], ...] = (ANY_POD,),
) -> dict[str, Allowed]:
    """DNS; each callee's gRPC port as its container declares it; the API server for a router that discovers
    through it; the collector's port (from the endpoint the service exports to) when traces go over OTLP."""
    deployments = deployments_by_component(docs)
    grpc_ports = {
        c: {p["name"]: p["containerPort"] for p in d["spec"]["template"]["spec"]["containers"][0]["ports"]}["grpc"]
        for c, d in deployments.items()
    }
    expected = {}
    for component, deployment in deployments.items():
        env = config_env(docs, deployment)
        wanted = {peer(KUBE_DNS, "UDP", 53), peer(KUBE_DNS, "TCP", 53)}
        wanted |= {("pod", callee, "TCP", grpc_ports[callee]) for callee in CALLEES[component]}
        if env.get("MESHSERVE_WORKERS", "").startswith("k8s:///"):
            wanted |= {("cidr", cidr, "TCP", port) for cidr in api_cidrs for port in api_ports}
        if "OTEL_EXPORTER_OTLP_ENDPOINT" in env:
            port = urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"]).port
            wanted |= {peer(to, "TCP", port) for to in otlp_to}
        expected[component] = wanted
    return expected


def render_docs(values: dict[str, Any]) -> list[dict[str, Any]]:
    return objects(render(values))


@pytest.mark.parametrize("values", VALUE_SETS)
def test_each_pod_may_connect_only_to_its_callees_dns_the_api_and_the_collector(docs, values):
    assert egress_allowed(docs[values]) == expected_egress(docs[values])


def test_the_default_egress_is_exactly_the_meshs_own_traffic(docs):
    dns = {peer(KUBE_DNS, "UDP", 53), peer(KUBE_DNS, "TCP", 53)}
    api = {("cidr", cidr, "TCP", port) for cidr in ("0.0.0.0/0", "::/0") for port in (443, 6443)}
    assert egress_allowed(docs["default"]) == {
        "gateway": {("pod", "router", "TCP", 50052), ("pod", "aggregator", "TCP", 50053), *dns},
        "aggregator": {("pod", "router", "TCP", 50052), *dns},
        "router": {("pod", "worker", "TCP", 50061), *api, *dns},
        "worker": dns,
    }


def broken(docs: list[dict[str, Any]], component: str, change: Any) -> list[dict[str, Any]]:
    docs = copy.deepcopy(docs)
    (policy,) = [d for d in docs if d["metadata"]["name"] == f"mesh-meshserve-{component}-egress"]
    change(policy["spec"]["egress"])
    return docs


@pytest.mark.parametrize(
    ("component", "change"),
    [
        ("worker", lambda rules: rules.append({"ports": [{"port": 443}]})),  # anywhere on 443
        ("gateway", lambda rules: rules.append({"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]})),  # every port
        ("gateway", lambda rules: rules[1]["ports"].append({"port": 50061})),  # the router's rule opens a worker port
        ("aggregator", lambda rules: rules.pop(0)),  # no DNS
        ("router", lambda rules: rules[1]["to"][0]["podSelector"]["matchLabels"].update(component="gateway")),
    ],
)
def test_the_egress_check_catches_a_rule_that_allows_more_or_less(docs, component, change):
    with pytest.raises(AssertionError):
        assert egress_allowed(broken(docs["default"], component, change)) == expected_egress(docs["default"])


def test_a_router_on_dns_discovery_gets_no_api_server_egress(docs):
    router = egress_allowed(docs["auth-off"])["router"]
    assert not [a for a in router if a[0] == "cidr"], router


def test_the_api_server_cidrs_and_ports_are_the_operators():
    values = {"networkPolicy": {"egress": {"kubernetesApi": {"cidrs": ["172.20.0.10/32"], "ports": [6443]}}}}
    found = render_docs(values)
    assert egress_allowed(found) == expected_egress(found, api_cidrs=("172.20.0.10/32",), api_ports=(6443,))
    values["networkPolicy"]["egress"]["kubernetesApi"]["cidrs"] = []
    router = egress_allowed(render_docs(values))["router"]
    assert not [a for a in router if a[0] == "cidr"], "empty cidrs: no API rule"


def test_notes_warn_while_the_api_server_egress_is_open():
    assert "networkPolicy.egress.kubernetesApi.cidrs" in render({})["meshserve/templates/NOTES.txt"]
    narrowed = {"networkPolicy": {"egress": {"kubernetesApi": {"cidrs": ["10.0.0.1/32"], "ports": [443]}}}}
    assert "kubernetesApi" not in render(narrowed)["meshserve/templates/NOTES.txt"]


def test_traces_go_to_the_collector_port_of_the_endpoint_or_the_one_given(docs):
    assert all(("peer", json.dumps(ANY_POD), "TCP", 4317) in a for a in egress_allowed(docs["tracing"]).values())
    collector = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "observability"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "otel-collector"}},
    }
    tracing = {"enabled": True, "endpoint": "http://otel-collector.observability:4318", "protocol": "http/protobuf"}
    values = {"tracing": tracing, "networkPolicy": {"egress": {"otlp": {"to": [collector]}}}}
    found = render_docs(values)
    assert egress_allowed(found) == expected_egress(found, otlp_to=(collector,))
    assert all(peer(collector, "TCP", 4318) in a for a in egress_allowed(found).values())
    values["networkPolicy"]["egress"]["otlp"]["port"] = 14317
    assert all(peer(collector, "TCP", 14317) in a for a in egress_allowed(render_docs(values)).values())


def test_console_traces_open_no_collector_egress(docs):
    found = render_docs({"tracing": {"enabled": True, "exporter": "console"}})
    assert egress_allowed(found) == egress_allowed(docs["default"])


def test_an_endpoint_without_a_port_needs_the_collector_port_named():
    tracing = {"enabled": True, "endpoint": "https://otlp.example.com"}
    with pytest.raises(helm.HelmRenderError, match=r"networkPolicy\.egress\.otlp\.port"):
        render({"tracing": tracing})
    found = render_docs({"tracing": tracing, "networkPolicy": {"egress": {"otlp": {"port": 443}}}})
    assert all(("peer", json.dumps(ANY_POD), "TCP", 443) in a for a in egress_allowed(found).values())
    assert render({"tracing": tracing, "networkPolicy": {"egress": {"enabled": False}}})


def test_the_dns_peers_and_ports_are_the_operators():
    node_local = {"ipBlock": {"cidr": "169.254.20.10/32"}}
    values = {"networkPolicy": {"egress": {"dns": {"to": [node_local], "ports": [{"port": 53, "protocol": "UDP"}]}}}}
    for component, allowed in egress_allowed(render_docs(values)).items():
        dns = {a for a in allowed if a[3] == 53}
        assert dns == {("cidr", "169.254.20.10/32", "UDP", 53)}, component


def test_extra_egress_is_added_to_its_component_only():
    hub = {"to": [{"ipBlock": {"cidr": "203.0.113.0/24"}}], "ports": [{"port": 443, "protocol": "TCP"}]}
    found = render_docs({"worker": {"extraEgress": [hub]}})
    assert of_kind(found, "NetworkPolicy")["mesh-meshserve-worker-egress"]["spec"]["egress"][-1] == hub
    default = expected_egress(found)
    assert egress_allowed(found) == {**default, "worker": default["worker"] | {("cidr", "203.0.113.0/24", "TCP", 443)}}


def test_egress_off_removes_only_the_egress_policies():
    policies = of_kind(render_docs({"networkPolicy": {"egress": {"enabled": False}}}), "NetworkPolicy").values()
    assert [p["spec"]["policyTypes"] for p in policies] == [["Ingress"]] * len(COMPONENTS)
    assert not of_kind(render_docs({"networkPolicy": {"enabled": False}}), "NetworkPolicy")


EGRESS_VARIANTS = {
    "extra-and-collector": {
        "tracing": {"enabled": True, "endpoint": "http://10.1.2.3:4317"},
        "networkPolicy": {"egress": {"otlp": {"to": [{"ipBlock": {"cidr": "10.1.2.3/32"}}]}}},
        "worker": {
            "extraEgress": [
                {
                    "to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}],
                    "ports": [{"port": 443}, {"port": 8000, "endPort": 8100}],
                }
            ]
        },
    },
    "narrow-api": {"networkPolicy": {"egress": {"kubernetesApi": {"cidrs": ["192.168.1.10/32"], "ports": [6443]}}}},
}


@pytest.mark.parametrize("values", EGRESS_VARIANTS)
def test_egress_variants_lint_and_validate_strictly_with_tls_on(values):
    found = render_docs(EGRESS_VARIANTS[values])
    assert [d for d in found if d["kind"] == "Certificate"], "TLS (the default) stays on"
    for version in KUBE_VERSIONS:
        assert not validate_objects(found, version)
        report = helm.lint(str(CHART), EGRESS_VARIANTS[values], strict=True, kube_version=f"v{version}")
        assert not [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]


BAD_EGRESS = [
    ({"worker": {"extraEgress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}]}}, "/worker/extraEgress/0", "ports"),
    ({"gateway": {"extraEgress": [{"ports": [{"port": 443}]}]}}, "/gateway/extraEgress/0", "to"),
    ({"router": {"extraEgress": [{"to": [{}], "ports": [{"port": 443}]}]}}, "/router/extraEgress/0/to/0", ""),
    ({"networkPolicy": {"egress": {"kubernetesApi": {"cidrs": ["10.0.0.1"]}}}}, "kubernetesApi/cidrs/0", "pattern"),
    ({"networkPolicy": {"egress": {"dns": {"ports": []}}}}, "/networkPolicy/egress/dns/ports", ""),
    ({"networkPolicy": {"egress": {"allowAll": True}}}, "/networkPolicy/egress", "'allowAll' not allowed"),
    ({"networkPolicy": {"egress": {"otlp": {"port": 70000}}}}, "/networkPolicy/egress/otlp/port", "maximum"),
]


@pytest.mark.parametrize(("values", "where", "what"), BAD_EGRESS)
def test_bad_egress_values_are_refused_with_the_key_named(values, where, what):
    with helm.Chart.load(str(CHART)) as chart, pytest.raises(helm.HelmValuesError) as caught:
        chart.validate_schema(values)
    assert where in str(caught.value) and what in str(caught.value), str(caught.value)
