"""Traces to the collector, the ServiceMonitor, and autoscalers on the metrics the workers export (through the
Prometheus adapter example)."""

from __future__ import annotations

import re

import yaml

from chart_checks import CHART, NAMESPACE, component_of, config_env, deployments_by_component, of_kind


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
