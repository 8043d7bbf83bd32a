"""Where the workers are: a static list, every address of a DNS name, or the EndpointSlices of a Kubernetes Service.

`--workers` takes comma-separated entries, each one of:
  host:port                    a fixed address
  dns:///name:port             every A/AAAA record of name, re-resolved every refresh
  k8s:///namespace/service:port the ready endpoints of a Service (EndpointSlices, in-cluster config);
                               port may be a number or the name of the Service's port
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    kind: str  # "static", "dns" or "k8s"
    target: str  # address, name or namespace/service
    port: str

    async def resolve(self) -> set[str]:
        if self.kind == "static":
            return {f"{self.target}:{self.port}"}
        if self.kind == "dns":
            return await resolve_dns(self.target, int(self.port))
        return await asyncio.to_thread(resolve_endpoint_slices, *self.target.split("/", 1), self.port)


def parse_sources(spec: str) -> list[Source]:
    sources = []
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        kind, _, rest = entry.partition(":///") if ":///" in entry else ("static", "", entry)
        target, _, port = rest.rpartition(":")
        if kind not in ("static", "dns", "k8s") or not target or not port:
            raise ValueError(
                f"worker entry {entry!r}: use host:port, dns:///name:port or k8s:///namespace/service:port"
            )
        if kind == "k8s" and target.count("/") != 1:
            raise ValueError(f"worker entry {entry!r}: k8s needs namespace/service before the port")
        if kind != "k8s" and not port.isdigit():
            raise ValueError(f"worker entry {entry!r}: the port must be a number")
        sources.append(Source(kind, target.strip("[]") if kind == "dns" else target, port))
    if not sources:
        raise ValueError("the router needs at least one worker (--workers)")
    return sources


async def resolve_dns(name: str, port: int) -> set[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(name, port, type=socket.SOCK_STREAM)
    return {f"[{info[4][0]}]:{port}" if info[0] == socket.AF_INET6 else f"{info[4][0]}:{port}" for info in infos}


def resolve_endpoint_slices(namespace: str, service: str, port: str, api: Any = None) -> set[str]:
    """Ready addresses of the Service's EndpointSlices. `api` is a kubernetes DiscoveryV1Api (default:
    in-cluster configuration, the pod's service account)."""
    if api is None:
        from kubernetes import client, config

        config.load_incluster_config()
        api = client.DiscoveryV1Api()
    slices = api.list_namespaced_endpoint_slice(namespace, label_selector=f"kubernetes.io/service-name={service}")
    return endpoint_addresses(slices.items, port)


def endpoint_addresses(slices: list[Any], port: str) -> set[str]:
    addresses = set()
    for endpoint_slice in slices:
        numbers = [p.port for p in endpoint_slice.ports or [] if port.isdigit() or p.name == port]
        number = int(port) if port.isdigit() else (numbers[0] if numbers else None)
        if number is None:
            continue
        for endpoint in endpoint_slice.endpoints or []:
            conditions = endpoint.conditions
            # Ready and not terminating: a draining pod is not ready, so it gets no new work.
            if conditions is not None and conditions.ready is False:
                continue
            for address in endpoint.addresses or []:
                addresses.add(f"[{address}]:{number}" if ":" in address else f"{address}:{number}")
    return addresses
