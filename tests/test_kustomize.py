"""The plain manifests in k8s/: the base is the chart rendered (and must stay so), and `kubectl kustomize`
output passes the same Kubernetes schema validation and policy checks as the chart's."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from chart_checks import KUBE_VERSIONS, check_all, deployments_by_component, of_kind, validate_objects

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
BUILDS = {"base": K8S / "base", "cpu-small": K8S / "overlays" / "cpu-small"}
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed (the raw files are still checked)")


def load_render_base() -> Any:
    spec = importlib.util.spec_from_file_location("render_base", K8S / "render_base.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def built() -> dict[str, list[dict[str, Any]]]:
    out = {}
    for name, path in BUILDS.items():
        result = subprocess.run(
            [KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, f"kubectl kustomize {path}: {result.stderr}"
        out[name] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return out


def test_the_base_is_the_chart_rendered():
    wanted = load_render_base().render_base()
    present = {p.name: p.read_text() for p in (K8S / "base").glob("*.yaml")}
    stale = sorted(name for name in wanted.keys() | present.keys() if wanted.get(name) != present.get(name))
    assert not stale, f"k8s/base differs from the chart in {stale}: run python k8s/render_base.py"


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_the_raw_manifests_are_valid_kubernetes(version):
    docs = []
    for path in [*sorted((K8S / "base").glob("*.yaml")), BUILDS["cpu-small"] / "namespace.yaml"]:
        if path.name != "kustomization.yaml":
            docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert len(docs) > 20
    assert not validate_objects(docs, version)


@needs_kubectl
@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("build", BUILDS)
def test_kustomize_output_is_valid_kubernetes(built, build, version):
    assert not validate_objects(built[build], version)


@needs_kubectl
@pytest.mark.parametrize("build", BUILDS)
def test_kustomize_output_meets_the_chart_policies(built, build):
    check_all(built[build])


@needs_kubectl
def test_the_small_overlay_is_cpu_only_in_its_own_namespace(built):
    from meshserve.gateway.auth import parse_keys

    docs = built["cpu-small"]
    (namespace,) = of_kind(docs, "Namespace").values()
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "meshserve", doc["metadata"]["name"]
    (binding,) = of_kind(docs, "RoleBinding").values()
    assert binding["subjects"][0]["namespace"] == "meshserve"
    deployments = deployments_by_component(docs)
    for component, deployment in deployments.items():
        image = "meshserve-worker" if component == "worker" else "meshserve"  # the CPU worker image, no GPU one
        assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == f"ghcr.io/meshserve/{image}:0.1.0"
    worker = deployments["worker"]["spec"]["template"]["spec"]
    assert not any("gpu" in key for part in worker["containers"][0]["resources"].values() for key in part)
    assert "tolerations" not in worker
    assert not [h for h in of_kind(docs, "HorizontalPodAutoscaler").values() if "worker" in h["metadata"]["name"]]
    (secret,) = of_kind(docs, "Secret").values()
    import base64

    keys = json.loads(base64.b64decode(secret["data"]["api-keys.json"]))
    assert keys == json.loads((BUILDS["cpu-small"] / "api-keys.json").read_text())
    parse_keys(keys)  # the gateway accepts the file as it is
