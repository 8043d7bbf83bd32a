"""The Helm chart renders, for every values set, lint-clean objects that are valid Kubernetes (strictly, for each
supported version) and meet the policies: restricted containers, fenced traffic, safe autoscaling and drain."""

from __future__ import annotations

import copy

import pytest

from chart_checks import (
    CHART,
    COMPONENTS,
    KUBE_VERSIONS,
    VALUE_SETS,
    check_all,
    component_of,
    deployments_by_component,
    helm,
    of_kind,
    selects,
    validate_objects,
)


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
