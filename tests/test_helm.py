"""The Helm chart, rendered by the real Helm engine (helm-python-sdk) and checked against the Kubernetes API schemas
(kubernetes-validate) and against what the services themselves accept: no cluster needed.

Each values set renders once per module; the policy checks are plain functions that tests/test_kustomize.py runs
on the kustomize output too.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

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
            "config": {"dtype": "float32", "threads": 2, "kvCacheMemory": "512MiB"},
            "resources": {"requests": {"cpu": "2", "memory": "2Gi"}, "limits": {"memory": "3Gi"}},
        },
        "model": {"source": "hostPath", "hostPath": {"path": "/srv/models"}, "path": "tiny"},
    },
    "autoscaling-off": {
        **{c: {"autoscaling": {"enabled": False}, "replicas": 3} for c in COMPONENTS},
        "model": {"source": "init", "init": {"command": ["sh", "-c", "cp -r /seed/. /models/"]}},
    },
    "auth-off": {
        "auth": {"enabled": False},
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


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict[str, str]]:
    return {name: render(values) for name, values in VALUE_SETS.items()}


@pytest.fixture(scope="module")
def docs(rendered) -> dict[str, list[dict[str, Any]]]:
    return {name: objects(files) for name, files in rendered.items()}


# ---- checks shared with the kustomize tests -------------------------------------------------------------------


def validate_objects(docs: list[dict[str, Any]], version: str) -> list[str]:
    """Each object against the Kubernetes API schema (strict: unknown fields fail); custom resources apart."""
    problems = []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            assert doc["apiVersion"] == "monitoring.coreos.com/v1", f"no schema for {doc['apiVersion']} {doc['kind']}"
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
    """Resources, native gRPC probes and the restricted security context on every container."""
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
            grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert container.get(probe, {}).get("grpc") == {"port": grpc_port}, f"{name} {probe}"
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            volumes = {v["name"]: v for v in pod["volumes"]}
            env = config_env(docs, deployment)
            # A read-only root: every place the process writes is an emptyDir.
            for writable in ("/tmp", env["MESHSERVE_CACHE"], env["HOME"]):
                volume = volumes.get(mounts.get(writable, ""), {})
                assert "emptyDir" in volume, f"{name}: {writable} is not on a writable volume"


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
    """Every pod is selected by a policy; internal gRPC ports only from their callers, metrics only from scrapers."""
    deployments = deployments_by_component(docs)
    pod_labels = {c: d["spec"]["template"]["metadata"]["labels"] for c, d in deployments.items()}
    policies = list(of_kind(docs, "NetworkPolicy").values())
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


def check_all(docs: list[dict[str, Any]]) -> None:
    check_containers(docs)
    check_exposure(docs)
    check_network_policies(docs)
    check_autoscalers(docs)
    check_rbac(docs)
    check_drain(docs)
    check_service_settings(docs)
    check_service_monitor(docs)


# ---- the chart -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("values", VALUE_SETS)
def test_chart_lints_strictly(values):
    for version in KUBE_VERSIONS:
        report = helm.lint(str(CHART), VALUE_SETS[values], strict=True, kube_version=f"v{version}")
        problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
        assert not problems, problems


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("values", VALUE_SETS)
def test_every_rendered_object_is_valid_kubernetes(docs, values, version):
    assert not validate_objects(docs[values], version)


def test_strict_validation_rejects_an_unknown_field(docs):
    deployment = copy.deepcopy(next(iter(of_kind(docs["default"], "Deployment").values())))
    deployment["spec"]["template"]["spec"]["containers"][0]["gpuCount"] = 1
    assert validate_objects([deployment], KUBE_VERSIONS[-1])


@pytest.mark.parametrize("values", VALUE_SETS)
def test_rendered_objects_meet_the_policies(docs, values):
    check_all(docs[values])


def test_every_component_is_deployed_with_service_pdb_policy_and_autoscaler(docs):
    for name in ("default", "tracing"):
        found = docs[name]
        for kind in ("Deployment", "ConfigMap", "PodDisruptionBudget", "NetworkPolicy", "HorizontalPodAutoscaler"):
            assert {component_of(d) for d in of_kind(found, kind).values()} == set(COMPONENTS), kind
        pdbs = of_kind(found, "PodDisruptionBudget").values()
        deployments = deployments_by_component(found)
        for pdb in pdbs:
            labels = deployments[component_of(pdb)]["spec"]["template"]["metadata"]["labels"]
            assert selects(pdb["spec"]["selector"], labels)
    assert not of_kind(docs["autoscaling-off"], "HorizontalPodAutoscaler")
    for deployment in of_kind(docs["autoscaling-off"], "Deployment").values():
        assert deployment["spec"]["replicas"] == 3


def test_gpu_workers_request_gpus_on_gpu_nodes(docs):
    worker = deployments_by_component(docs["gpu-workers"])["worker"]
    pod = worker["spec"]["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 2 and resources["requests"]["nvidia.com/gpu"] == 2
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["containers"][0]["image"] == "ghcr.io/meshserve/meshserve-worker-gpu:0.1.0"
    env = config_env(docs["gpu-workers"], worker)
    assert env["MESHSERVE_MODEL"] == "/models/Llama-3.1-8B-Instruct" and env["MESHSERVE_MODEL_NAME"] == "llama"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["model"]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "model")
    assert mount == {"name": "model", "mountPath": "/models", "readOnly": True}
    # The engine's CUDA caches live on the writable cache volume.
    assert env["TRITON_CACHE_DIR"].startswith(env["MESHSERVE_CACHE"])


def test_cpu_only_workers_ask_for_no_gpu(docs):
    worker = deployments_by_component(docs["cpu-only"])["worker"]
    pod = worker["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert not any("gpu" in key for part in container["resources"].values() for key in part)
    assert "tolerations" not in pod and "nodeSelector" not in pod
    assert container["image"] == "ghcr.io/meshserve/meshserve:0.1.0"
    assert {v["name"]: v for v in pod["volumes"]}["model"]["hostPath"] == {"path": "/srv/models", "type": "Directory"}
    env = config_env(docs["cpu-only"], worker)
    assert (env["MESHSERVE_DTYPE"], env["MESHSERVE_THREADS"], env["MESHSERVE_MODEL"]) == (
        "float32",
        "2",
        "/models/tiny",
    )
    assert pod["terminationGracePeriodSeconds"] == 70


def test_builtin_and_init_model_sources(docs):
    default_worker = deployments_by_component(docs["default"])["worker"]
    assert "MESHSERVE_MODEL" not in config_env(docs["default"], default_worker)  # the built-in model, in the cache
    pod = deployments_by_component(docs["autoscaling-off"])["worker"]["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["command"] == ["sh", "-c", "cp -r /seed/. /models/"]
    assert {"name": "model", "mountPath": "/models"} in init["volumeMounts"]
    assert "emptyDir" in {v["name"]: v for v in pod["volumes"]}["model"]


def test_the_api_keys_secret_is_what_the_gateway_reads(docs):
    from meshserve.gateway.auth import parse_keys

    for name, tenants in (("default", []), ("gpu-workers", VALUE_SETS["gpu-workers"]["auth"]["tenants"])):
        (secret,) = of_kind(docs[name], "Secret").values()
        keys = json.loads(secret["stringData"]["api-keys.json"])
        assert keys == {"tenants": tenants}
        assert {h: t.name for h, t in parse_keys(keys).items()} == {t["key_sha256"][0]: t["name"] for t in tenants}
        gateway = deployments_by_component(docs[name])["gateway"]
        pod = gateway["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["api-keys"]["secret"]["secretName"] == secret["metadata"]["name"]
        assert config_env(docs[name], gateway)["MESHSERVE_API_KEYS_FILE"] == "/etc/meshserve/api-keys.json"
        # A directory mount (no subPath): a rotated Secret reaches the running gateway.
        mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "api-keys")
        assert mount == {"name": "api-keys", "mountPath": "/etc/meshserve", "readOnly": True}


def test_an_existing_secret_is_mounted_and_none_is_created(docs):
    assert not of_kind(docs["tracing"], "Secret")
    pod = deployments_by_component(docs["tracing"])["gateway"]["spec"]["template"]["spec"]
    volume = {v["name"]: v for v in pod["volumes"]}["api-keys"]["secret"]
    assert volume == {"secretName": "tenant-keys", "items": [{"key": "keys.json", "path": "api-keys.json"}]}


def test_auth_off_must_be_said_and_is_warned_about(docs, rendered):
    assert not of_kind(docs["auth-off"], "Secret")
    env = config_env(docs["auth-off"], deployments_by_component(docs["auth-off"])["gateway"])
    assert env["MESHSERVE_ALLOW_UNAUTHENTICATED"] == "true" and "MESHSERVE_API_KEYS_FILE" not in env
    notes = rendered["auth-off"]["meshserve/templates/NOTES.txt"]
    assert "WARNING: auth.enabled is false" in notes
    gateway = next(s for s in of_kind(docs["auth-off"], "Service").values() if component_of(s) == "gateway")
    assert gateway["spec"]["type"] == "LoadBalancer"
    assert gateway["spec"]["loadBalancerSourceRanges"] == ["10.0.0.0/8"]
    env = config_env(docs["default"], deployments_by_component(docs["default"])["gateway"])
    assert "MESHSERVE_ALLOW_UNAUTHENTICATED" not in env
    assert "refuses every request" in rendered["default"]["meshserve/templates/NOTES.txt"]


def test_tracing_goes_to_the_collector(docs):
    for component, deployment in deployments_by_component(docs["tracing"]).items():
        env = config_env(docs["tracing"], deployment)
        assert env["MESHSERVE_TRACE"] == "otlp"
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability:4317"
        assert (env["OTEL_TRACES_SAMPLER"], env["OTEL_TRACES_SAMPLER_ARG"]) == ("parentbased_traceidratio", "0.25")
        assert env["OTEL_SERVICE_NAME"] == f"meshserve-{component}"
        assert f"k8s.namespace.name={NAMESPACE}" in env["OTEL_RESOURCE_ATTRIBUTES"]
    for deployment in of_kind(docs["default"], "Deployment").values():
        env = config_env(docs["default"], deployment)
        assert env["MESHSERVE_TRACE"] == "none" and "OTEL_EXPORTER_OTLP_ENDPOINT" not in env


def test_service_monitor_only_when_asked(docs):
    assert not [d for d in docs["default"] if d["kind"] == "ServiceMonitor"]
    (monitor,) = [d for d in docs["tracing"] if d["kind"] == "ServiceMonitor"]
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}


def test_worker_autoscaler_behaviour(docs):
    hpas = {component_of(h): h for h in of_kind(docs["tracing"], "HorizontalPodAutoscaler").values()}
    worker = hpas["worker"]["spec"]
    assert {m["pods"]["metric"]["name"]: m["pods"]["target"] for m in worker["metrics"]} == {
        "meshserve_worker_waiting_sequences": {"type": "AverageValue", "averageValue": "2"},
        "meshserve_worker_kv_cache_usage_ratio": {"type": "AverageValue", "averageValue": "800m"},
    }
    behaviour = worker["behavior"]
    assert behaviour["scaleDown"]["stabilizationWindowSeconds"] == 600
    assert behaviour["scaleDown"]["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 300}]
    assert behaviour["scaleUp"]["stabilizationWindowSeconds"] == 0
    assert hpas["gateway"]["spec"]["metrics"][0]["resource"]["target"] == {
        "type": "Utilization",
        "averageUtilization": 70,
    }


def test_the_adapter_example_serves_the_metrics_the_worker_hpa_asks_for(docs):
    rules = yaml.safe_load((CHART / "examples" / "prometheus-adapter-rules.yaml").read_text())
    served = set()
    for rule in rules["rules"]["custom"]:
        series = re.match(r"(\w+)\{", rule["seriesQuery"]).group(1)
        assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
        served.add(re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\1"), series))
        assert "<<.LabelMatchers>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]
    for hpa in of_kind(docs["tracing"], "HorizontalPodAutoscaler").values():
        for metric in hpa["spec"]["metrics"]:
            if metric["type"] == "Pods":
                assert metric["pods"]["metric"]["name"] in served


BAD_VALUES = [
    ({"worker": {"replicas": -1}}, "/worker/replicas", "minimum"),
    ({"gateway": {"replicas": "three"}}, "/gateway/replicas", "want integer"),
    ({"router": {"maxQueued": 5}}, "/router", "'maxQueued' not allowed"),
    ({"workers": {"replicas": 2}}, "'workers' not allowed", ""),
    ({"worker": {"config": {"dtype": "fp8"}}}, "/worker/config/dtype", "float32"),
    ({"worker": {"autoscaling": {"maxReplicas": 0}}}, "/worker/autoscaling/maxReplicas", "minimum"),
    (
        {"auth": {"tenants": [{"name": "acme", "key_sha256": ["not-a-hash"]}]}},
        "/auth/tenants/0/key_sha256/0",
        "pattern",
    ),
    ({"gateway": {"service": {"type": "ExternalName"}}}, "/gateway/service/type", "LoadBalancer"),
    (
        {"gateway": {"autoscaling": {"targetCPUUtilizationPercentage": 150}}},
        "targetCPUUtilizationPercentage",
        "maximum",
    ),
]


@pytest.mark.parametrize(("values", "where", "what"), BAD_VALUES)
def test_bad_values_are_refused_with_the_key_named(values, where, what):
    with helm.Chart.load(str(CHART)) as chart:
        with pytest.raises(helm.HelmValuesError) as caught:
            chart.validate_schema(values)
        assert where in str(caught.value) and what in str(caught.value)
        with pytest.raises(helm.HelmValuesError):
            chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


TEMPLATE_REFUSALS = [
    ({"tracing": {"enabled": True}}, "tracing.endpoint"),
    ({"model": {"source": "pvc"}}, "model.pvc.claimName"),
    ({"model": {"source": "init"}}, "model.init.command"),
    ({"router": {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}}, "router.autoscaling.maxReplicas"),
    ({"rbac": {"create": False}}, "router.discovery"),
    (
        {"worker": {"autoscaling": {"waitingSequences": {"enabled": False}, "kvCacheUsage": {"enabled": False}}}},
        "never scale on CPU",
    ),
]


@pytest.mark.parametrize(("values", "message"), TEMPLATE_REFUSALS)
def test_inconsistent_values_fail_the_render_with_a_message(values, message):
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        render(values)


# Values documented as a whole (a Kubernetes object or a probe's settings), not key by key.
WHOLE_VALUES = {"resources", "podSecurityContext", "containerSecurityContext", "namespaceSelector", "probes"}


def leaf_keys(values: dict[str, Any], prefix: str = "") -> Iterator[str]:
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and key not in WHOLE_VALUES:
            yield from leaf_keys(value, f"{path}.")
        else:
            yield path


def test_the_chart_readme_lists_every_value():
    readme = (CHART / "README.md").read_text()
    with helm.Chart.load(str(CHART)) as chart:
        defaults = chart.values
    missing = [key for key in leaf_keys(defaults) if f"`{key}`" not in readme]
    assert not missing, f"values missing from helm/meshserve/README.md: {missing}"
