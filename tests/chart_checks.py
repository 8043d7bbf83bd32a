"""The Helm chart as the chart tests see it: the values sets, rendering by the real Helm engine (helm-python-sdk),
and the policy checks, plain functions that tests/test_kustomize.py runs on the kustomize output too.

conftest.py's `rendered` and `docs` fixtures render each values set once per session.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from chart_tls_checks import check_cert_manager

helm = pytest.importorskip("helm_python", reason="pip install -c constraints.txt -e '.[test]'")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "meshserve"
KUBE_VERSIONS = ("1.30.0", "1.33.0")
RELEASE, NAMESPACE = "mesh", "llm"
COMPONENTS = ("gateway", "router", "aggregator", "worker")
# Who calls whom: the only in-release traffic the NetworkPolicies may allow.
CALLERS = {"router": {"gateway", "aggregator"}, "aggregator": {"gateway"}, "worker": {"router"}}
TENANT_HASH = "a" * 64
# Where libraries in the services write their caches.
CACHE_VARIABLES = {"XDG_CACHE_HOME", "HF_HOME", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"}

VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "gpu-workers": {
        "worker": {
            "gpu": {"enabled": True, "count": 2, "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}},
            "config": {"dtype": "bfloat16", "kvCacheMemory": "0.85"},
        },
        "model": {"source": "pvc", "pvc": {"claimName": "models"}, "path": "Llama-3.1-8B-Instruct", "name": "llama"},
        "auth": {"tenants": [{"name": "acme", "max_priority": "high", "key_sha256": [TENANT_HASH]}]},
    },
    "cpu-only": {
        "worker": {
            "gpu": {"enabled": False},
            "replicas": 1,
            "drainSeconds": 60,
            "config": {
                "dtype": "float32",
                "threads": 2,
                "kvCacheMemory": "512MiB",
                "modelImpl": "fast",
                "compile": "on",
            },
            "resources": {"requests": {"cpu": "2", "memory": "2Gi"}, "limits": {"memory": "3Gi"}},
        },
        "model": {"source": "hostPath", "hostPath": {"path": "/srv/models"}, "path": "tiny"},
        "tls": {"source": "secrets", "existingSecrets": {c: f"{c}-tls" for c in COMPONENTS}},
    },
    "autoscaling-off": {
        **{c: {"autoscaling": {"enabled": False}, "replicas": 3} for c in COMPONENTS},
        "model": {"source": "init", "init": {"command": ["sh", "-c", "cp -r /seed/. /models/"]}},
    },
    "auth-off": {
        "auth": {"enabled": False},
        "tls": {"enabled": False},
        "gateway": {"service": {"type": "LoadBalancer", "loadBalancerSourceRanges": ["10.0.0.0/8"]}},
        "router": {"discovery": "dns"},
        "rbac": {"create": False},
        "serviceAccount": {"create": False},
    },
    "tracing": {
        "tracing": {"enabled": True, "endpoint": "http://otel-collector.observability:4317", "samplerArg": "0.25"},
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
        "auth": {"existingSecret": "tenant-keys", "existingSecretKey": "keys.json"},
        "worker": {"autoscaling": {"kvCacheUsage": {"enabled": True}}},
        "tls": {
            "certManager": {"issuerRef": {"name": "corp-ca", "kind": "ClusterIssuer"}},
            "gatewayDnsNames": ["llm.example.com"],
        },
    },
}


def render(values: dict[str, Any]) -> dict[str, str]:
    with helm.Chart.load(str(CHART)) as chart:
        return chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def objects(files: dict[str, str]) -> list[dict[str, Any]]:
    docs = []
    for path, text in sorted(files.items()):
        if path.endswith(".yaml"):
            docs += [doc for doc in yaml.safe_load_all(text) if doc]
    return docs


# ---- checks shared with the kustomize tests -------------------------------------------------------------------


def validate_objects(docs: list[dict[str, Any]], version: str) -> list[str]:
    """Each object against the Kubernetes API schema (strict: unknown fields fail); custom resources apart."""
    problems = []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            custom = ("monitoring.coreos.com/v1", "cert-manager.io/v1")
            assert doc["apiVersion"] in custom, f"no schema for {doc['apiVersion']} {doc['kind']}"
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            problems.append(f"{doc['kind']}/{doc['metadata']['name']} {where}: {exc.message}")
    return problems


def of_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def component_of(doc: dict[str, Any]) -> str:
    return doc["metadata"]["labels"]["app.kubernetes.io/component"]


def deployments_by_component(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {component_of(d): d for d in of_kind(docs, "Deployment").values()}


def config_env(docs: list[dict[str, Any]], deployment: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the process sees it: its ConfigMap, then env (with $(VAR) expanded)."""
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    config_maps = of_kind(docs, "ConfigMap")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(config_maps[source["configMapRef"]["name"]]["data"])
    downward = {"metadata.namespace": NAMESPACE, "metadata.name": "pod-0", "spec.nodeName": "node-0"}
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), entry["value"])
        else:
            env[entry["name"]] = downward[entry["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"only matchLabels selectors are expected: {selector}"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def check_containers(docs: list[dict[str, Any]]) -> None:
    """Resources, probes (native gRPC; with TLS /healthz on the metrics port) and the restricted security context
    on every container."""
    for name, deployment in of_kind(docs, "Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True and security["seccompProfile"]["type"] == "RuntimeDefault", name
        for container in pod["containers"] + pod.get("initContainers", []):
            where = f"{name}/{container['name']}"
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"], where
            context = container["securityContext"]
            assert context["runAsNonRoot"] is True, where
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"]["drop"] == ["ALL"] and "add" not in context["capabilities"], where
            assert context["seccompProfile"]["type"] == "RuntimeDefault", where
        for container in pod["containers"]:
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            env = config_env(docs, deployment)
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if "MESHSERVE_TLS_CERT" in env:
                    expected = {"httpGet": {"path": "/healthz", "port": ports["metrics"]}}
                    assert int(env["MESHSERVE_METRICS_PORT"]) == ports["metrics"], name
                else:
                    expected = {"grpc": {"port": ports["grpc"]}}
                got = {k: v for k, v in container.get(probe, {}).items() if k in ("grpc", "httpGet")}
                assert got == expected, f"{name} {probe}"
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            volumes = {v["name"]: v for v in pod["volumes"]}
            # A read-only root: every place the process writes is an emptyDir.
            for writable in ("/tmp", env["MESHSERVE_CACHE"], env["HOME"]):
                volume = volumes.get(mounts.get(writable, ""), {})
                assert "emptyDir" in volume, f"{name}: {writable} is not on a writable volume"
            # The library caches (compiled kernels above all, reused when the container restarts) lie inside one.
            for variable in CACHE_VARIABLES & set(env):
                path = env[variable].rstrip("/")
                mount = max(
                    (m for m in mounts if path == m or path.startswith(f"{m.rstrip('/')}/")), key=len, default=""
                )
                assert "emptyDir" in volumes.get(mounts.get(mount, ""), {}), (
                    f"{name}: {variable}={path} is not writable"
                )


def check_exposure(docs: list[dict[str, Any]]) -> None:
    """Only the gateway's Service may face the outside; the others are in-cluster and fenced by NetworkPolicies."""
    for name, service in of_kind(docs, "Service").items():
        spec = service["spec"]
        if component_of(service) == "gateway" and "grpc" in {p["name"] for p in spec["ports"]}:
            continue
        assert spec.get("type", "ClusterIP") == "ClusterIP", f"{name} is {spec['type']}"
        assert not spec.get("externalIPs") and not spec.get("loadBalancerIP"), name
    assert not of_kind(docs, "Ingress")


def check_network_policies(docs: list[dict[str, Any]], metrics_ports: bool = True) -> None:
    """Every pod is selected by an ingress policy; internal gRPC ports only from their callers, metrics only from
    scrapers. (Egress: test_helm_egress.py.)"""
    deployments = deployments_by_component(docs)
    pod_labels = {c: d["spec"]["template"]["metadata"]["labels"] for c, d in deployments.items()}
    policies = [p for p in of_kind(docs, "NetworkPolicy").values() if "Ingress" in p["spec"]["policyTypes"]]
    for component, labels in pod_labels.items():
        covering = [p for p in policies if selects(p["spec"]["podSelector"], labels)]
        assert len(covering) == 1, f"{component} is selected by {len(covering)} NetworkPolicies"
        spec = covering[0]["spec"]
        assert spec["policyTypes"] == ["Ingress"]
        container = deployments[component]["spec"]["template"]["spec"]["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        allowed: dict[int, list[dict[str, Any]] | None] = {}
        for rule in spec["ingress"]:
            for port in rule["ports"]:
                allowed[port["port"]] = rule.get("from")
        if component == "gateway":
            assert allowed[ports["grpc"]] is None and allowed[ports["http"]] is None, "the gateway is the entry point"
        else:
            peers = allowed[ports["grpc"]]
            assert peers and all(set(peer) == {"podSelector"} for peer in peers), f"{component}: {peers}"
            callers = {c for c, other in pod_labels.items() if any(selects(p["podSelector"], other) for p in peers)}
            assert callers == CALLERS[component], f"{component} reachable from {callers}"
        if metrics_ports:
            scrapers = allowed[ports["metrics"]]
            assert scrapers and all("namespaceSelector" in p or "podSelector" in p for p in scrapers), component
        assert set(allowed) <= set(ports.values()), f"{component} opens a port it does not serve"


def check_autoscalers(docs: list[dict[str, Any]]) -> None:
    """Each HPA scales a Deployment that exists (without a fixed replica count): workers on meshserve load
    metrics, never CPU; the stateless services on CPU; scale-down slow enough for streams to drain."""
    deployments = of_kind(docs, "Deployment")
    for name, hpa in of_kind(docs, "HorizontalPodAutoscaler").items():
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["apiVersion"], target["kind"]) == ("apps/v1", "Deployment")
        assert target["name"] in deployments, f"{name} scales a Deployment that does not exist: {target['name']}"
        deployment = deployments[target["name"]]
        assert "replicas" not in deployment["spec"], f"{target['name']} fixes replicas under an HPA"
        metrics = hpa["spec"]["metrics"]
        if component_of(deployment) == "worker":
            assert metrics and all(m["type"] == "Pods" for m in metrics)
            assert {m["pods"]["metric"]["name"] for m in metrics} <= {
                "meshserve_worker_waiting_sequences",
                "meshserve_worker_kv_cache_usage_ratio",
            }
        else:
            assert [m["resource"]["name"] for m in metrics if m["type"] == "Resource"] == ["cpu"], name
        down = hpa["spec"]["behavior"]["scaleDown"]
        assert down["stabilizationWindowSeconds"] >= 60, name
        assert all(p["type"] == "Pods" and p["value"] == 1 for p in down["policies"]), "one pod at a time"


def check_rbac(docs: list[dict[str, Any]]) -> None:
    """Exactly get/list/watch on EndpointSlices in the namespace, for the router only."""
    assert not of_kind(docs, "ClusterRole") and not of_kind(docs, "ClusterRoleBinding")
    deployments = deployments_by_component(docs)
    router_pod = deployments["router"]["spec"]["template"]["spec"]
    for component, deployment in deployments.items():
        if component != "router":
            assert deployment["spec"]["template"]["spec"]["automountServiceAccountToken"] is False, component
    workers = config_env(docs, deployments["router"])["MESHSERVE_WORKERS"]
    roles, bindings = of_kind(docs, "Role"), of_kind(docs, "RoleBinding")
    worker_service = next(s for s in of_kind(docs, "Service").values() if component_of(s) == "worker")
    if not workers.startswith("k8s:///"):
        assert workers.startswith("dns:///") and not roles and not bindings
        assert router_pod["automountServiceAccountToken"] is False
        return
    assert workers == f"k8s:///{NAMESPACE}/{worker_service['metadata']['name']}:grpc"
    assert worker_service["spec"]["clusterIP"] == "None"
    assert "grpc" in {p["name"] for p in worker_service["spec"]["ports"]}
    ((role_name, role),) = roles.items()
    assert role["rules"] == [
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]}
    ]
    ((binding,),) = [list(bindings.values())]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role_name}
    ((subject,),) = [binding["subjects"]]
    assert subject["kind"] == "ServiceAccount" and subject["name"] == router_pod["serviceAccountName"]
    assert router_pod["automountServiceAccountToken"] is True
    for account in of_kind(docs, "ServiceAccount").values():
        assert account.get("automountServiceAccountToken") is False, "tokens only where a pod asks for one"


def check_drain(docs: list[dict[str, Any]]) -> None:
    """The kubelet waits longer than the service drains (after the preStop pause), so streams end before SIGKILL."""
    for component, deployment in deployments_by_component(docs).items():
        pod = deployment["spec"]["template"]["spec"]
        drain = float(config_env(docs, deployment)["MESHSERVE_DRAIN_SECONDS"])
        pause = pod["containers"][0].get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        grace = pod["terminationGracePeriodSeconds"]
        assert drain + pause < grace <= drain + pause + 30, f"{component}: grace {grace}, drain {drain} + {pause}"
        strategy = deployment["spec"]["strategy"]
        assert strategy["type"] == "RollingUpdate", component


def check_service_settings(docs: list[dict[str, Any]]) -> None:
    """Every MESHSERVE_* variable is a setting of that service, parses as the service parses it, and its ports
    agree with the container's, the Services' and the scrape annotations."""
    from meshserve.common import config as cfg

    types = {
        "gateway": cfg.GatewayConfig,
        "router": cfg.RouterConfig,
        "aggregator": cfg.AggregatorConfig,
        "worker": cfg.WorkerConfig,
    }
    services = {
        component_of(s): s for s in of_kind(docs, "Service").values() if not s["metadata"]["name"].endswith("-metrics")
    }
    for component, deployment in deployments_by_component(docs).items():
        env = config_env(docs, deployment)
        fields = {f.name for f in dataclasses.fields(types[component])}
        for name in env:
            if name.startswith(cfg.ENV_PREFIX) and name != "MESHSERVE_CACHE":
                assert name[len(cfg.ENV_PREFIX) :].lower() in fields, f"{component}: {name} is no setting of it"
        config = parse_config(types[component], env)
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert config.port == ports["grpc"] and config.host in ("0.0.0.0", "::")
        if config.metrics_port:
            assert config.metrics_port == ports["metrics"]
            annotations = deployment["spec"]["template"]["metadata"]["annotations"]
            assert annotations.get("prometheus.io/port", str(config.metrics_port)) == str(config.metrics_port)
        service_ports = {p["name"]: p for p in services[component]["spec"]["ports"]}
        assert service_ports["grpc"]["targetPort"] == "grpc"
        if component == "gateway":
            assert config.http_port == ports["http"]
            for upstream in ("router", "aggregator"):
                host, port = getattr(config, upstream).rsplit(":", 1)
                grpc_port = {p["name"]: p["port"] for p in services[upstream]["spec"]["ports"]}["grpc"]
                if upstream == "router":
                    # Every router pod's address (a headless Service), spread over with round_robin.
                    assert host.startswith("dns:///") and services[upstream]["spec"].get("clusterIP") == "None"
                    host = host.removeprefix("dns:///")
                assert (host, int(port)) == (services[upstream]["metadata"]["name"], grpc_port)


def parse_config(config_type: type, env: dict[str, str]) -> Any:
    """The service's own config parsing, on exactly this environment."""
    import os
    from unittest import mock

    from meshserve.common import config as cfg

    with mock.patch.dict(os.environ, env, clear=True):
        try:
            return cfg.from_args(config_type)
        except SystemExit as exc:  # how the service refuses a bad variable at start-up
            raise AssertionError(f"{config_type.__name__}: {exc}") from exc


def check_service_monitor(docs: list[dict[str, Any]]) -> None:
    """The Prometheus Operator's CRD has no bundled schema: check the shape the operator reads."""
    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    for monitor in monitors:
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
        spec = monitor["spec"]
        assert set(spec) <= {"selector", "namespaceSelector", "endpoints", "jobLabel", "targetLabels"}
        assert set(spec["selector"]) == {"matchLabels"}
        for endpoint in spec["endpoints"]:
            assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "relabelings"}
            assert re.fullmatch(r"[0-9]+(ms|s|m|h)", endpoint["interval"])
        # Every component's metrics are behind a selected Service with that port name.
        selected = [s for s in of_kind(docs, "Service").values() if selects(spec["selector"], s["metadata"]["labels"])]
        scraped = {
            component_of(s)
            for s in selected
            for e in spec["endpoints"]
            if e["port"] in {p["name"] for p in s["spec"]["ports"]}
        }
        assert scraped == set(COMPONENTS), scraped


# The fields of cert-manager's v1 Certificate and Issuer specs the chart may set (no bundled schema for them).
def check_all(docs: list[dict[str, Any]]) -> None:
    check_containers(docs)
    check_exposure(docs)
    check_network_policies(docs)
    check_autoscalers(docs)
    check_rbac(docs)
    check_drain(docs)
    check_service_settings(docs)
    check_service_monitor(docs)
    check_cert_manager(docs)
