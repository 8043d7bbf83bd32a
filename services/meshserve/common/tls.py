"""TLS for every service, from --tls-cert, --tls-key and --tls-ca: server credentials, client channel
credentials, and who may call whom.

Inside the mesh every connection is mutual TLS under one CA. A service's identity is its role (gateway,
router, aggregator, worker), written in its certificate as the subject's common name and as a DNS name:
- a caller checks the server's: each internal channel verifies the name it expects (the router's channels
  to workers expect `worker`, whatever address discovery gave), not the address it dialled;
- a server checks the caller's (IdentityInterceptor): only gateways and aggregators may call the router,
  only routers the workers, only gateways the aggregator. Health and reflection answer any certificate of
  the mesh CA (a probe, `meshserve status`).
The gateway's public ports serve TLS with the same files without asking for a client certificate: callers
there are authenticated by API key.

Certificates are re-read when their files change: servers at the next connection's handshake (gRPC's
dynamic credentials; the HTTP port's SNI callback); a client channel keeps the certificate it was made with
(see README, Security).
"""

from __future__ import annotations

import inspect
import ipaddress
import logging
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection

log = logging.getLogger(__name__)

ROLES = ("gateway", "router", "aggregator", "worker")
# The callers each internal service answers; the gateway is the edge and has none listed.
ALLOWED_CALLERS: dict[str, frozenset[str]] = {
    "router": frozenset({"gateway", "aggregator"}),
    "worker": frozenset({"router"}),
    "aggregator": frozenset({"gateway"}),
}
# Methods any certificate of the mesh CA may call: probes and tools, not the services' work.
OPEN_SERVICES = (health.SERVICE_NAME, reflection.SERVICE_NAME)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def refuse_off_loopback(host: str, missing: str, risk: str, remedy: str, override_flag: str, overridden: bool) -> None:
    """Secure by default: serving without `missing` is allowed on loopback, elsewhere only when asked for."""
    if is_loopback(host):
        return
    if not overridden:
        raise SystemExit(
            f"meshserve: refusing to serve on {host} without {missing}: {risk}. Pass {remedy}, or "
            f"{override_flag} to serve without {missing} on purpose."
        )
    log.warning("serving on %s without %s (%s)", host, missing, override_flag)


@dataclass(frozen=True)
class TlsFiles:
    """A certificate chain, its key and the CA bundle, as PEM files."""

    cert: Path
    key: Path
    ca: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        return self.cert.read_bytes(), self.key.read_bytes(), self.ca.read_bytes()

    def stamp(self) -> tuple[tuple[int, int], ...]:
        """Changes when any of the three files is replaced or rewritten."""
        return tuple((s.st_mtime_ns, s.st_size) for s in (p.stat() for p in (self.cert, self.key, self.ca)))

    def check_pair(self) -> None:
        """ssl.SSLError unless the key matches the certificate (a rotation half written does not)."""
        _server_context(self)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """This identity's certificate presented to servers, which are verified against the CA."""
        cert, key, ca = self.read()
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)

    def server_credentials(self, require_client_cert: bool) -> grpc.ServerCredentials:
        """Re-read at a connection's handshake when the files changed; a half-written rotation (a key that
        does not match its certificate yet) keeps the previous certificate until the files agree."""
        reloader = _Reloader(self)
        return grpc.dynamic_ssl_server_credentials(
            reloader.initial(), reloader.fetch, require_client_authentication=require_client_cert
        )

    def ssl_context(self) -> ssl.SSLContext:
        """An HTTPS server context (no client certificate asked for) whose certificate follows the files."""
        current = [_server_context(self), self.stamp()]
        lock = threading.Lock()

        def pick_current(connection: ssl.SSLObject, server_name: str | None, listening: ssl.SSLContext) -> None:
            with lock:
                try:
                    stamp = self.stamp()
                    if stamp != current[1]:
                        current[:] = [_server_context(self), stamp]
                        log.info("TLS certificate %s reloaded", self.cert)
                except (OSError, ssl.SSLError) as exc:
                    log.warning("TLS files %s not reloaded (keeping the previous ones): %s", self.cert, exc)
                connection.context = current[0]

        listening = _server_context(self)
        listening.sni_callback = pick_current  # runs at every handshake, with or without SNI
        return listening


def role_files(directory: Path, role: str) -> TlsFiles:
    """The files of `role` in a folder `meshserve certs` wrote: ROLE.crt, ROLE.key and ca.crt."""
    return TlsFiles(directory / f"{role}.crt", directory / f"{role}.key", directory / "ca.crt")


def tls_files(cert: str, key: str, ca: str) -> TlsFiles | None:
    """None when no file is named; all three or none (a partial setting is a mistake, said at start)."""
    if not (cert or key or ca):
        return None
    if not (cert and key and ca):
        raise SystemExit("meshserve: --tls-cert, --tls-key and --tls-ca go together: give all three or none")
    files = TlsFiles(Path(cert), Path(key), Path(ca))
    for flag, path in (("--tls-cert", files.cert), ("--tls-key", files.key), ("--tls-ca", files.ca)):
        if not path.is_file():
            raise SystemExit(f"meshserve: {flag} {path}: no such file")
    try:
        _server_context(files)
    except ssl.SSLError as exc:
        raise SystemExit(f"meshserve: {files.cert} and {files.key} are not a certificate and its key: {exc}") from exc
    return files


def target_options(peer_role: str) -> list[tuple[str, Any]]:
    """Channel options that make TLS verify the server as `peer_role`, not as the address dialled."""
    return [("grpc.ssl_target_name_override", peer_role)]


@dataclass(frozen=True)
class MeshTls:
    """One service's TLS: its files and its role."""

    files: TlsFiles
    role: str

    def server_credentials(self) -> grpc.ServerCredentials:
        # Internal services verify every caller's certificate at the handshake; the gateway's edge does not ask.
        return self.files.server_credentials(require_client_cert=self.role in ALLOWED_CALLERS)

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [IdentityInterceptor(ALLOWED_CALLERS[self.role])] if self.role in ALLOWED_CALLERS else []

    def channel_args(self, peer_role: str) -> dict[str, Any]:
        """`credentials` and `options` for aio_channel to a service of `peer_role`."""
        return {"credentials": self.files.channel_credentials(), "options": target_options(peer_role)}


def mesh_tls(config: Any, role: str) -> MeshTls | None:
    """The service's TLS from its config (tls_cert, tls_key, tls_ca); plaintext only on loopback or --insecure."""
    files = tls_files(config.tls_cert, config.tls_key, config.tls_ca)
    if files is None:
        refuse_off_loopback(
            config.host,
            "TLS",
            "anyone on the network could read its traffic and call it as any service",
            "--tls-cert, --tls-key and --tls-ca (`meshserve certs` makes a development set)",
            "--insecure",
            config.insecure,
        )
        return None
    return MeshTls(files, role)


def peer_identities(context: grpc.aio.ServicerContext) -> set[str]:
    """The roles the caller's verified certificate names (common name and DNS names)."""
    auth = context.auth_context() or {}
    names = [*auth.get("x509_common_name", []), *auth.get("x509_subject_alternative_name", [])]
    return {name.decode() if isinstance(name, bytes) else name for name in names} & set(ROLES)


class IdentityInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through only when the caller's certificate names one of `allowed`."""

    def __init__(self, allowed: frozenset[str]) -> None:
        self.allowed = allowed

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = await continuation(details)
        method = details.method or ""
        if handler is None or method.lstrip("/").split("/", 1)[0] in OPEN_SERVICES:
            return handler
        allowed = self.allowed

        async def check(context: grpc.aio.ServicerContext) -> None:
            identities = peer_identities(context)
            if not identities:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a client certificate of the mesh is required")
            if not identities & allowed:
                who = ", ".join(sorted(identities))
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{method} is not open to {who}; it answers {', '.join(sorted(allowed))}",
                )

        def guard_stream(behavior: Any) -> Any:
            async def guarded_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await check(context)
                result = behavior(request, context)
                if inspect.isasyncgen(result):
                    async for message in result:
                        yield message
                else:  # a handler that writes with context.write
                    await result

            return guarded_stream

        def guard(behavior: Any) -> Any:
            async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await check(context)
                result = behavior(request, context)
                return await result if inspect.isawaitable(result) else result

            return guarded

        guards = {
            "unary_unary": guard,
            "stream_unary": guard,
            "unary_stream": guard_stream,
            "stream_stream": guard_stream,
        }
        return handler._replace(**{k: g(getattr(handler, k)) for k, g in guards.items() if getattr(handler, k)})


class _Reloader:
    """gRPC's certificate fetcher: called at every new connection's handshake, answers None while unchanged."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self.lock = threading.Lock()
        self.stamp = files.stamp()

    def initial(self) -> Any:
        cert, key, ca = self.files.read()
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch(self) -> Any:
        with self.lock:
            try:
                stamp = self.files.stamp()
                if stamp == self.stamp:
                    return None
                self.files.check_pair()
                configuration = self.initial()
            except (OSError, ssl.SSLError) as exc:
                log.warning("TLS files %s not reloaded (keeping the previous ones): %s", self.files.cert, exc)
                return None
            self.stamp = stamp
            log.info("TLS certificate %s reloaded", self.files.cert)
            return configuration


def _server_context(files: TlsFiles) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(files.cert, files.key)
    return context
