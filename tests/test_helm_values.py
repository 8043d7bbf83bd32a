"""Values the chart refuses (by its schema, or at render with a message) and the README that documents every value."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from chart_checks import CHART, NAMESPACE, RELEASE, helm, render

BAD_VALUES = [
    ({"worker": {"replicas": -1}}, "/worker/replicas", "minimum"),
    ({"gateway": {"replicas": "three"}}, "/gateway/replicas", "want integer"),
    ({"router": {"maxQueued": 5}}, "/router", "'maxQueued' not allowed"),
    ({"workers": {"replicas": 2}}, "'workers' not allowed", ""),
    ({"worker": {"config": {"dtype": "fp8"}}}, "/worker/config/dtype", "float32"),
    ({"worker": {"config": {"modelImpl": "vllm"}}}, "/worker/config/modelImpl", "transformers"),
    ({"worker": {"config": {"compile": "yes"}}}, "/worker/config/compile", "'off'"),
    ({"worker": {"config": {"compile": 1}}}, "/worker/config/compile", "want boolean or string"),
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


def schema_enum(chart: Any, *path: str) -> list[Any]:
    node = chart.schema
    for key in path:
        node = node["properties"][key]
    return node["enum"]


def test_worker_choices_in_the_schema_are_the_workers_own():
    """Every choice the schema lets through is one the worker takes, and the other way round."""
    pytest.importorskip("torch")
    from meshserve.worker.compiled_decode import COMPILE_MODES
    from meshserve.worker.kernels import BACKENDS
    from meshserve.worker.model_runner import DTYPES, MODEL_IMPLS

    wanted = {
        "modelImpl": set(MODEL_IMPLS),
        # true and false are a values file's bare on and off; the chart passes them on as on and off.
        "compile": {*COMPILE_MODES, True, False},
        "dtype": {"auto", *DTYPES},
        "kernels": set(BACKENDS),
    }
    with helm.Chart.load(str(CHART)) as chart:
        for key, choices in wanted.items():
            assert set(schema_enum(chart, "worker", "config", key)) == choices, key


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
