"""Mutual TLS inside the mesh and TLS at the edge, with certificates from `meshserve certs`: who may call
whom, what a caller without a certificate (or without TLS) gets, and certificates rotated under running
servers. Real servers on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import httpx2 as httpx
import openai
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshserve.common import config as cfg
from meshserve.common.channels import sync_channel
from meshserve.common.tls import ROLES, TlsFiles, mesh_tls, role_files, target_options
from meshserve.router.server import start_router
from meshserve.v1 import router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc
from support import MESHSERVE, free_ports, stop_processes, wait_for
from test_cli import Output


def make_certs(directory: Path) -> None:
    result = subprocess.run([*MESHSERVE, "certs", "--dir", str(directory)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("certs")
    make_certs(directory)
    return directory


def channel(address: str, files: TlsFiles | None, peer: str, ca: Path | None = None) -> grpc.Channel:
    """A channel showing `files`' certificate (None: TLS without one, verified with `ca`)."""
    if files is None:
        assert ca is not None
        return sync_channel(address, grpc.ssl_channel_credentials(ca.read_bytes()), target_options(peer))
    return sync_channel(address, files.channel_credentials(), target_options(peer))


def call_code(grpc_channel: grpc.Channel, call: Callable[[grpc.Channel], object]) -> grpc.StatusCode:
    """The status of one call on the channel (closed after it)."""
    with grpc_channel:
        try:
            call(grpc_channel)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def stats_code(address: str, grpc_channel: grpc.Channel) -> grpc.StatusCode:
    return call_code(
        grpc_channel, lambda c: router_pb2_grpc.RouterStub(c).Stats(router_pb2.RouterStatsRequest(), timeout=5)
    )


def router_config(files: TlsFiles) -> cfg.RouterConfig:
    return cfg.RouterConfig(
        port=0, workers="127.0.0.1:1", tls_cert=str(files.cert), tls_key=str(files.key), tls_ca=str(files.ca)
    )


@pytest.fixture
def tls_router(certs: Path, loop_thread) -> Iterator[str]:
    running = loop_thread.run(start_router(router_config(role_files(certs, "router"))))
    yield running.address
    loop_thread.run(running.stop(0))


def test_router_answers_only_gateways_and_aggregators(tls_router: str, certs: Path) -> None:
    codes = {role: stats_code(tls_router, channel(tls_router, role_files(certs, role), "router")) for role in ROLES}
    assert codes == {
        "gateway": grpc.StatusCode.OK,
        "aggregator": grpc.StatusCode.OK,
        "router": grpc.StatusCode.PERMISSION_DENIED,
        "worker": grpc.StatusCode.PERMISSION_DENIED,
    }


def test_internal_port_refuses_plaintext_and_callers_without_a_certificate(tls_router: str, certs: Path) -> None:
    # Both fail at the handshake: the server asks every caller for a certificate of the mesh CA.
    assert stats_code(tls_router, sync_channel(tls_router)) == grpc.StatusCode.UNAVAILABLE
    no_cert = channel(tls_router, None, "router", certs / "ca.crt")
    assert stats_code(tls_router, no_cert) == grpc.StatusCode.UNAVAILABLE


def test_health_answers_any_certificate_of_the_mesh(tls_router: str, certs: Path) -> None:
    with channel(tls_router, role_files(certs, "worker"), "router") as worker_channel:
        reply = health_pb2_grpc.HealthStub(worker_channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_a_caller_refuses_a_server_with_another_identity(tls_router: str, certs: Path) -> None:
    """The gateway dials a worker's address but reaches the router: the router's certificate is not a worker's."""
    assert stats_code(tls_router, channel(tls_router, role_files(certs, "gateway"), "worker")) == (
        grpc.StatusCode.UNAVAILABLE
    )


def test_serving_off_loopback_without_tls_needs_insecure() -> None:
    with pytest.raises(SystemExit, match=r"refusing to serve on 0\.0\.0\.0 without TLS.*--insecure"):
        mesh_tls(cfg.WorkerConfig(host="0.0.0.0"), "worker")
    assert mesh_tls(cfg.WorkerConfig(host="0.0.0.0", insecure=True), "worker") is None
    assert mesh_tls(cfg.WorkerConfig(host="127.0.0.1"), "worker") is None


def test_half_a_tls_setting_is_refused_at_start(certs: Path) -> None:
    with pytest.raises(SystemExit, match="go together"):
        mesh_tls(cfg.RouterConfig(tls_cert=str(certs / "router.crt")), "router")


def served_certificate(address: str, files: TlsFiles) -> x509.Certificate:
    """The certificate a new TLS connection to `address` is shown (as gRPC's own handshake would be)."""
    context = ssl.create_default_context(cafile=files.ca)
    context.check_hostname = False  # the name is gRPC's to check; this reads the certificate only
    context.load_cert_chain(files.cert, files.key)
    context.set_alpn_protocols(["h2"])
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as raw, context.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_a_rotated_certificate_is_served_to_new_connections_without_a_restart(
    certs: Path, tmp_path: Path, loop_thread
) -> None:
    shutil.copytree(certs, tmp_path / "certs")
    rotating = tmp_path / "certs"
    running = loop_thread.run(start_router(router_config(role_files(rotating, "router"))))
    try:
        gateway = role_files(rotating, "gateway")
        before = served_certificate(running.address, gateway)
        make_certs(rotating)  # the same CA, new service certificates
        after = wait_for(
            lambda: (c := served_certificate(running.address, gateway)).serial_number != before.serial_number and c,
            "a new connection to see the router's new certificate",
            10,
        )
        assert after.subject == before.subject
        assert stats_code(running.address, channel(running.address, gateway, "router")) == grpc.StatusCode.OK
    finally:
        loop_thread.run(running.stop(0))


# ---- the whole mesh: `meshserve up --tls` -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_mesh(cache_dir: Path, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    env = {**os.environ, "MESHSERVE_CACHE": str(cache_dir), "PYTHONUNBUFFERED": "1"}
    gateway, router, aggregator, worker, http = free_ports(5)
    logs = tmp_path_factory.mktemp("tls-logs")
    up = subprocess.Popen(
        [*MESHSERVE, "up", "--tls", "--port", str(gateway), "--router-port", str(router),
         "--aggregator-port", str(aggregator), "--worker-port", str(worker), "--log-dir", str(logs),
         "--metrics-port", "0", "--http-port", str(http)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        out, err = Output(up.stdout), Output(up.stderr)
        ready = "`meshserve up --tls` to say it is up"
        wait_for(lambda: out.has("Ctrl-C"), ready, 240, details=lambda: out.text + err.text)
        yield {
            "env": env,
            "out": out.text,
            "gateway": f"127.0.0.1:{gateway}",
            "worker": f"127.0.0.1:{worker}",
            "http": f"https://127.0.0.1:{http}/v1",
            "certs": cache_dir / "tls",
        }
    finally:
        stop_processes([up])


def test_up_tls_serves_generate_and_status(tls_mesh: dict) -> None:
    assert f"chat page    {tls_mesh['http'].removesuffix('/v1')}/" in tls_mesh["out"]
    state = json.loads((Path(tls_mesh["env"]["MESHSERVE_CACHE"]) / "mesh.json").read_text())
    assert state["tls"]["ca"] == str(tls_mesh["certs"] / "ca.crt")
    status = subprocess.run([*MESHSERVE, "status"], env=tls_mesh["env"], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.count("SERVING") == 4 and "meshserve-tiny" in status.stdout, status.stdout
    generate = [*MESHSERVE, "generate", "Hello", "--stream", "--max-tokens", "8", "--gateway", tls_mesh["gateway"]]
    answer = subprocess.run(generate, env=tls_mesh["env"], capture_output=True, text=True, timeout=60)
    assert answer.returncode == 0, answer.stderr
    assert "completion tokens" in answer.stderr


def test_up_tls_serves_the_openai_client_over_https(tls_mesh: dict) -> None:
    ca = ssl.create_default_context(cafile=tls_mesh["certs"] / "ca.crt")
    with httpx.Client(verify=ca) as http_client:
        client = openai.OpenAI(base_url=tls_mesh["http"], api_key="unused", http_client=http_client, max_retries=0)
        completion = client.completions.create(model="meshserve-tiny", prompt="Hello", max_tokens=4)
    assert completion.choices[0].text is not None and completion.usage.completion_tokens == 4
    with pytest.raises(httpx.RemoteProtocolError):  # plaintext HTTP to the HTTPS port
        httpx.get(tls_mesh["http"].replace("https://", "http://") + "/models", timeout=5)


def test_up_tls_worker_refuses_plaintext_no_certificate_and_the_gateways(tls_mesh: dict) -> None:
    worker, certs = tls_mesh["worker"], tls_mesh["certs"]

    def describe(grpc_channel: grpc.Channel) -> grpc.StatusCode:
        return call_code(
            grpc_channel,
            lambda c: worker_pb2_grpc.WorkerStub(c).DescribeModel(worker_pb2.DescribeModelRequest(), timeout=5),
        )

    assert describe(sync_channel(worker)) == grpc.StatusCode.UNAVAILABLE
    assert describe(channel(worker, None, "worker", certs / "ca.crt")) == grpc.StatusCode.UNAVAILABLE
    assert describe(channel(worker, role_files(certs, "gateway"), "worker")) == grpc.StatusCode.PERMISSION_DENIED
    assert describe(channel(worker, role_files(certs, "router"), "worker")) == grpc.StatusCode.OK


def test_the_client_library_talks_to_a_tls_gateway_with_the_mesh_ca(tls_mesh: dict) -> None:
    from meshserve.client import NO_RETRIES, Client, MeshClientError

    ca = tls_mesh["certs"] / "ca.crt"
    with Client(tls_mesh["gateway"], root_certificates=ca, timeout=60) as client:
        whole = client.generate("Hello", max_tokens=4, temperature=0.0)
        streamed = "".join(chunk.text for chunk in client.stream("Hello", max_tokens=4, temperature=0.0))
    assert whole.text == streamed and whole.usage.completion_tokens == 4
    with (
        Client(tls_mesh["gateway"], timeout=10, retry=NO_RETRIES) as plaintext,
        pytest.raises(MeshClientError) as caught,
    ):
        plaintext.generate("Hello", max_tokens=2)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
