"""The images as tests/test_images.py builds and starts them, without a container runtime.

docker/build.sh --local-base builds both images with buildah into a private storage under a temporary directory.
A component then runs as a Kubernetes pod of the chart would: from its image's root filesystem (`buildah mount`),
in mount and pid namespaces of its own (`unshare`), `chroot` as the pod's user, the root read-only, the chart's
volumes mounted where the chart mounts them (emptyDirs and Secrets as directories here), the image's environment
overlaid by the container's. All components share one network namespace with only a loopback interface, standing in
for the cluster network: the chart's ports as they are, its Service names in /etc/hosts. Clients reach them with
`python tests/image_support.py health|http ...` run inside that namespace.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BUILD_SH = ROOT / "docker" / "build.sh"
REPOSITORY, TAG = "localhost/meshserve-test", "test"
IMAGES = {"services": f"{REPOSITORY}/meshserve:{TAG}", "worker": f"{REPOSITORY}/meshserve-worker:{TAG}"}
# About 2.5 minutes here; the bound keeps CI (the whole suite) under its 30.
BUILD_TIMEOUT = 720
# Device nodes a container runtime gives every container.
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")


def cannot_build() -> str | None:
    """Why this machine cannot build the images (None: it can). build.sh installs what is missing with apt-get."""
    if sys.platform != "linux" or os.geteuid() != 0:
        return "building the images needs root on Linux (debootstrap, buildah, mount namespaces)"
    if not (shutil.which("buildah") and shutil.which("debootstrap")) and not shutil.which("apt-get"):
        return "building the images needs buildah and debootstrap, or apt-get to install them"
    if sys.version_info[:2] != (3, 11):
        return "build.sh --host-pip needs Python 3.11 here, the images' Python"
    return None


@dataclasses.dataclass
class Built:
    """Both images in a private buildah storage."""

    env: dict[str, str]
    sizes: dict[str, str]  # image -> size as build.sh printed it
    seconds: float

    def buildah(self, *args: str) -> str:
        return subprocess.run(["buildah", *args], env=self.env, check=True, capture_output=True, text=True).stdout

    def config(self, image: str) -> dict[str, Any]:
        """The image's OCI config: User, Env, Entrypoint, Cmd, ExposedPorts, Volumes, WorkingDir."""
        return json.loads(self.buildah("inspect", "--type", "image", image))["OCIv1"]["config"]

    @contextlib.contextmanager
    def rootfs(self, image: str) -> Iterator[Path]:
        """The image's root filesystem, in a working container of its own (removed afterwards)."""
        container = self.buildah("from", "--pull-never", "--quiet", image).strip()
        try:
            yield Path(self.buildah("mount", container).strip())
        finally:
            self.buildah("rm", container)


@contextlib.contextmanager
def built_images(workdir: Path) -> Iterator[Built]:
    """Runs docker/build.sh --local-base into a storage under workdir; removes every image and layer afterwards."""
    storage = workdir / "storage"
    conf = workdir / "storage.conf"
    conf.write_text(f'[storage]\ndriver = "overlay"\ngraphroot = "{storage}"\nrunroot = "{workdir / "run"}"\n')
    env = {**os.environ, "CONTAINERS_STORAGE_CONF": str(conf), "BUILD_ENGINE": "buildah", "TMPDIR": str(workdir)}
    env["PYTHON"] = sys.executable  # whose pip fetches the packages
    started = time.monotonic()
    try:
        build = subprocess.Popen(
            [str(BUILD_SH), "--local-base", "--repository", REPOSITORY, "--tag", TAG],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # so a build past its time is stopped whole: buildah, pip, the wheelhouse server
        )
        try:
            out, err = build.communicate(timeout=BUILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            stop_group(build)
            raise AssertionError(f"docker/build.sh took over {BUILD_TIMEOUT} s") from None
        assert build.returncode == 0, f"docker/build.sh failed ({build.returncode}):\n{err[-6000:]}"
        sizes = dict(line.split(" ", 1) for line in out.strip().splitlines())
        assert set(sizes) == set(IMAGES.values()), f"build.sh printed {out!r}"
        yield Built(env=env, sizes=sizes, seconds=time.monotonic() - started)
    finally:
        # The working containers first (they unmount their layers); the images go with the directory.
        subprocess.run(["buildah", "rm", "--all"], env=env, capture_output=True, timeout=300)
        with open("/proc/self/mounts") as mounts:  # what containers/storage may leave mounted
            points = [line.split()[1] for line in mounts if line.split()[1].startswith(str(workdir))]
        for point in sorted(points, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)


def stop_group(process: subprocess.Popen[Any], grace: float = 10) -> None:
    """SIGTERM to the process group `process` leads, SIGKILL after `grace`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


# ---- a pod of the chart, as it runs -------------------------------------------------------------------------


@dataclasses.dataclass
class Mount:
    path: str
    source: Path  # a directory here
    read_only: bool


@dataclasses.dataclass
class Pod:
    component: str
    image: str
    command: list[str]
    env: dict[str, str]
    uid: int
    gid: int
    groups: list[int]
    read_only_root: bool
    no_new_privileges: bool
    mounts: list[Mount]


def pod_of(docs: list[dict[str, Any]], deployment: dict[str, Any], image: dict[str, Any], volumes_dir: Path) -> Pod:
    """The process the kubelet would start for the Deployment's container, on the image with config `image`."""
    from chart_checks import component_of, config_env, of_kind

    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    # Kubernetes: command replaces the image's Entrypoint, args its Cmd.
    command = container.get("command", image.get("Entrypoint") or []) + container.get("args", image.get("Cmd") or [])
    env = dict(entry.split("=", 1) for entry in image.get("Env", []))
    env.update(config_env(docs, deployment))
    security = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
    user, _, group = image.get("User", "0").partition(":")
    uid, gid = security.get("runAsUser", int(user)), security.get("runAsGroup", int(group or 0))
    groups = [security["fsGroup"]] if "fsGroup" in security else []
    secrets = of_kind(docs, "Secret")
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = []
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        source = volumes_dir / component_of(deployment) / mount["name"]
        source.mkdir(parents=True, exist_ok=True)
        if "emptyDir" in volume:  # owned by the pod's fsGroup, as the kubelet makes it
            os.chown(source, 0, groups[0] if groups else 0)
            source.chmod(0o2777 if groups else 0o777)
        elif "secret" in volume:
            secret = secrets[volume["secret"]["secretName"]]
            data = {k: v.encode() for k, v in secret.get("stringData", {}).items()}
            data.update({k: base64.b64decode(v) for k, v in secret.get("data", {}).items()})
            for item in volume["secret"].get("items") or [{"key": k, "path": k} for k in data]:
                (source / item["path"]).write_bytes(data[item["key"]])
        else:
            raise AssertionError(f"the image test mounts emptyDir and secret volumes only, not {volume}")
        mounts.append(Mount(mount["mountPath"], source, bool(mount.get("readOnly"))))
    return Pod(
        component=component_of(deployment),
        image=container["image"],
        command=command,
        env=env,
        uid=uid,
        gid=gid,
        groups=groups,
        read_only_root=bool(security.get("readOnlyRootFilesystem")),
        no_new_privileges=security.get("allowPrivilegeEscalation") is False,
        mounts=mounts,
    )


def launch_script(pod: Pod, rootfs: Path, hosts: Path) -> str:
    """Shell run as pid 1 of new mount and pid namespaces: mounts as a container runtime would, then execs the
    pod's command in the root filesystem as its user."""
    q = shlex.quote
    lines = ["set -eu", f"root={q(str(rootfs))}"]
    # Mount points are made first, in the working container's own layer, as a runtime makes them.
    for path in [m.path for m in pod.mounts] + ["/proc", "/sys", "/dev"]:
        lines.append(f'mkdir -p "$root"{q(path)}')
    lines.append('[ -e "$root/etc/hosts" ] || : > "$root/etc/hosts"')
    if pod.read_only_root:
        lines += ['mount --bind "$root" "$root"', 'mount -o remount,bind,ro "$root"']
    lines += [
        'mount -t proc proc "$root/proc"',
        'mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$root/sys"',
        'mount -t tmpfs -o mode=755,size=1m tmpfs "$root/dev"',
        *(f': > "$root/dev/{d}" && mount --bind /dev/{d} "$root/dev/{d}"' for d in DEVICES),
        'mkdir "$root/dev/shm" && mount -t tmpfs -o mode=1777,size=64m tmpfs "$root/dev/shm"',
        f'mount --bind {q(str(hosts))} "$root/etc/hosts" && mount -o remount,bind,ro "$root/etc/hosts"',
    ]
    for m in pod.mounts:
        lines.append(f'mount --bind {q(str(m.source))} "$root"{q(m.path)}')
        if m.read_only:
            lines.append(f'mount -o remount,bind,ro "$root"{q(m.path)}')
    if pod.read_only_root:
        lines.append(
            'if (: > "$root/.write-probe") 2>/dev/null; then echo "image test: the root is writable" >&2; exit 90; fi'
        )
    env = " ".join(q(f"{k}={v}") for k, v in sorted(pod.env.items()))
    groups = ",".join(map(str, pod.groups)) or str(pod.gid)
    nnp = "setpriv --no-new-privs " if pod.no_new_privileges else ""
    lines.append(
        f'exec {nnp}chroot --userspec={pod.uid}:{pod.gid} --groups={groups} "$root" '
        f"/usr/bin/env -i {env} {' '.join(map(q, pod.command))}"
    )
    return "\n".join(lines) + "\n"


class Cluster:
    """One network namespace (loopback only) for every started pod; its /etc/hosts names the Services."""

    def __init__(self, workdir: Path, service_names: list[str]) -> None:
        self.workdir = workdir
        self.hosts = workdir / "hosts"
        self.hosts.write_text("127.0.0.1 localhost\n" + "".join(f"127.0.0.1 {n}\n" for n in service_names))
        self.holder = subprocess.Popen(
            ["unshare", "--net", "sh", "-c", "ip link set lo up && echo up && exec sleep 86400"],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        if not (self.holder.stdout and self.holder.stdout.readline().strip() == "up"):
            stop_group(self.holder)
            raise AssertionError("could not make a network namespace with a loopback interface")
        self.netns = f"/proc/{self.holder.pid}/ns/net"
        self.pods: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
        self.codes: dict[str, int] | None = None

    def start(self, pod: Pod, rootfs: Path) -> None:
        script = self.workdir / f"{pod.component}.sh"
        script.write_text(launch_script(pod, rootfs, self.hosts))
        log = self.workdir / f"{pod.component}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                ["nsenter", f"--net={self.netns}", "unshare", "--mount", "--pid", "--fork", "--propagation",
                 "private", "sh", str(script)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self.pods[pod.component] = (process, log)

    def logs(self) -> str:
        tails = (f"---- {c} ----\n{log.read_text(errors='replace')[-3000:]}" for c, (_, log) in self.pods.items())
        return "\n".join(tails)

    def exited(self) -> dict[str, int]:
        return {c: p.returncode for c, (p, _) in self.pods.items() if p.poll() is not None}

    def client(self, *args: str, timeout: float = 60) -> Any:
        """`python tests/image_support.py ARGS` inside the network namespace; its JSON answer."""
        done = subprocess.run(
            ["nsenter", f"--net={self.netns}", sys.executable, __file__, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, f"client {args} failed: {done.stderr[-3000:]}"
        return json.loads(done.stdout)

    def stop(self, grace: float = 30) -> dict[str, int]:
        """SIGTERM to each pod's pid 1 (as the kubelet sends it), SIGKILL to what is left after `grace`; each pod's
        exit code (-9: killed). Once: later calls return the same codes."""
        if self.codes is not None:
            return self.codes
        for process, _ in self.pods.values():
            children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
            with contextlib.suppress(OSError, ValueError):
                for pid in children.read_text().split():
                    os.kill(int(pid), signal.SIGTERM)
        deadline = time.monotonic() + grace
        codes = {}
        for component, (process, _) in self.pods.items():
            try:
                codes[component] = process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                codes[component] = -9
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # a pid namespace's pid 1 takes the rest with it
            process.wait()
        stop_group(self.holder, grace=1)
        self.codes = codes
        return codes


# ---- clients, run inside the network namespace ----------------------------------------------------------------


def _health(addresses: list[str]) -> dict[str, str]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    statuses = {}
    for address in addresses:
        with grpc.insecure_channel(address) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
                statuses[address] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as exc:
                statuses[address] = exc.code().name
    return statuses


def _http(url: str, key: str, body: str | None) -> dict[str, Any]:
    import urllib.error
    import urllib.request

    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    request = urllib.request.Request(url, data=body.encode() if body else None, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return {"status": response.status, "body": response.read().decode()}
    except urllib.error.HTTPError as exc:
        return {"status": exc.code, "body": exc.read().decode()}


def main(argv: list[str]) -> int:
    if argv[:1] == ["health"]:
        print(json.dumps(_health(argv[1:])))
    elif argv[:1] == ["http"] and len(argv) in (3, 4):
        print(json.dumps(_http(argv[1], argv[2], argv[3] if len(argv) == 4 else None)))
    else:
        print("usage: image_support.py health ADDRESS... | http URL KEY [JSON_BODY]", file=sys.stderr)
        return 2
    return 0


def temporary_directory() -> Path:
    return Path(tempfile.mkdtemp(prefix="meshserve-images-"))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
