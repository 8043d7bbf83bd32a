"""Worker pods as the chart's values shape them: GPU or CPU-only nodes, and where the model comes from."""

from __future__ import annotations

import pytest

from chart_checks import config_env, deployments_by_component, helm, objects, render


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
    assert container["image"] == "ghcr.io/meshserve/meshserve-worker:0.1.0"
    assert {v["name"]: v for v in pod["volumes"]}["model"]["hostPath"] == {"path": "/srv/models", "type": "Directory"}
    env = config_env(docs["cpu-only"], worker)
    assert (env["MESHSERVE_DTYPE"], env["MESHSERVE_THREADS"], env["MESHSERVE_MODEL"]) == (
        "float32",
        "2",
        "/models/tiny",
    )
    assert (env["MESHSERVE_MODEL_IMPL"], env["MESHSERVE_COMPILE"]) == ("fast", "on")
    assert pod["terminationGracePeriodSeconds"] == 70


def test_builtin_and_init_model_sources(docs):
    default_worker = deployments_by_component(docs["default"])["worker"]
    assert "MESHSERVE_MODEL" not in config_env(docs["default"], default_worker)  # the built-in model, in the cache
    pod = deployments_by_component(docs["autoscaling-off"])["worker"]["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["command"] == ["sh", "-c", "cp -r /seed/. /models/"]
    assert {"name": "model", "mountPath": "/models"} in init["volumeMounts"]
    assert "emptyDir" in {v["name"]: v for v in pod["volumes"]}["model"]


def test_the_default_worker_settings_reach_its_env(docs):
    env = config_env(docs["default"], deployments_by_component(docs["default"])["worker"])
    assert (env["MESHSERVE_MODEL_IMPL"], env["MESHSERVE_COMPILE"], env["MESHSERVE_DTYPE"]) == (
        "auto",
        "auto",
        "bfloat16",
    )
    # torch.compile's code goes to the cache emptyDir (writable, kept across container restarts).
    assert env["TORCHINDUCTOR_CACHE_DIR"] == f"{env['MESHSERVE_CACHE']}/inductor"


@pytest.mark.parametrize(
    ("values_file", "wanted"),
    [
        # YAML 1.1, as Helm reads -f files: a bare off is false and a bare on is true; the worker wants off and on.
        ("compile: off\nmodelImpl: transformers\ndtype: auto", ("off", "transformers", "auto")),
        ("compile: on\nmodelImpl: fast", ("on", "fast", "bfloat16")),
        ('compile: "off"', ("off", "auto", "bfloat16")),
    ],
)
def test_model_impl_compile_and_dtype_from_a_values_file(values_file, wanted):
    config = "\n".join(f"    {line}" for line in values_file.splitlines())
    values = helm.values_from_yaml(f"worker:\n  config:\n{config}\n")
    docs = objects(render(values))
    env = config_env(docs, deployments_by_component(docs)["worker"])
    assert (env["MESHSERVE_COMPILE"], env["MESHSERVE_MODEL_IMPL"], env["MESHSERVE_DTYPE"]) == wanted
