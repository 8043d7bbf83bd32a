"""The gateway's API keys in the chart: the Secret it reads, an existing one, and auth turned off (said and warned)."""

from __future__ import annotations

import json

from chart_checks import VALUE_SETS, component_of, config_env, deployments_by_component, of_kind


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
