"""TLS in the chart: on by default with cert-manager Certificates (the release's own CA, or an issuer the operator
names), or from Secrets the operator names; each pod mounts its component's certificate, and probes move to
/healthz on the metrics port (the TLS gRPC port answers only the mesh's certificates)."""

from __future__ import annotations

import pytest

from chart_checks import (
    CHART,
    COMPONENTS,
    NAMESPACE,
    VALUE_SETS,
    component_of,
    config_env,
    deployments_by_component,
    helm,
    objects,
    of_kind,
)

TLS_FILES = {
    "MESHSERVE_TLS_CERT": "/etc/meshserve-tls/tls.crt",
    "MESHSERVE_TLS_KEY": "/etc/meshserve-tls/tls.key",
    "MESHSERVE_TLS_CA": "/etc/meshserve-tls/ca.crt",
}


def tls_secret(deployment: dict) -> str:
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    return volumes["tls"]["secret"]["secretName"]


def test_tls_is_on_by_default_with_a_certificate_per_component_from_the_releases_ca(docs):
    found = docs["default"]
    certificates = {d["metadata"]["name"]: d for d in found if d["kind"] == "Certificate"}
    issuers = {d["metadata"]["name"]: d for d in found if d["kind"] == "Issuer"}
    ca = next(c for c in certificates.values() if c["spec"].get("isCA"))
    assert issuers[ca["spec"]["issuerRef"]["name"]]["spec"] == {"selfSigned": {}}
    ca_issuer = next(i for i in issuers.values() if "ca" in i["spec"])
    assert ca_issuer["spec"]["ca"]["secretName"] == ca["spec"]["secretName"]
    services = {component_of(s): s["metadata"]["name"] for s in of_kind(found, "Service").values()}
    for component, deployment in deployments_by_component(found).items():
        env = config_env(found, deployment)
        assert {k: env.get(k) for k in TLS_FILES} == TLS_FILES and "MESHSERVE_INSECURE" not in env, component
        certificate = next(c for c in certificates.values() if c["spec"]["secretName"] == tls_secret(deployment))
        spec = certificate["spec"]
        # The role its peers check first, then the Service's names.
        assert spec["commonName"] == component and spec["dnsNames"][0] == component
        assert f"{services[component]}.{NAMESPACE}.svc" in spec["dnsNames"]
        assert {"server auth", "client auth"} <= set(spec["usages"])
        assert spec["issuerRef"]["name"] == ca_issuer["metadata"]["name"]
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert mounts["tls"]["mountPath"] == "/etc/meshserve-tls" and "subPath" not in mounts["tls"]


def test_an_issuer_the_operator_names_signs_the_certificates(docs):
    certificates = [d for d in docs["tracing"] if d["kind"] == "Certificate"]
    assert not [d for d in docs["tracing"] if d["kind"] == "Issuer"]
    assert len(certificates) == len(COMPONENTS)
    for certificate in certificates:
        issuer = {"name": "corp-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
        assert certificate["spec"]["issuerRef"] == issuer
        if certificate["spec"]["commonName"] == "gateway":
            assert "llm.example.com" in certificate["spec"]["dnsNames"]


def test_secrets_the_operator_names_are_mounted(docs):
    found = docs["cpu-only"]
    assert not [d for d in found if d["kind"] in ("Certificate", "Issuer")]
    for component, deployment in deployments_by_component(found).items():
        assert tls_secret(deployment) == f"{component}-tls"


def test_probes_keep_the_metrics_port_open_when_metrics_are_off():
    with helm.Chart.load(str(CHART)) as chart:
        files = chart.render({"metrics": {"enabled": False}}, name="mesh", namespace=NAMESPACE, is_install=True)
    found = objects(files)
    for component, deployment in deployments_by_component(found).items():
        port = int(config_env(found, deployment)["MESHSERVE_METRICS_PORT"])
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": port} and port, component
    # Nothing scrapes them: no Service and no NetworkPolicy opens the port.
    assert not [s for s in of_kind(found, "Service").values() if "metrics" in {p["name"] for p in s["spec"]["ports"]}]


def test_tls_off_must_be_said_and_serves_plaintext_on_purpose(docs):
    found = docs["auth-off"]
    assert not [d for d in found if d["kind"] in ("Certificate", "Issuer")]
    for component, deployment in deployments_by_component(found).items():
        env = config_env(found, deployment)
        assert env["MESHSERVE_INSECURE"] == "true" and "MESHSERVE_TLS_CERT" not in env, component
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert "grpc" in container["readinessProbe"]


def test_secrets_source_without_a_secret_name_is_refused_by_name():
    values = {"tls": {"source": "secrets", "existingSecrets": {"gateway": "g", "router": "r", "aggregator": "a"}}}
    with helm.Chart.load(str(CHART)) as chart, pytest.raises(Exception, match=r"tls\.existingSecrets\.worker"):
        chart.render(values, name="mesh", namespace=NAMESPACE, is_install=True)


def test_an_unknown_issuer_kind_is_refused_by_the_schema():
    values = {"tls": {"certManager": {"issuerRef": {"name": "x", "kind": "Vault", "group": "cert-manager.io"}}}}
    with helm.Chart.load(str(CHART)) as chart, pytest.raises(Exception, match="kind"):
        chart.validate_schema(values)


def test_value_sets_cover_tls_on_off_and_both_sources():
    sources = {name: values.get("tls", {}) for name, values in VALUE_SETS.items()}
    assert sources["auth-off"] == {"enabled": False} and sources["cpu-only"]["source"] == "secrets"
