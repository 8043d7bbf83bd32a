"""The images: built by docker/build.sh, started as the chart's pods would start them, and agreeing with the chart.

The slow tests build both images (about 2.5 minutes here: a Debian base by debootstrap, packages through this
machine's pip) and start every component from its image's root filesystem (see image_support.py for how, without a
container runtime). They are skipped only where nothing can be built: without root, or without buildah and apt-get.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import re
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chart_checks import config_env, deployments_by_component, objects, of_kind, render
from image_support import (
    BUILD_TIMEOUT,
    IMAGES,
    REPOSITORY,
    ROOT,
    TAG,
    Built,
    Cluster,
    built_images,
    cannot_build,
    pod_of,
    temporary_directory,
)

API_KEY = "ms-image-test-key"
# The chart pointed at the images built here; CPU workers on the built-in model, small enough for 2 cores. Router
# discovery by DNS: the cluster stand-in has /etc/hosts, not a Kubernetes API.
VALUES: dict[str, Any] = {
    "image": {"repository": f"{REPOSITORY}/meshserve", "tag": TAG},
    "router": {"discovery": "dns"},
    "worker": {
        "image": {"repository": f"{REPOSITORY}/meshserve-worker", "tag": TAG},
        "gpu": {"enabled": False},
        "config": {"threads": 1, "kvCacheMemory": "256MiB", "maxNumSeqs": 4},
    },
    "auth": {"tenants": [{"name": "images", "key_sha256": [hashlib.sha256(API_KEY.encode()).hexdigest()]}]},
    # The stand-in cluster has no cert-manager to fill the TLS Secrets; mutual TLS is tests/test_tls.py's.
    "tls": {"enabled": False},
}
# The model stack: in the worker image, never in the services image.
MODEL_STACK = ("torch", "transformers", "safetensors", "numpy")
START_TIMEOUT = 240
# Whichever slow test runs first builds the images (the module's fixture), so each may take that long.
SLOW_TIMEOUT = BUILD_TIMEOUT + START_TIMEOUT + 120


def load_requirements_module() -> Any:
    spec = importlib.util.spec_from_file_location("image_requirements", ROOT / "docker" / "requirements.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_services_image_leaves_out_exactly_the_model_stack():
    requirements = load_requirements_module()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {requirements.project_name(r): r for r in project["dependencies"]}
    assert set(MODEL_STACK) == requirements.WORKER_ONLY <= set(names)
    services = requirements.requirements("services")
    assert services == [r for n, r in names.items() if n not in MODEL_STACK] + project["optional-dependencies"]["k8s"]
    assert requirements.requirements("worker") == project["dependencies"]
    assert requirements.requirements("worker-gpu") == project["dependencies"] + project["optional-dependencies"]["gpu"]


def dockerfile_stages(path: Path) -> dict[str, list[str]]:
    """Stage name -> its instructions (continuations joined, comments dropped, the FROM line first)."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines() if not line.startswith("#")))
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in (" ".join(raw.split()) for raw in text.splitlines()):
        if line.startswith("FROM "):
            current = stages.setdefault(line.rsplit(" AS ", 1)[-1], [])
        if line:
            current.append(line)
    return stages


def test_the_gpu_worker_image_takes_the_cpu_workers_steps():
    cpu = dockerfile_stages(ROOT / "docker" / "Dockerfile")
    gpu = dockerfile_stages(ROOT / "docker" / "Dockerfile.worker-gpu")
    for stage in ("venv", "runtime"):  # the same steps, on their own base
        assert cpu[stage][1:] == gpu[stage][1:], stage
    assert cpu["worker"] == gpu["worker"]

    def torch_step(steps: list[str]) -> tuple[str, list[str]]:
        (torch,) = [s for s in steps if "torch==2.13.0" in s]
        return torch, [s for s in steps if s != torch]

    (cpu_torch, cpu_rest), (gpu_torch, gpu_rest) = torch_step(cpu["worker-venv"]), torch_step(gpu["worker-venv"])
    assert cpu_rest[2].startswith("ARG TORCH_INDEX=") and gpu_rest[2].startswith("ARG TORCH_INDEX=")
    assert cpu_rest[:2] == gpu_rest[:2] and cpu_rest[3:] == gpu_rest[3:]  # all but the default torch index
    assert '--index-url "$TORCH_INDEX"' in cpu_torch and '--index-url "$TORCH_INDEX"' in gpu_torch
    assert "requirements.py worker " in cpu_torch and "requirements.py worker-gpu " in gpu_torch


# ---- built images ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built() -> Iterator[Built]:
    reason = cannot_build()
    if reason:
        pytest.skip(reason)
    with built_images(temporary_directory()) as images:
        yield images


@pytest.fixture(scope="module")
def chart_docs() -> list[dict[str, Any]]:
    return objects(render(VALUES))


@dataclasses.dataclass
class Component:
    name: str
    deployment: dict[str, Any]
    image: str
    config: dict[str, Any]
    container: dict[str, Any]


def components(docs: list[dict[str, Any]], built: Built) -> list[Component]:
    found = []
    for name, deployment in deployments_by_component(docs).items():
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        found.append(Component(name, deployment, container["image"], built.config(container["image"]), container))
    return found


def run_in_image(root: Path, uid: int, gid: int, env: dict[str, str], *command: str) -> str:
    """A command in an image's root filesystem as uid:gid with exactly `env` (no namespaces: a quick look)."""
    import subprocess

    done = subprocess.run(
        ["chroot", f"--userspec={uid}:{gid}", str(root), "/usr/bin/env", "-i"]
        + [f"{k}={v}" for k, v in env.items()]
        + list(command),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"{command} failed ({done.returncode}): {done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.slow
@pytest.mark.timeout(SLOW_TIMEOUT)
def test_the_services_image_has_no_model_stack(built, capsys):
    site = "opt/meshserve/lib/python3.11/site-packages"
    with built.rootfs(IMAGES["services"]) as services, built.rootfs(IMAGES["worker"]) as worker:
        in_services = sorted(p.name for p in (services / site).iterdir() if p.name in MODEL_STACK)
        in_worker = {p.name for p in (worker / site).iterdir()}
    assert not in_services, f"the services image holds {in_services}"
    assert set(MODEL_STACK) <= in_worker, f"the worker image lacks {set(MODEL_STACK) - in_worker}"
    with capsys.disabled():
        sizes = ", ".join(f"{image} {size}" for image, size in built.sizes.items())
        print(f"\nimages built in {built.seconds:.0f} s: {sizes}")


@pytest.mark.slow
@pytest.mark.timeout(SLOW_TIMEOUT)
def test_the_chart_and_the_images_agree(built, chart_docs):
    """Each pod's image: its user, ports, writable paths, entrypoint and every variable the chart sets."""
    found = components(chart_docs, built)
    assert sorted(c.name for c in found) == ["aggregator", "gateway", "router", "worker"]
    for c in found:
        assert c.image == IMAGES["worker" if c.name == "worker" else "services"], c.name
        pod = c.deployment["spec"]["template"]["spec"]
        security = {**pod["securityContext"], **c.container["securityContext"]}
        assert c.config["User"] == f"{security['runAsUser']}:{security['runAsGroup']}", c.name
        for port in c.container["ports"]:
            assert f"{port['containerPort']}/{port['protocol'].lower()}" in c.config["ExposedPorts"], (c.name, port)
        volumes = {v["name"]: v for v in pod["volumes"]}
        empty_dirs = {m["mountPath"] for m in c.container["volumeMounts"] if "emptyDir" in volumes[m["name"]]}
        assert empty_dirs == set(c.config["Volumes"]), f"{c.name}: chart {empty_dirs}, image {c.config['Volumes']}"
        image_env = dict(e.split("=", 1) for e in c.config["Env"])
        env = {**image_env, **config_env(chart_docs, c.deployment)}
        for name, value in env.items():  # the image's defaults are the chart's, and every cache is writable
            if name in image_env and name != "PATH":
                assert image_env[name] == value, f"{c.name}: {name} is {image_env[name]!r} in the image, {value!r}"
            if name in ("HOME", "MESHSERVE_CACHE") or name.endswith(("_CACHE_DIR", "_CACHE_HOME", "HF_HOME")):
                assert any(value == d or value.startswith(f"{d}/") for d in empty_dirs), f"{c.name}: {name}={value}"
        assert c.config["Entrypoint"] == ["meshserve"] and c.container["args"] == [c.name]
        check_in_image(built, c, env, security["runAsUser"], security["runAsGroup"])


def check_in_image(built: Built, c: Component, env: dict[str, str], uid: int, gid: int) -> None:
    """The pod's command line is one the image's meshserve takes, and its environment parses as the service's
    settings with the chart's ports (the service's own parsing, in the image); the user's home is HOME."""
    with built.rootfs(c.image) as root:
        run_in_image(root, uid, gid, env, *c.config["Entrypoint"], *c.container["args"], "--help")
        config_class = f"{c.name.capitalize()}Config"
        parsed = json.loads(
            run_in_image(
                root, uid, gid, env, "python3", "-c",
                "import dataclasses, json; from meshserve.common import config as cfg; "
                f"print(json.dumps(dataclasses.asdict(cfg.from_args(cfg.{config_class}))))",
            )
        )  # fmt: skip
        passwd = run_in_image(root, uid, gid, env, "getent", "passwd", str(uid)).split(":")
    ports = {p["name"]: p["containerPort"] for p in c.container["ports"]}
    assert (parsed["port"], parsed["metrics_port"]) == (ports["grpc"], ports["metrics"]), c.name
    if c.name == "gateway":
        assert parsed["http_port"] == ports["http"]
    assert passwd[5] == env["HOME"], f"{c.name}: the image's user {uid} has home {passwd[5]}"


@contextlib.contextmanager
def started(built: Built, docs: list[dict[str, Any]], workdir: Path) -> Iterator[tuple[Cluster, list[Component]]]:
    """Every component of the chart started from its image; all stopped (SIGTERM, then SIGKILL) afterwards."""
    from chart_checks import NAMESPACE

    services = [s["metadata"]["name"] for s in of_kind(docs, "Service").values()]
    suffixes = ("", f".{NAMESPACE}", f".{NAMESPACE}.svc", f".{NAMESPACE}.svc.cluster.local")
    cluster = Cluster(workdir, [f"{name}{suffix}" for name in services for suffix in suffixes])
    found = components(docs, built)
    with contextlib.ExitStack() as stack:
        try:
            for c in found:
                rootfs = stack.enter_context(built.rootfs(c.image))
                cluster.start(pod_of(docs, c.deployment, c.config, workdir / "volumes"), rootfs)
            yield cluster, found
        finally:
            cluster.stop()


@pytest.mark.slow
@pytest.mark.timeout(SLOW_TIMEOUT)
def test_every_component_serves_from_its_image_read_only_as_its_user(built, chart_docs):
    workdir = temporary_directory()
    try:
        with started(built, chart_docs, workdir) as (cluster, found):
            ports = {c.name: {p["name"]: p["containerPort"] for p in c.container["ports"]} for c in found}
            addresses = [f"127.0.0.1:{p['grpc']}" for p in ports.values()]
            deadline, statuses = time.monotonic() + START_TIMEOUT, {}
            while time.monotonic() < deadline and not cluster.exited():
                statuses = cluster.client("health", *addresses)
                if set(statuses.values()) == {"SERVING"}:
                    break
                time.sleep(2)
            assert set(statuses.values()) == {"SERVING"} and not cluster.exited(), (
                f"health {statuses}, exited {cluster.exited()}\n{cluster.logs()}"
            )
            # The worker made the built-in model in its cache volume, the only place it may write besides /tmp.
            models = list((workdir / "volumes" / "worker" / "cache").glob("models/*/config.json"))
            assert models, f"no built-in model in the worker's cache\n{cluster.logs()}"
            http = f"http://127.0.0.1:{ports['gateway']['http']}"
            listed = cluster.client("http", f"{http}/v1/models", API_KEY)
            assert listed["status"] == 200, listed
            model = json.loads(listed["body"])["data"][0]["id"]
            body = {"model": model, "prompt": "Tell me a story", "max_tokens": 8, "temperature": 0}
            answer = cluster.client("http", f"{http}/v1/completions", API_KEY, json.dumps(body))
            assert answer["status"] == 200, f"{answer}\n{cluster.logs()}"
            generated = json.loads(answer["body"])["usage"]["completion_tokens"]
            assert generated > 0, answer
            # The tokens came from the worker, reached only through the router.
            metrics = cluster.client("http", f"http://127.0.0.1:{ports['worker']['metrics']}/metrics", API_KEY)
            counted = re.search(r"^meshserve_worker_generation_tokens_total (\S+)$", metrics["body"], re.M)
            assert counted and float(counted.group(1)) >= generated, metrics["body"][-2000:]
        codes = cluster.stop()  # already stopped: the codes each pod's pid 1 exited with on SIGTERM
        assert codes == dict.fromkeys(codes, 0), f"exit codes after SIGTERM {codes}\n{cluster.logs()}"
    finally:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)


def test_the_slow_tests_run_by_default():
    """CI runs `python -m pytest -q`: the image tests are marked slow, never deselected by the configuration."""
    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "slow" not in options.get("addopts", ""), options
    assert any(m.startswith("slow:") for m in options["markers"])
