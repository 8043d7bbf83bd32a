"""Certificates rotated under running clients: a service's channels show its new certificate (and trust its new CA)
at their next connection, without a restart. Real TLS servers on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from meshserve.common.errors import MeshError
from meshserve.common.routers import Routers
from meshserve.common.tls import MeshTls, role_files
from meshserve.router.server import start_router
from meshserve.v1 import router_pb2
from test_tls import certs, make_certs, router_config  # noqa: F401  (certs is a fixture)


def new_ca(directory: Path) -> None:
    """A new CA and new certificates under it: every certificate of the old CA stops being trusted."""
    (directory / "ca.key").unlink()
    (directory / "ca.crt").unlink()
    make_certs(directory)


async def in_loop(make, *args, **kwargs):
    """Channels belong to the loop they are made in: the test's services run in loop_thread's."""
    return make(*args, **kwargs)


async def stats_code(routers: Routers) -> grpc.StatusCode:
    try:
        await routers.stub.Stats(router_pb2.RouterStatsRequest(), timeout=5)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    except MeshError as exc:
        return exc.code
    return grpc.StatusCode.OK


@dataclasses.dataclass
class Rotating:
    """A TLS router serving from a copy of the certificates, and a gateway's Routers calling it."""

    certs: Path
    router: Any
    routers: Routers

    def restart_router(self, loop_thread) -> None:
        """Its callers' connections must be made again, with a new handshake."""
        port = int(self.router.address.rsplit(":", 1)[1])
        loop_thread.run(self.router.stop(0))
        config = dataclasses.replace(router_config(role_files(self.certs, "router")), port=port)
        self.router = loop_thread.run(start_router(config))

    def recheck_now(self) -> None:
        for channel in self.routers._channels:
            channel.recheck_now()

    def renewals(self) -> set[int]:
        return {channel.renewals for channel in self.routers._channels}


@pytest.fixture
def rotating(certs: Path, tmp_path: Path, loop_thread) -> Iterator[Rotating]:  # noqa: F811
    directory = tmp_path / "certs"
    shutil.copytree(certs, directory)
    router = loop_thread.run(start_router(router_config(role_files(directory, "router"))))
    tls = MeshTls(role_files(directory, "gateway"), "gateway")
    state = Rotating(directory, router, loop_thread.run(in_loop(Routers, router.address, tls=tls)))
    try:
        assert loop_thread.run(stats_code(state.routers)) == grpc.StatusCode.OK
        yield state
    finally:
        loop_thread.run(state.routers.close())
        loop_thread.run(state.router.stop(0))


def test_a_client_shows_its_new_certificate_after_a_ca_rotation(rotating: Rotating, loop_thread) -> None:
    new_ca(rotating.certs)
    rotating.restart_router(loop_thread)
    # Before the files are looked at again, the old channel still shows the old CA's certificate: refused.
    assert loop_thread.run(stats_code(rotating.routers)) == grpc.StatusCode.UNAVAILABLE
    rotating.recheck_now()
    assert loop_thread.run(stats_code(rotating.routers)) == grpc.StatusCode.OK
    assert rotating.renewals() == {1}


def test_a_half_written_rotation_keeps_the_previous_channel(rotating: Rotating, loop_thread) -> None:
    # A new certificate whose key has not been written yet: the pair does not match.
    gateway = role_files(rotating.certs, "gateway")
    gateway.cert.write_bytes(role_files(rotating.certs, "worker").cert.read_bytes())
    rotating.recheck_now()
    assert loop_thread.run(stats_code(rotating.routers)) == grpc.StatusCode.OK
    assert rotating.renewals() == {0}
